"""A model's recorded training quality (`moco.quality`): read from props, worded once, carried by
the collection, printed by `indexer info` and `indexer build`; a missing or damaged record reads
as "not measured" and never breaks anything."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from indexer import quality
from indexer.__main__ import main
from indexer.build import build
from indexer.collection import Collection

from .conftest import make_model

MONITOR = "weighted kNN (k 200, T 0.1), 600 bank / 600 query images of digits"


def record(verdict: str = "learned", start: float | None = 0.243, end: float | None = 0.471,
           shipped: str = "final", shipped_score: float | None = 0.471, **extra: Any) -> dict[str, Any]:
    """A quality dict as the trainer writes it (moco.checkpoint's contract)."""
    best = max((v for v in (start, end) if v is not None), default=None)
    return {"metric": "knn_top1", "monitor": MONITOR, "start": start, "start_step": 0, "end": end,
            "end_step": 120, "best": best, "best_step": 120 if best == end else 0, "shipped": shipped,
            "shipped_score": shipped_score, "verdict": verdict,
            "reason": f"kNN {start} at the random start, {end} at the end", **extra}


def damaged(**changes: Any) -> str:
    """A stored record with some fields wrong."""
    return json.dumps({**record(), **changes})


NOT_LEARNED = record("not_learned", start=0.433, end=0.385, shipped="start", shipped_score=0.433)


def test_learned_record_reads_and_summarises() -> None:
    measured = quality.parse(quality.to_prop(record()))
    assert measured.verdict == "learned" and measured.measured and not measured.doubtful
    assert (measured.start, measured.shipped_score, measured.monitor) == (0.243, 0.471, MONITOR)
    assert measured.summary() == ("kNN top-1 on the training monitor: learned: 0.243 -> 0.471 "
                                  "(random start -> shipped)")
    assert measured.doubt() == ""
    assert ("random start", "0.243 (step 0)") in measured.figures()
    assert ("shipped", "0.471 (final)") in measured.figures()


def test_not_learned_record_is_doubtful_and_says_what_shipped() -> None:
    measured = quality.parse(quality.to_prop(NOT_LEARNED))
    assert measured.doubtful
    assert measured.summary() == ("kNN top-1 on the training monitor: random start 0.433, shipped 0.433 "
                                  "(the random start; final 0.385): not better than the random start")
    assert "untrained random network" in measured.doubt()
    worse = quality.from_record(record("not_learned", start=0.433, end=0.385, shipped="final", shipped_score=0.385))
    assert worse.summary().endswith("shipped 0.385: not better than the random start")
    assert "no better than" in worse.doubt()


def test_a_learned_verdict_contradicted_by_its_scores_is_not_trusted() -> None:
    measured = quality.from_record(record("learned", start=0.5, end=0.4, shipped_score=0.4))
    assert measured.doubtful


def test_unmeasured_record_gives_its_reason() -> None:
    text = quality.to_prop(record("unmeasured", start=None, end=None, shipped_score=None, monitor="none",
                                  reason="no --val folder was given, so the run was not measured"))
    measured = quality.parse(text)
    assert not measured.measured and not measured.doubtful
    assert measured.summary() == "not measured: no --val folder was given, so the run was not measured"
    assert measured.monitor == ""  # the trainer's "none" is not shown as a monitor


@pytest.mark.parametrize(("text", "detail"), [
    (None, "records no quality"),
    ("", "cannot be read"),
    ("{not json", "cannot be read"),
    ("[1, 2]", "not an object"),
    (damaged(verdict="great"), "verdict 'great'"),
    (damaged(start=1.5), "start is 1.5"),
    (damaged(start="0.4"), "start is '0.4'"),
    (damaged(start=True), "start is True"),
    (damaged(end_step=-3), "end_step is -3"),
    (damaged(shipped="middle"), "shipped 'middle'"),
    (damaged(reason=["a"]), "reason is"),
    ("[" * 100_000, "cannot be read"),
])
def test_missing_or_malformed_record_reads_as_unmeasured(text: str | None, detail: str) -> None:
    measured = quality.parse(text)
    assert measured.verdict == "unmeasured" and not measured.doubtful
    assert detail in measured.reason
    assert "\n" not in measured.summary()


def test_non_finite_scores_are_stored_as_not_measured() -> None:
    text = quality.to_prop(record(end=math.nan))
    assert "NaN" not in text
    assert quality.parse(text).end is None


def test_reason_and_monitor_stay_on_one_line() -> None:
    measured = quality.from_record(record("unmeasured", reason="line one\nline two", monitor="a\nb"))
    assert measured.summary() == "not measured: line one line two" and measured.monitor == "a b"


# -- the collection and the command line ---------------------------------------------------------


def _collection(tmp_path: Path, image_dir: Path, props: dict[str, str] | None) -> Path:
    model = make_model(tmp_path / "m.onnx", props=props)
    out = tmp_path / "col"
    build(image_dir, out, model=model, device="cpu", progress=False).close()
    return out


def test_collection_carries_the_models_quality(tmp_path: Path, image_dir: Path) -> None:
    out = _collection(tmp_path, image_dir, {quality.PROP: quality.to_prop(NOT_LEARNED)})
    with Collection.open(out) as col:
        assert col.quality.doubtful and col.quality.start == 0.433
    plain = _collection(tmp_path / "old", image_dir, None)  # a model exported before the record
    with Collection.open(plain) as col:
        assert col.quality.verdict == "unmeasured" and "records no quality" in col.quality.reason


def test_info_prints_quality_and_json_includes_it(tmp_path: Path, image_dir: Path, capsys) -> None:
    out = _collection(tmp_path, image_dir, {quality.PROP: quality.to_prop(record())})
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quality     kNN top-1 on the training monitor: learned: 0.243 -> 0.471" in text
    assert f"monitor     {MONITOR}" in text
    assert main(["info", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quality"]["verdict"] == "learned" and data["quality"]["doubtful"] is False
    assert data["quality"]["shipped_score"] == 0.471
    assert data["model"]["props"][quality.PROP] == quality.to_prop(record())  # the manifest itself is kept


def test_build_prints_quality_and_warns_when_doubtful(tmp_path: Path, image_dir: Path, capsys) -> None:
    model = make_model(tmp_path / "bad.onnx", props={quality.PROP: quality.to_prop(NOT_LEARNED)})
    assert main(["build", str(image_dir), "--model", str(model), "--out", str(tmp_path / "c"),
                 "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "quality     kNN top-1 on the training monitor: random start 0.433" in captured.out
    warning = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "untrained random network" in warning[0]

    good = make_model(tmp_path / "good.onnx", props={quality.PROP: quality.to_prop(record())})
    assert main(["build", str(image_dir), "--model", str(good), "--out", str(tmp_path / "d"),
                 "--device", "cpu", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "learned: 0.243 -> 0.471" in captured.out and "warning" not in captured.err
