"""Which model `indexer build` uses without --model: the one trained on the folder, said aloud,
never silently the newest file (issue 17 item 6)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from indexer import models
from indexer.__main__ import main
from indexer.collection import Collection
from indexer.embed import ModelError
from indexer.files import sha256_file

from .conftest import make_images, make_model


def trained(path: Path, folder: Path, *, count: int = 19, size: int = 32, age: int = 0) -> Path:
    """A tiny model whose metadata says it was trained on ``folder``; ``age`` seconds old."""
    make_model(path, image_size=size, props={"moco.train_data": f"{count} images in {folder.resolve()}"})
    stamp = path.stat().st_mtime - age
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_build_picks_the_model_trained_on_the_folder_and_says_so(workdir: Path, capsys: pytest.CaptureFixture[str],
                                                                  image_dir: Path) -> None:
    other = make_images(workdir / "clothes", per_class=2)
    mine = trained(workdir / "models" / "photos.onnx", image_dir, age=100)  # older ...
    trained(workdir / "models" / "clothes.onnx", other)  # ... than a model of another folder
    assert main(["build", str(image_dir), "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("model"))
    assert "models/photos.onnx" in line and f"trained on 19 images in {image_dir.resolve()}" in line
    assert "32 px" in line and "trained on this folder" in line
    with Collection.open(workdir / "indexes" / "photos", device="cpu") as col:
        assert col.manifest["model"]["props"]["moco.train_data"] == f"19 images in {image_dir.resolve()}"
        assert col.manifest["model"]["sha256"] == sha256_file(mine)


def test_no_matching_model_is_refused_with_the_candidates(workdir: Path, capsys: pytest.CaptureFixture[str],
                                                          image_dir: Path) -> None:
    digits = make_images(workdir / "digits", per_class=2)
    trained(workdir / "models" / "digits.onnx", digits, count=6, size=16)
    make_model(workdir / "models" / "old.onnx", props={"moco.train_data": "photos: 19 images"})  # a name only
    assert main(["build", str(image_dir), "--device", "cpu", "--no-progress"]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("python -m indexer build: error: no model in models was "
                                                   f"trained on {image_dir.resolve()}; pass --model")
    assert f"models/digits.onnx (trained on 6 images in {digits.resolve()}, 16 px)" in err
    assert "models/old.onnx (trained on photos: 19 images, 32 px)" in err
    assert not (workdir / "indexes").exists()  # nothing was written


def test_given_model_wins_and_is_named(workdir: Path, capsys: pytest.CaptureFixture[str], image_dir: Path) -> None:
    trained(workdir / "models" / "photos.onnx", image_dir)
    elsewhere = trained(workdir / "elsewhere.onnx", workdir / "clothes", size=16)
    assert main(["build", str(image_dir), "--model", str(elsewhere), "--device", "cpu", "--no-progress"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("model"))
    assert str(elsewhere) in line and "given with --model" in line and f"NOT trained on {image_dir}" in line
    with Collection.open(workdir / "indexes" / "photos", device="cpu") as col:
        assert col.manifest["model"]["props"]["moco.image_size"] == "16"
    # update keeps the collection's own model, and says which it is
    assert main(["update", str(workdir / "indexes" / "photos"), "--no-progress"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("model"))
    assert "the collection's own model" in line and f"{(workdir / 'clothes').resolve()}, 16 px" in line


def test_a_model_of_a_folder_above_matches_its_sub_folders(tmp_path: Path, image_dir: Path) -> None:
    parent = trained(tmp_path / "models" / "parent.onnx", image_dir.parent)
    assert models.choose_model(image_dir / "class1", tmp_path / "models").path == parent
    child = trained(tmp_path / "models" / "child.onnx", image_dir / "class1")
    with pytest.raises(ModelError, match="candidates"):  # a sub-folder's model is not one of the whole folder
        models.choose_model(image_dir, tmp_path / "models", candidates=[child])
    assert models.choose_model(image_dir / "class1", candidates=[parent, child]).path == parent  # order decides


def test_train_data_is_parsed_only_when_it_names_a_folder() -> None:
    assert models.parse_train_data("720 images in /data/flowers") == Path("/data/flowers")
    assert models.parse_train_data("720 images in /data/my photos: 2024") == Path("/data/my photos: 2024")
    assert models.parse_train_data("flowers: 720 images") is None
    assert models.parse_train_data("unknown") is None
    assert models.parse_train_data("3 images in relative/path") is None


def test_an_unreadable_model_is_listed_not_fatal(tmp_path: Path, image_dir: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r"broken.onnx \(unreadable: "):
        models.choose_model(image_dir, tmp_path / "models")
