"""The trainer's quality record travels into the model: `moco.quality` in the ONNX metadata,
one line when exporting (a warning when the network is no better than its random start), and
`python -m exports info` shows it."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from exports.__main__ import main
from indexer import quality
from tests.exports.conftest import with_quality

NOT_LEARNED = {"metric": "knn_top1", "monitor": "weighted kNN (k 200, T 0.1), 24 bank / 24 query images of train",
               "start": 0.433, "start_step": 0, "end": 0.385, "end_step": 3, "best": 0.385, "best_step": 3,
               "shipped": "start", "shipped_score": 0.433, "verdict": "not_learned",
               "reason": "kNN 0.433 at the random start, 0.385 at the end: too short to learn"}
LEARNED = {**NOT_LEARNED, "start": 0.243, "end": 0.471, "best": 0.471, "shipped": "final", "shipped_score": 0.471,
           "verdict": "learned", "reason": "kNN 0.243 at the random start, 0.471 at the end: learned"}


def props_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def doubtful_export(tmp_path_factory, checkpoint) -> tuple[Path, str]:
    """A model exported from a checkpoint whose training did not beat its random start, and
    what the export printed."""
    base = tmp_path_factory.mktemp("quality")
    source = with_quality(checkpoint, base / "not-learned.pt", NOT_LEARNED)
    out = base / "not-learned.onnx"
    lines: list[str] = []
    from exports.onnx import ExportOptions, export_checkpoint

    export_checkpoint(ExportOptions(checkpoint=source, output=out, device="cpu"), log=lines.append)
    return out, "\n".join(lines)


def test_quality_round_trips_through_the_metadata(doubtful_export) -> None:
    path, _ = doubtful_export
    stored = props_of(path)[quality.PROP]
    assert json.loads(stored) == NOT_LEARNED
    assert " " not in stored.replace(NOT_LEARNED["monitor"], "").replace(NOT_LEARNED["reason"], "")  # compact
    assert quality.parse(stored).doubtful


def test_export_warns_when_not_learned(doubtful_export) -> None:
    _, printed = doubtful_export
    lines = printed.splitlines()
    assert ("quality: kNN top-1 on the training monitor: random start 0.433, shipped 0.433 (the random start; "
            "final 0.385): not better than the random start") in lines
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "untrained random network" in warnings[0]


def test_learned_export_says_so_without_warning(tmp_path, checkpoint, capsys) -> None:
    source = with_quality(checkpoint, tmp_path / "learned.pt", LEARNED)
    assert main([str(source), "-o", str(tmp_path / "m.onnx"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "quality: kNN top-1 on the training monitor: learned: 0.243 -> 0.471 (random start -> shipped)" in out
    assert "warning" not in out
    assert json.loads(props_of(tmp_path / "m.onnx")[quality.PROP])["verdict"] == "learned"


def test_checkpoint_without_a_record_exports_as_unmeasured(tmp_path, checkpoint, capsys) -> None:
    source = with_quality(checkpoint, tmp_path / "old.pt", None)
    assert main([str(source), "-o", str(tmp_path / "old.onnx"), "--device", "cpu"]) == 0
    assert "quality: not measured: " in capsys.readouterr().out
    assert quality.parse(props_of(tmp_path / "old.onnx")[quality.PROP]).verdict == "unmeasured"


def test_info_shows_quality_and_the_warning(doubtful_export, capsys) -> None:
    path, _ = doubtful_export
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "quality    kNN top-1 on the training monitor: random start 0.433" in out
    assert f"monitor    {NOT_LEARNED['monitor']}" in out
    assert any(line.startswith("warning    the model is the untrained random network") for line in out.splitlines())


def test_info_reads_a_model_exported_before_the_record(doubtful_export, tmp_path, capsys) -> None:
    """Models written before `moco.quality` existed are still described, as not measured."""
    path, _ = doubtful_export
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key != quality.PROP]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    old = tmp_path / "old.onnx"
    onnx.save(model, str(old))
    assert main(["info", str(old)]) == 0
    out = capsys.readouterr().out
    assert "quality    not measured: the model records no quality" in out and "warning" not in out
