"""Damaged collections and inconsistent models: every command answers one line on stderr, exit 2.

Each case starts from a copy of one small real collection (built once per module with the
fixture model of conftest) and damages one thing the way a disk, a crash, a careless copy or a
hand edit would: the manifest's shape, types and keys, the vectors, ids, index and map files,
``items.sqlite`` and the model. Then every command that reads a collection (info, search, eval,
dupes, update, merge) runs in-process through ``indexer.__main__.main``, and two cases also as
real processes, and must exit 2 with a single line that names the problem, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from indexer import store
from indexer.__main__ import main
from indexer.build import build
from indexer.collection import Collection
from indexer.embed import EmbeddingModel, ModelError

from .conftest import make_images, make_model

ROOT = Path(__file__).parents[2]
READERS = ("info", "search", "eval", "dupes", "update", "merge")
MODEL_USERS = ("search", "update", "merge")  # the commands that load the collection's model


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One healthy collection (and its image folder) that every case copies."""
    root = tmp_path_factory.mktemp("damaged")
    images = make_images(root / "photos")
    model = make_model(root / "tiny.onnx")
    build(images, root / "col", model=model, device="cpu", workers=2, batch_size=8).close()
    return root / "col", images


def _manifest(col: Path) -> dict:
    return json.loads((col / "manifest.json").read_text())


def _edit(change: Callable[[dict], object]) -> Callable[[Path], None]:
    """A damage that edits the parsed manifest in place (or replaces it by what ``change`` returns)."""
    def damage(col: Path) -> None:
        manifest = _manifest(col)
        result = change(manifest)
        (col / "manifest.json").write_text(json.dumps(manifest if result is None else result))
    return damage


def _raw_manifest(data: bytes) -> Callable[[Path], None]:
    return lambda col: (col / "manifest.json").write_bytes(data)


def _drop(key: str) -> Callable[[Path], None]:
    return _edit(lambda m: m.pop(key) and None)


def _set(*path_and_value: object) -> Callable[[Path], None]:
    *keys, value = path_and_value

    def change(m: dict) -> None:
        obj = m
        for key in keys[:-1]:
            obj = obj[key]
        obj[keys[-1]] = value
    return _edit(change)


def _data_file(col: Path, kind: str) -> Path:
    m = _manifest(col)
    name = {"vectors": m["vectors"][0]["file"], "ids": m["vectors"][0]["ids"], "index": m["index"]["file"],
            "projection": m["projection"]["file"], "model": m["model_file"]}[kind]
    return col / name


def _truncate(kind: str, keep: float = 0.5) -> Callable[[Path], None]:
    def damage(col: Path) -> None:
        path = _data_file(col, kind)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return damage


def _garbage(kind: str) -> Callable[[Path], None]:
    return lambda col: _data_file(col, kind).write_bytes(b"\x00garbage, not what this file should be\n" * 40)


def _remove(kind: str) -> Callable[[Path], None]:
    return lambda col: _data_file(col, kind).unlink()


def _append(kind: str, extra: bytes) -> Callable[[Path], None]:
    def damage(col: Path) -> None:
        with open(_data_file(col, kind), "ab") as fh:
            fh.write(extra)
    return damage


def _float_ids(col: Path) -> None:
    path = _data_file(col, "ids")
    np.save(path, np.load(path).astype(np.float64))


def _index_of_other_dim(col: Path) -> None:
    import faiss

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    index.add_with_ids(np.eye(8, dtype=np.float32)[:3], np.arange(1, 4, dtype=np.int64))
    faiss.write_index(index, str(_data_file(col, "index")))


def _projection_lacking_coords(col: Path) -> None:
    path = _data_file(col, "projection")
    with np.load(path) as data:
        parts = {k: data[k] for k in data.files if k != "coords"}
    with open(path, "wb") as fh:
        np.savez(fh, **parts)


def _sqlite(change: Callable[[Path], None]) -> Callable[[Path], None]:
    """Damage items.sqlite after dropping its -wal/-shm (the build checkpointed them in)."""
    def damage(col: Path) -> None:
        for suffix in ("-wal", "-shm"):
            (col / f"items.sqlite{suffix}").unlink(missing_ok=True)
        change(col / "items.sqlite")
    return damage


def _sql(statement: str) -> Callable[[Path], None]:
    def change(db: Path) -> None:
        conn = sqlite3.connect(db)
        with conn:
            conn.execute(statement)
        conn.close()
    return _sqlite(change)


def _other_model(dim: int) -> Callable[[Path], None]:
    return lambda col: make_model(_data_file(col, "model"), dim=dim, seed=7)


# name -> (damage, words the one line must contain, commands expected to fail)
CASES: dict[str, tuple[Callable[[Path], None], tuple[str, ...], tuple[str, ...]]] = {
    # the manifest's shape
    "manifest is []": (_raw_manifest(b"[]"), ("manifest.json", "list"), READERS),
    "manifest is null": (_raw_manifest(b"null"), ("manifest.json", "null"), READERS),
    "manifest is a string": (_raw_manifest(b'"collection"'), ("manifest.json", "str"), READERS),
    "manifest is not JSON": (_raw_manifest(b"{not json"), ("manifest.json",), READERS),
    "manifest is empty": (_raw_manifest(b""), ("manifest.json",), READERS),
    "manifest is binary": (_raw_manifest(b"\xff\xfe\x00\x81garbage"), ("manifest.json",), READERS),
    "manifest is missing": (lambda col: (col / "manifest.json").unlink(), ("manifest.json",), READERS),
    # keys that are missing
    **{f"no {key}": (_drop(key), (key, "manifest.json"), READERS)
       for key in ("format_version", "generation", "dim", "image_root", "model_file", "model", "vectors", "index",
                   "counts", "created")},
    "no vectors[0].file": (_edit(lambda m: m["vectors"][0].pop("file") and None), ("vectors[0].file",), READERS),
    "no counts.indexed": (_edit(lambda m: m["counts"].pop("indexed") and None), ("counts.indexed",), READERS),
    "no index.recipe": (_edit(lambda m: m["index"].pop("recipe") and None), ("index.recipe",), READERS),
    # values of the wrong type or range
    "generation 'abc'": (_set("generation", "abc"), ("generation", '"abc"'), READERS),
    "generation -1": (_set("generation", -1), ("generation",), READERS),
    "generation 1.5": (_set("generation", 1.5), ("generation",), READERS),
    "generation true": (_set("generation", True), ("generation",), READERS),
    "format_version '1'": (_set("format_version", "1"), ("format_version",), READERS),
    "format_version newer": (_set("format_version", 99), ("newer",), READERS),
    "dim '16'": (_set("dim", "16"), ("dim",), READERS),
    "dim 0": (_set("dim", 0), ("dim",), READERS),
    "dim differs from the model's": (_set("dim", 32), ("dim", "moco.embedding_dim"), READERS),
    "dim and props say 32, files 16": (_edit(lambda m: m.update(dim=32) or m["model"]["props"].update(
        {"moco.embedding_dim": "32"})), ("32",), READERS),
    "vectors null": (_set("vectors", None), ("vectors",), READERS),
    "vectors {}": (_set("vectors", {}), ("vectors", "list"), READERS),
    "vectors [null]": (_set("vectors", [None]), ("vectors[0]",), READERS),
    "vectors count 'x'": (_set("vectors", 0, "count", "x"), ("vectors[0].count",), READERS),
    "vectors count too big": (_edit(lambda m: m["vectors"][0].update(count=m["vectors"][0]["count"] + 5)),
                              ("ids",), READERS),
    "vectors file outside": (_set("vectors", 0, "file", "../../etc/passwd"), ("vectors[0].file", "plain"), READERS),
    "vectors dtype float64": (_set("vectors", 0, "dtype", "float64"), ("vectors[0].dtype",), READERS),
    "index null": (_set("index", None), ("index",), READERS),
    "index.file null": (_set("index", "file", None), ("index.file",), READERS),
    "index.recipe 'x'": (_set("index", "recipe", "x"), ("index.recipe",), READERS),
    "recipe params 'x'": (_set("index", "recipe", "params", {"nprobe": "x"}), ("nprobe",), READERS),
    "model_file outside": (_set("model_file", "../tiny.onnx"), ("model_file",), READERS),
    "model.props 'x'": (_set("model", "props", "x"), ("model.props",), READERS),
    "model.sha256 'abc'": (_set("model", "sha256", "abc"), ("model.sha256",), READERS),
    "counts.indexed 'many'": (_set("counts", "indexed", "many"), ("counts.indexed",), READERS),
    "counts.indexed off by one": (_edit(lambda m: m["counts"].update(indexed=m["counts"]["indexed"] + 1)),
                                  ("items.sqlite", "says"), READERS),
    "projection.file 7": (_set("projection", "file", 7), ("projection.file",), READERS),
    "shard [3, 2]": (_set("shard", [3, 2]), ("shard",), READERS),
    # data files
    "vectors truncated": (_truncate("vectors"), ("vectors-", "truncated"), READERS),
    "vectors empty": (_truncate("vectors", 0.0), ("vectors-", "truncated"), READERS),
    "vectors longer": (_append("vectors", b"\0" * 4), ("vectors-", "bytes"), READERS),
    "vectors missing": (_remove("vectors"), ("vectors-", "missing"), READERS),
    "ids garbage": (_garbage("ids"), ("ids-",), READERS),
    "ids truncated": (_truncate("ids", 0.7), ("ids-",), READERS),
    "ids missing": (_remove("ids"), ("ids-", "missing"), READERS),
    "ids are floats": (_float_ids, ("ids-", "float64"), READERS),
    "index garbage": (_garbage("index"), ("index-",), READERS),
    "index empty": (_truncate("index", 0.0), ("index-",), READERS),
    "index truncated": (_truncate("index", 0.5), ("index-",), READERS),
    "index missing": (_remove("index"), ("index-", "missing"), READERS),
    "index of another dim": (_index_of_other_dim, ("index-", "8-d"), READERS),
    "projection garbage": (_garbage("projection"), ("projection-",), READERS),
    "projection truncated": (_truncate("projection", 0.5), ("projection-",), READERS),
    "projection missing": (_remove("projection"), ("projection-", "missing"), READERS),
    "projection lacks coords": (_projection_lacking_coords, ("projection-", "coords"), READERS),
    # items.sqlite
    "items.sqlite garbage": (_sqlite(lambda db: db.write_bytes(b"not a database\n" * 500)), ("items.sqlite",),
                             READERS),
    "items.sqlite empty": (_sqlite(lambda db: db.write_bytes(b"")), ("items.sqlite",), READERS),
    "items.sqlite truncated": (_sqlite(lambda db: db.write_bytes(db.read_bytes()[:2048])), ("items.sqlite",),
                               READERS),
    "items.sqlite missing": (_sqlite(lambda db: db.unlink()), ("items.sqlite",), READERS),
    "items rows deleted": (_sql("DELETE FROM items WHERE id IN (SELECT id FROM items LIMIT 3)"),
                           ("items.sqlite", "says"), READERS),
    "thumbnails table dropped": (_sql("DROP TABLE thumbnails"), ("items.sqlite", "thumbnails"), READERS),
    # the collection's model
    "model missing": (_remove("model"), ("model.onnx", "missing"), READERS),
    "model garbage": (_garbage("model"), ("model.onnx",), MODEL_USERS),
    "model of another dim": (_other_model(8), ("model.onnx",), MODEL_USERS),
    "model of another seed": (_other_model(16), ("model.onnx",), MODEL_USERS),
}


def _argv(command: str, col: Path, images: Path, out: Path) -> list[str]:
    return {
        "info": ["info", str(col)],
        "search": ["search", str(col), str(images / "class0" / "img01.png"), "--device", "cpu"],
        "eval": ["eval", str(col)],
        "dupes": ["dupes", str(col)],
        "update": ["update", str(col), "--device", "cpu", "--no-progress", "--workers", "2"],
        "merge": ["merge", str(col), "--out", str(out), "--device", "cpu", "--no-progress"],
    }[command]


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_collection_is_one_line_exit_2(case, base, tmp_path, capsys):
    damage, words, failing = CASES[case]
    col = tmp_path / "col"
    shutil.copytree(base[0], col)
    damage(col)
    problems = []
    for command in READERS:
        code = main(_argv(command, col, base[1], tmp_path / f"merged-{command}"))
        captured = capsys.readouterr()
        err = captured.err.strip()
        if command not in failing:
            if code != 0:
                problems.append(f"{command}: exit {code} on a collection it can still read: {err}")
            continue
        prefix = f"python -m indexer {command}: error: "
        one_line = "\n" not in err and "Traceback" not in err and err.startswith(prefix)
        if code != 2 or not one_line:
            problems.append(f"{command}: exit {code}, stderr {err!r}")
        elif not all(word in err for word in words):
            problems.append(f"{command}: {err!r} does not name {words}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", ["manifest is []", "vectors truncated"])
def test_damaged_collection_in_a_real_process(case, base, tmp_path):
    col = tmp_path / "col"
    shutil.copytree(base[0], col)
    CASES[case][0](col)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for command in ("info", "search"):
        proc = subprocess.run([sys.executable, "-m", "indexer", *_argv(command, col, base[1], tmp_path / "m")],
                              env=env, capture_output=True, text=True, timeout=120)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and "\n" not in err and "Traceback" not in err, (command, proc.stderr)
        assert err.startswith(f"python -m indexer {command}: error: ") and proc.stdout == ""


def test_rebuild_recovers_from_damaged_data_files(base, tmp_path, capsys):
    """The message for damaged vectors/index/map files points at 'update --rebuild', and it works."""
    col = tmp_path / "col"
    shutil.copytree(base[0], col)
    _truncate("vectors")(col)
    _garbage("index")(col)
    assert main(["info", str(col)]) == 2
    assert f"python -m indexer update {col} --rebuild" in capsys.readouterr().err
    assert main(["update", str(col), "--rebuild", "--device", "cpu", "--no-progress"]) == 0
    with Collection.open(col, device="cpu") as fixed:
        assert len(fixed) == len(Collection.open(base[0])) and fixed.search_id(fixed.ids[0], 3)


# ----------------------------------------------------------------------------------------------
# Models whose metadata disagrees with their graph
# ----------------------------------------------------------------------------------------------


def _retyped(path: Path, *, props: dict[str, str] | None = None, input_dims: list | None = None,
             output_dims: list | None = None, input_type: int | None = None) -> Path:
    """The fixture model with other metadata, declared shapes (int or symbolic name) or input type."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    if props:
        meta = {p.key: p.value for p in model.metadata_props}
        meta.update(props)
        del model.metadata_props[:]
        helper.set_model_props(model, meta)
    for value, dims in ((model.graph.input[0], input_dims), (model.graph.output[0], output_dims)):
        for dim, new in zip(value.type.tensor_type.shape.dim, dims or []):
            if isinstance(new, int):
                dim.dim_value = new
            else:
                dim.dim_param = new
    if input_type is not None:
        model.graph.input[0].type.tensor_type.elem_type = input_type
    out = path.with_name(f"variant-{len(list(path.parent.glob('variant-*')))}.onnx")
    onnx.save(model, str(out))
    return out


def _model_cases(tiny: Path) -> dict[str, tuple[Path, str]]:
    from onnx import TensorProto

    return {
        # 128 in the metadata on a 16-d graph: before, this built a broken collection and exited 0
        "embedding_dim disagrees": (_retyped(tiny, props={"moco.embedding_dim": "128"}), "moco.embedding_dim"),
        "image_size disagrees": (_retyped(tiny, props={"moco.image_size": "48",
                                                      "moco.resize": "short_side=55;center_crop=48"}),
                                 "moco.image_size"),
        "dynamic output, wrong dim": (_retyped(tiny, props={"moco.embedding_dim": "128"}, output_dims=["N", "D"]),
                                      "moco.embedding_dim"),
        "dynamic input, wrong size": (_retyped(tiny, props={"moco.image_size": "48",
                                                           "moco.resize": "short_side=55;center_crop=48"},
                                               input_dims=["N", "S", "S", 3]), "moco.image_size"),
        "image_size not a number": (_retyped(tiny, props={"moco.image_size": "big"}), "moco.*"),
        "embedding_dim zero": (_retyped(tiny, props={"moco.embedding_dim": "0"}), "embedding dimension"),
        "newer model format": (_retyped(tiny, props={"moco.format_version": "9"}), "newer"),
        "float input": (_retyped(tiny, input_type=TensorProto.FLOAT), "uint8"),
        "not a model": (tiny.with_name("junk.onnx"), "not a loadable ONNX model"),
        "missing": (tiny.with_name("absent.onnx"), "not found"),
    }


def test_models_that_disagree_with_their_graph_are_refused(tmp_path, capsys, image_dir):
    tiny = make_model(tmp_path / "models" / "tiny.onnx")
    tiny.with_name("junk.onnx").write_bytes(b"\x08\x01garbage" * 30)
    problems = []
    for name, (model, words) in _model_cases(tiny).items():
        out = tmp_path / f"col-{name.replace(' ', '_')}"
        code = main(["build", str(image_dir), "--model", str(model), "--out", str(out), "--device", "cpu",
                     "--no-progress"])
        err = capsys.readouterr().err.strip()
        if code != 2 or "\n" in err or "Traceback" in err or words not in err:
            problems.append(f"{name}: exit {code}, {err!r}")
        if (out / "manifest.json").exists():
            problems.append(f"{name}: a collection was written")
    assert not problems, "\n".join(problems)


def test_a_dynamic_graph_that_matches_its_metadata_loads(tmp_path):
    """The probe path: sizes the graph leaves open are run once, and a right model passes."""
    tiny = make_model(tmp_path / "tiny.onnx")
    model = EmbeddingModel(_retyped(tiny, input_dims=["N", "S", "S", "C"], output_dims=["N", "D"]), device="cpu")
    assert model.dim == 16 and model.image_size == 32
    out = model.embed(np.zeros((2, 32, 32, 3), dtype=np.uint8) + 9)
    assert out.shape == (2, 16)
    with pytest.raises(ModelError, match="gives vectors of shape"):
        EmbeddingModel(_retyped(tiny, props={"moco.embedding_dim": "12"}, output_dims=["N", "D"]), device="cpu")


def test_manifest_errors_name_the_key_and_the_file(tmp_path):
    path = tmp_path / "manifest.json"
    good = {"format_version": 1, "generation": 1}
    with pytest.raises(store.CollectionError, match=r"manifest.json: the key 'created' is missing"):
        store.validate_manifest(good, path)
    with pytest.raises(store.CollectionError, match=r"'generation' must be a whole number >= 1, found \"7\""):
        store.validate_manifest({**good, "generation": "7"}, path)
