"""`python -m indexer`: every command's --help, exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.__main__ import main

from .conftest import make_model

ROOT = Path(__file__).parents[2]
COMMANDS = ["build", "update", "search", "info", "eval", "dupes", "merge"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"] if command else ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage" in out
    # A description paragraph follows the usage block: the help says what the command does.
    paragraphs = out.split("\n\n")
    assert len(paragraphs) > 2 and not paragraphs[1].lstrip().startswith(("positional", "options")), out
    assert len(paragraphs[1].split()) >= 8, paragraphs[1]
    if command:
        assert "example" in out and f"python -m indexer {command}" in out


def test_bad_usage_is_one_line_exit_2(tmp_path, capsys, tiny_model, image_dir):
    for argv in (["build"], ["build", str(image_dir), "--batch-size", "0"], ["search", "x"],
                 ["dupes", "c", "--threshold", "7"], ["frobnicate"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "error" in err
    cases = [
        ["build", str(image_dir), "--model", str(tiny_model), "--index", "Bogus99"],
        ["build", str(image_dir), "--model", str(tiny_model), "--shard", "3/2"],
        ["build", str(tmp_path / "missing"), "--model", str(tiny_model), "--out", str(tmp_path / "c")],
        ["build", str(image_dir), "--model", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "c")],
        ["info", str(tmp_path / "nothing")],
        ["update", str(tmp_path)],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "error" in err, (argv, err)


def test_model_without_metadata_is_refused(tmp_path, capsys, image_dir):
    from onnx import helper

    from indexer.embed import EmbeddingModel, ModelError

    path = make_model(tmp_path / "m.onnx")
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    helper.set_model_props(model, {"moco.image_size": "32"})
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(ModelError, match="lacks the metadata"):
        EmbeddingModel(tmp_path / "bare.onnx")


def test_default_model_error_says_how_to_make_one(tmp_path, capsys, image_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["build", str(image_dir), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "python -m exports" in err and "--model" in err
    make_model(tmp_path / "models" / "a.onnx")  # trained on something else: never used silently
    assert main(["build", str(image_dir), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model" in err and "models/a.onnx (trained on none (test fixture)" in err
    make_model(tmp_path / "models" / "b.onnx", props={"moco.train_data": f"19 images in {image_dir.resolve()}"})
    assert main(["build", str(image_dir), "--device", "cpu", "--no-progress"]) == 0
    assert "models/b.onnx" in capsys.readouterr().out
    assert (tmp_path / "indexes" / "photos" / "manifest.json").is_file()


def test_end_to_end(tmp_path, capsys, tiny_model, image_dir):
    col = tmp_path / "col"
    assert main(["build", str(image_dir), "--model", str(tiny_model), "--out", str(col), "--device", "cpu",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "indexed     19 items" in out and "recall@10 1.000" in out
    assert main(["search", str(col), str(image_dir / "class1" / "img02.jpg"), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and set(hits[0]) == {"id", "path", "score", "label", "closeness"}
    assert hits[0]["path"] == "class1/img02.jpg" and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert main(["info", str(col)]) == 0
    assert "recall@10" in capsys.readouterr().out
    assert main(["info", str(col), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["indexed"] == 19
    assert main(["eval", str(col), "--json"]) == 0
    assert "knn_top1" in json.loads(capsys.readouterr().out)
    assert main(["dupes", str(col), "--json", "--threshold", "0.9999"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["update", str(col), "--no-progress"]) == 0
    assert "0 embedded now" in capsys.readouterr().out
    assert main(["search", str(col), str(tmp_path / "nope.jpg")]) == 2
    assert main(["build", str(image_dir), "--model", str(tiny_model), "--out", str(tmp_path / "p0"),
                 "--shard", "0/2", "--no-progress"]) == 0
    env = {"RANK": "1", "WORLD_SIZE": "2"}
    os.environ.update(env)
    try:
        assert main(["build", str(image_dir), "--model", str(tiny_model), "--out", str(tmp_path / "p1"),
                     "--shard", "env", "--no-progress"]) == 0
    finally:
        for key in env:
            os.environ.pop(key)
    assert main(["merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out", str(tmp_path / "m"),
                 "--no-progress"]) == 0
    assert "indexed     19 items" in capsys.readouterr().out


def test_nothing_indexed_exits_1(tmp_path, capsys, tiny_model):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_bytes(b"")
    assert main(["build", str(tmp_path / "junk"), "--model", str(tiny_model), "--out", str(tmp_path / "c")]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("python -m indexer build: error: no image could be indexed") and "empty file: 1" in last


def test_light_imports_stay_light():
    """`import indexer.images` must not pull in FAISS or ONNX Runtime; nothing may pull in torch."""
    code = ("import sys, indexer, indexer.images, indexer.analysis; "
            "assert 'faiss' not in sys.modules and 'onnxruntime' not in sys.modules; "
            "import indexer.collection, indexer.__main__, indexer.merge, indexer.dupes; "
            "assert indexer.Collection is indexer.collection.Collection; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# -- indexer.cli: what the three command lines share --------------------------------------------


@pytest.mark.parametrize(("kind", "text", "message"), [
    ("positive_int", "0", "expected a number >= 1, got 0"),
    ("positive_int", "two", "expected a whole number, got 'two'"),
    ("fraction", "1.5", "expected a number in [0, 1], got 1.5"),
    ("fraction", "nan", "expected a number in [0, 1], got nan"),
    ("similarity", "-1", "expected a similarity in (-1, 1], got -1.0"),
    ("similarity", "high", "expected a similarity in (-1, 1], got 'high'"),
])
def test_shared_argument_types_refuse_in_one_line(kind, text, message, capsys):
    from indexer import cli

    parser = cli.OneLineParser(prog="tool")
    parser.add_argument("--value", type=getattr(cli, kind))
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--value", text])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"tool: error: argument --value: {message} (see --help)\n"


def test_shared_argument_types_accept_their_range():
    from indexer import cli

    assert cli.positive_int("1") == 1 and cli.positive_int("64") == 64
    assert cli.fraction("0") == 0.0 and cli.fraction("1") == 1.0
    assert cli.similarity("1") == 1.0 and cli.similarity("-0.5") == -0.5


def test_from_parser_shows_the_parsers_own_reason(capsys):
    from indexer.cli import OneLineParser, from_parser

    def parse_even(text: str) -> int:
        if int(text) % 2:
            raise ValueError(f"{text} is odd; give an even number")
        return int(text)

    parser = OneLineParser(prog="tool")
    parser.add_argument("n", type=from_parser(parse_even))
    assert parser.parse_args(["4"]).n == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["3"])
    assert capsys.readouterr().err == "tool: error: argument n: 3 is odd; give an even number (see --help)\n"


def test_all_three_command_lines_answer_bad_values_in_one_line(tmp_path, capsys):
    from exports.__main__ import main as exports_main
    from moco.__main__ import main as moco_main

    calls = [
        (moco_main, ["train", str(tmp_path), "--time-budget", "soon"], "python -m moco train: error: argument "
         "--time-budget: 'soon' is not a duration"),
        (moco_main, ["train", str(tmp_path), "--mean", "1,2"], "expected three comma-separated numbers"),
        (exports_main, ["ckpt", "-o", "m.onnx", "--check-images", "0"], "python -m exports: error: argument "
         "--check-images: expected a number >= 1, got 0"),
        (exports_main, ["ckpt", "-o", "m.onnx", "--min-overlap", "2"], "expected a number in [0, 1], got 2.0"),
        (main, ["build", str(tmp_path), "--workers", "0"], "python -m indexer build: error: argument --workers: "
         "expected a number >= 1, got 0"),
        (main, ["search", "c", "q.jpg", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ]
    for entry, argv, needle in calls:
        with pytest.raises(SystemExit) as info:
            entry(argv)
        assert info.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err and err.endswith("(see --help)\n"), (argv, err)
