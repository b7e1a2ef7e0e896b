"""How good a model measured itself to be when it was trained, read from its ``moco.quality``.

The trainer's kNN monitor scores the network at its random start and at the end; the exporter
stores that record in the ONNX model as ``moco.quality`` (compact JSON), the indexer copies the
model's props into the collection's manifest, and every reader (``exports info``, ``indexer
info``/``build``, every app page) shows it through this one module. Why: a short training can
end *below* its random start (the demo once did: 0.385 against 0.433), and without the record a
page would show its results as if the training had worked.

Torch-free and dependency-free (part of the torch-free base of :mod:`indexer`, so the exporter
words its line exactly as the app does). A missing or damaged record is never an error: it
reads as "not measured", with the reason.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["PROP", "ModelQuality", "from_props", "from_record", "parse", "to_prop", "unmeasured"]

PROP = "moco.quality"
"""The model metadata key (Contract 2) that holds the record."""

VERDICTS = ("learned", "not_learned", "unmeasured")
SHIPPED = ("final", "best", "start")
METRIC_NAMES = {"knn_top1": "kNN top-1"}
NOT_RECORDED = "the model records no quality (exported before quality was recorded, or not by python -m exports)"


@dataclass(frozen=True)
class ModelQuality:
    """The trainer's record of a model's quality (the ``quality`` dict of the checkpoint).

    Scores are fractions in [0, 1]; any of them may be None (not measured). ``verdict`` is the
    trainer's: ``learned`` (better than the random start), ``not_learned``, or ``unmeasured``."""

    verdict: str
    reason: str
    metric: str = "knn_top1"
    monitor: str = ""
    start: float | None = None
    start_step: int | None = None
    end: float | None = None
    end_step: int | None = None
    best: float | None = None
    best_step: int | None = None
    shipped: str | None = None
    shipped_score: float | None = None

    @property
    def measured(self) -> bool:
        return self.verdict != "unmeasured"

    @property
    def doubtful(self) -> bool:
        """True when the model is no better than its random start: the trainer said so, or its
        own numbers show it (a record whose verdict and scores disagree is not trusted)."""
        if self.verdict == "not_learned":
            return True
        return (self.verdict == "learned" and self.start is not None and self.shipped_score is not None
                and self.shipped_score <= self.start)

    @property
    def metric_name(self) -> str:
        return METRIC_NAMES.get(self.metric, self.metric)

    def doubt(self) -> str:
        """The warning's sentence, without a full stop ("" when not doubtful)."""
        if not self.doubtful:
            return ""
        if self.shipped == "start":
            return "the model is the untrained random network its training started from (training did not beat it)"
        if self._above_start():
            return ("the model is not measurably better than the random network its training started from (its "
                    "gain is within the monitor's noise)")
        return "the model is no better than the random network its training started from"

    def _above_start(self) -> bool:
        return self.start is not None and self.shipped_score is not None and self.shipped_score > self.start

    def summary(self) -> str:
        """One line for people: the verdict with the numbers it rests on."""
        if not self.measured:
            return f"not measured: {self.reason}"
        what = f"{self.metric_name} on the training monitor"
        if self.doubtful:
            notes = ["the random start"] if self.shipped == "start" else []
            if self.shipped != "final" and self.end is not None:
                notes.append(f"final {_score(self.end)}")
            final = f" ({'; '.join(notes)})" if notes else ""
            verdict = "not measurably better than" if self._above_start() else "not better than"
            return (f"{what}: random start {_score(self.start)}, shipped {_score(self.shipped_score)}{final}: "
                    f"{verdict} the random start")
        return f"{what}: learned: {_score(self.start)} -> {_score(self.shipped_score)} (random start -> shipped)"

    def figures(self) -> list[tuple[str, str]]:
        """The numbers for a table: (what, value), those measured only."""
        rows = [("random start", self.start, self.start_step), ("final", self.end, self.end_step),
                ("best", self.best, self.best_step)]
        out = [(name, f"{_score(value)} (step {step})" if step is not None else _score(value))
               for name, value, step in rows if value is not None]
        if self.shipped_score is not None:
            out.append(("shipped", f"{_score(self.shipped_score)} ({self.shipped or '?'})"))
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the derived ``doubtful`` and ``summary`` for scripts."""
        return {**asdict(self), "doubtful": self.doubtful, "summary": self.summary()}


def _score(value: float | None) -> str:
    return "?" if value is None else f"{value:.3f}"


def unmeasured(reason: str) -> ModelQuality:
    return ModelQuality("unmeasured", reason)


class _Malformed(ValueError):
    pass


def _fraction(record: Mapping[str, Any], key: str) -> float | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise _Malformed(f"{key} is {value!r}, not a score between 0 and 1")
    return float(value)


def _step(record: Mapping[str, Any], key: str) -> int | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Malformed(f"{key} is {value!r}, not a step number")
    return value


def _text(record: Mapping[str, Any], key: str, default: str = "") -> str:
    value = record.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _Malformed(f"{key} is {value!r}, not text")
    return " ".join(value.split())  # one line, whatever the record holds


def from_record(record: Any) -> ModelQuality:
    """The checkpoint's ``quality`` dict as a :class:`ModelQuality`; ValueError when malformed."""
    if not isinstance(record, Mapping):
        raise _Malformed(f"it is {type(record).__name__}, not an object")
    verdict = record.get("verdict")
    if verdict not in VERDICTS:
        raise _Malformed(f"verdict {verdict!r} is none of {', '.join(VERDICTS)}")
    shipped = record.get("shipped")
    if shipped is not None and shipped not in SHIPPED:
        raise _Malformed(f"shipped {shipped!r} is none of {', '.join(SHIPPED)}")
    return ModelQuality(
        verdict=verdict, reason=_text(record, "reason") or ("no reason given" if verdict == "unmeasured" else ""),
        metric=_text(record, "metric", "knn_top1") or "knn_top1",
        monitor="" if _text(record, "monitor") == "none" else _text(record, "monitor"),
        start=_fraction(record, "start"), start_step=_step(record, "start_step"),
        end=_fraction(record, "end"), end_step=_step(record, "end_step"),
        best=_fraction(record, "best"), best_step=_step(record, "best_step"),
        shipped=shipped, shipped_score=_fraction(record, "shipped_score"))


def parse(text: str | None) -> ModelQuality:
    """``moco.quality`` as stored; missing or unreadable -> "unmeasured" with the reason (never raises)."""
    if text is None:
        return unmeasured(NOT_RECORDED)
    try:
        return from_record(json.loads(text))
    except (ValueError, RecursionError) as exc:  # json.JSONDecodeError and _Malformed are ValueErrors
        detail = " ".join(str(exc).split())[:160]
        return unmeasured(f"the model's {PROP} cannot be read ({detail})")


def from_props(props: Mapping[str, str]) -> ModelQuality:
    """The quality a model's metadata props record (a collection's manifest keeps them)."""
    return parse(props.get(PROP))


def to_prop(record: Mapping[str, Any]) -> str:
    """The compact JSON the exporter stores as ``moco.quality`` (a score that is not a finite
    number, which JSON cannot hold, is stored as null: not measured)."""
    clean = {key: None if isinstance(value, float) and not math.isfinite(value) else value
             for key, value in record.items()}
    return json.dumps(clean, separators=(",", ":"), sort_keys=True, allow_nan=False)
