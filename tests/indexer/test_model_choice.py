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

from .conftest import VNNI, int8_pair, make_images, make_model


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


# -- the variant: fp32 or its verified int8 sibling (issue 18 item 3) ----------------------------

def test_cpu_flags_are_read_from_cpuinfo_text() -> None:
    text = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512_vnni amx_int8 amx_bf16\nbugs\t: x\n"
    flags = models.parse_cpu_flags(text)
    assert models.cpu_int8_flags(flags) == ("amx_int8", "avx512_vnni")
    assert models.cpu_int8_flags(models.parse_cpu_flags("flags : fpu avx2 fma\n")) == ()
    assert models.parse_cpu_flags("no flags line") == frozenset()


def test_a_vnni_cpu_takes_the_verified_sibling_others_fp32(tmp_path: Path, image_dir: Path) -> None:
    fp32, int8 = int8_pair(tmp_path / "models", image_dir)
    fast = models.choose_variant(fp32, device="cpu", cpu_flags=VNNI)
    assert (fast.path, fast.precision) == (int8, "int8")
    assert "amx_int8, avx512_vnni" in fast.reason and "overlap with fp32 0.970 on 240 images" in fast.reason
    slow = models.choose_variant(fp32, device="cpu", cpu_flags=frozenset({"avx2"}))
    assert (slow.path, slow.precision) == (fp32, "fp32") and "no VNNI/AMX" in slow.reason
    # --precision overrides either way; --model is used as it is unless a precision is asked for
    assert models.choose_variant(fp32, precision="int8", device="cpu", cpu_flags=frozenset()).path == int8
    assert models.choose_variant(fp32, precision="fp32", device="cpu", cpu_flags=VNNI).path == fp32
    assert models.choose_variant(int8, precision="fp32", device="cpu").path == fp32
    assert models.choose_variant(fp32, given=True, device="cpu", cpu_flags=VNNI).path == fp32
    assert models.choose_variant(int8, given=True, device="cpu", cpu_flags=VNNI).path == int8


@pytest.mark.parametrize("case", ["failed", "other-fp32", "missing"])
def test_an_unverified_or_foreign_sibling_is_not_used(tmp_path: Path, image_dir: Path, case: str) -> None:
    fp32, int8 = int8_pair(tmp_path, image_dir, passed=case != "failed",
                           sha="0" * 64 if case == "other-fp32" else None)
    if case == "missing":
        int8.unlink()
    chosen = models.choose_variant(fp32, device="cpu", cpu_flags=VNNI)
    assert chosen.path == fp32 and chosen.precision == "fp32"
    reason = {"failed": "did not pass its check", "other-fp32": "was made from another photos.onnx",
              "missing": "no int8 sibling photos-int8.onnx (export with --with-int8"}[case]
    assert reason in chosen.reason
    with pytest.raises(ModelError, match="^--precision int8: .* has no usable int8 variant"):
        models.choose_variant(fp32, precision="int8", device="cpu")


def test_the_newer_sibling_does_not_shadow_its_fp32_model(tmp_path: Path, image_dir: Path) -> None:
    fp32, int8 = int8_pair(tmp_path / "models", image_dir)
    stamp = fp32.stat().st_mtime
    os.utime(fp32, (stamp - 100, stamp - 100))  # the sibling is written last, so it is the newest file
    assert models.choose_model(image_dir, tmp_path / "models").path == fp32
    fp32.unlink()  # an int8 model alone is a model like any other
    assert models.choose_model(image_dir, tmp_path / "models").path == int8


def test_build_records_the_variant_and_queries_use_it(workdir: Path, capsys: pytest.CaptureFixture[str],
                                                       image_dir: Path) -> None:
    fp32, int8 = int8_pair(workdir / "models", image_dir)
    assert main(["build", str(image_dir), "--precision", "int8", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "models/photos-int8.onnx (trained on" in next(x for x in out.splitlines() if x.startswith("model "))
    assert "precision   int8: int8 as asked; its int8 sibling photos-int8.onnx is verified" in out
    collection = workdir / "indexes" / "photos"
    with Collection.open(collection, device="cpu") as col:
        assert col.manifest["model"]["props"]["moco.precision"] == "int8"
        assert col.manifest["model"]["sha256"] == sha256_file(int8)
        assert sha256_file(collection / col.manifest["model_file"]) == sha256_file(int8)  # its own copy
    assert main(["info", str(collection)]) == 0
    assert "precision   int8 (top-10 overlap with fp32 0.970 on 240 images (need >= 0.85): passed)" in \
        capsys.readouterr().out
    # a given model is used as it is, whatever the CPU
    assert main(["build", str(image_dir), "--model", str(fp32), "--out", "fp", "--device", "cpu", "--no-progress"]) == 0
    assert "precision   fp32: given with --model" in capsys.readouterr().out


def test_an_int8_request_without_a_sibling_is_one_line(workdir: Path, capsys: pytest.CaptureFixture[str],
                                                        image_dir: Path) -> None:
    trained(workdir / "models" / "photos.onnx", image_dir)
    assert main(["build", str(image_dir), "--precision", "int8", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--precision int8: models/photos.onnx has no usable int8 variant" in err
    assert not (workdir / "indexes").exists()


def test_a_pair_renamed_together_still_matches(tmp_path: Path, image_dir: Path) -> None:
    fp32, int8 = int8_pair(tmp_path, image_dir)
    fp32 = fp32.rename(tmp_path / "flowers.onnx")
    int8 = int8.rename(tmp_path / "flowers-int8.onnx")  # still records "photos.onnx": the bytes decide
    assert models.choose_variant(fp32, device="cpu", cpu_flags=VNNI).path == int8
    assert models.choose_variant(int8, precision="fp32", device="cpu").path == fp32
    assert models.choose_model(image_dir, candidates=[int8, fp32]).path == fp32
