"""Contract 2's version: the indexer reads the formats it knows and refuses the others.

A model of a newer format may change what the graph takes or what the metadata means; reading
it as today's format would embed silently wrong vectors. So ``moco.format_version`` is compared
with the versions this indexer knows, and a newer, missing or unknown one is refused with one
line (exit 2 on the command line) before anything is written. The models here are copies of
the fixture model with one metadata prop changed or removed through ``onnx``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from indexer.__main__ import main
from indexer.build import build
from indexer.embed import MODEL_FORMAT_VERSION, EmbeddingModel, ModelError


def _with_props(model: Path, out: Path, *, set_props: dict[str, str] | None = None,
                drop: tuple[str, ...] = ()) -> Path:
    """A copy of ``model`` with metadata props changed (``set_props``) or removed (``drop``)."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(model))
    meta = {p.key: p.value for p in proto.metadata_props if p.key not in drop}
    meta.update(set_props or {})
    del proto.metadata_props[:]
    helper.set_model_props(proto, meta)
    onnx.save(proto, str(out))
    return out


def _build_cli(images: Path, model: Path, out: Path) -> list[str]:
    return ["build", str(images), "--model", str(model), "--out", str(out), "--device", "cpu", "--no-progress"]


def test_a_newer_model_format_is_refused_with_one_line(tmp_path, capsys, image_dir, tiny_model):
    newer = _with_props(tiny_model, tmp_path / "newer.onnx",
                        set_props={"moco.format_version": str(MODEL_FORMAT_VERSION + 1)})
    with pytest.raises(ModelError, match=f"format {MODEL_FORMAT_VERSION + 1}, newer than this indexer reads"):
        EmbeddingModel(newer, device="cpu")
    assert main(_build_cli(image_dir, newer, tmp_path / "col")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"format {MODEL_FORMAT_VERSION + 1}" in err and "upgrade the indexer" in err
    assert not (tmp_path / "col" / "manifest.json").exists()


def test_a_missing_or_unknown_format_version_is_refused(tmp_path, capsys, image_dir, tiny_model):
    cases = {
        "missing": (_with_props(tiny_model, tmp_path / "missing.onnx", drop=("moco.format_version",)),
                    "lacks the metadata moco.format_version"),
        "zero": (_with_props(tiny_model, tmp_path / "zero.onnx", set_props={"moco.format_version": "0"}),
                 "is not a format this indexer knows"),
        "not a number": (_with_props(tiny_model, tmp_path / "text.onnx", set_props={"moco.format_version": "v2"}),
                         "bad moco.* metadata"),
    }
    for name, (model, words) in cases.items():
        out = tmp_path / f"col-{name.replace(' ', '-')}"
        assert main(_build_cli(image_dir, model, out)) == 2, name
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, (name, err)
        assert not (out / "manifest.json").exists(), name


def test_the_known_format_is_read_and_an_update_to_a_newer_model_is_refused(tmp_path, capsys, image_dir, tiny_model):
    same = _with_props(tiny_model, tmp_path / "same.onnx", set_props={"moco.format_version": str(MODEL_FORMAT_VERSION)})
    with build(image_dir, tmp_path / "col", model=same, device="cpu", workers=2) as col:
        generation, count = col.generation, len(col)
    newer = _with_props(tiny_model, tmp_path / "newer.onnx",
                        set_props={"moco.format_version": str(MODEL_FORMAT_VERSION + 1)})
    code = main(["update", str(tmp_path / "col"), "--model", str(newer), "--rebuild", "--device", "cpu",
                 "--no-progress"])
    assert code == 2 and "newer than this indexer reads" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "col")]) == 0  # the collection is untouched
    assert f"generation {generation}" in capsys.readouterr().out and count > 0
