"""What a run ships: never a model worse than the one it started from, by its own monitor.

A short or unlucky run (a small time budget on a busy machine, a learning rate too high) can
leave a backbone worse than its random initialisation: issue 17 saw the demo's kNN monitor fall
from 0.433 to 0.385 in a 10-step run. So the trainer measures the network before any training
step changes it, keeps a CPU copy of it and of the best network the monitor sees, and at every
checkpoint decides which of them ships:

- `learned`: the best score beats the start by more than the monitor's noise (`noise_margin`).
  The final weights ship unless the best is clearly (beyond the noise) better than them; then
  the best ones ship.
- `not_learned`: nothing beat the start by more than the noise. When nothing scored above the
  start at all, the start weights ship; when something did (within the noise), the trained
  weights ship as above, since by the monitor they are at least as good. Either way the reason
  says so in one plain sentence (the console, the checkpoint, the exported model, the app).
- `unmeasured`: no monitor (no --val): the final weights ship, and the reason says so.

`QualityTracker` holds the scores and copies; `quality` dicts are what `moco.checkpoint` stores
(`state["quality"]`, read by exports through `moco.checkpoint.quality_of`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

METRIC = "knn_top1"

NOISE_STANDARD_ERRORS = 2.0
"""A gain counts as learning when it exceeds two standard errors of the start's top-1, a
proportion over the monitor's query images: sqrt(p(1-p)/n). With 1,000 queries at p = 0.3 that
is 0.029; two networks scored on the same queries differ by less noise than two independent
samples, so this errs on the side of calling a run not learned (and shipping the start)."""

NOISE_FLOOR = 0.01
"""...and at least one point of top-1, whatever the number of queries."""


def noise_margin(score: float, queries: int) -> float:
    """How much a top-1 over `queries` images must rise above `score` to count as a real gain."""
    p = min(max(score, 0.0), 1.0)
    return max(NOISE_FLOOR, NOISE_STANDARD_ERRORS * math.sqrt(p * (1 - p) / max(1, queries)))


def cpu_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict (weights and batch-norm statistics)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def unmeasured(reason: str) -> dict[str, Any]:
    """The quality of a run without a monitor: the final weights ship, unjudged."""
    return {"metric": METRIC, "monitor": "none", "start": None, "start_step": 0, "end": None, "end_step": 0,
            "best": None, "best_step": None, "shipped": "final", "shipped_score": None, "verdict": "unmeasured",
            "reason": reason}


class QualityTracker:
    """The monitor's scores of one run (across resumed sessions) and the weights that may ship.

    `observe_start` takes the score of the network before training and its weights;
    `observe` each later score, copying the weights only when a new best appears. `decide(step,
    context)` gives the quality dict for a checkpoint written at `step`; `shipped_weights` the
    query encoder's state dict to ship with it (None when the final weights ship).
    `state_dict`/`load_state_dict` carry all of it through a checkpoint.
    """

    def __init__(self, monitor: str | None, queries: int) -> None:
        self.monitor, self.queries = monitor, queries
        self.start: float | None = None
        self.start_step = 0
        self.start_weights: dict[str, torch.Tensor] | None = None
        self.best: float | None = None
        self.best_step: int | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.last: float | None = None
        self.last_step: int | None = None

    @property
    def measured(self) -> bool:
        return self.monitor is not None

    @property
    def has_start(self) -> bool:
        return self.start is not None

    def margin(self) -> float:
        return noise_margin(self.start if self.start is not None else 0.5, self.queries)

    def observe_start(self, step: int, score: float, weights: dict[str, torch.Tensor]) -> None:
        self.start, self.start_step, self.start_weights = float(score), step, weights
        self.last, self.last_step = float(score), step

    def observe(self, step: int, score: float, encoder: nn.Module) -> bool:
        """A score of the current network at `step`; True (and a copy kept) when it is a new best."""
        self.last, self.last_step = float(score), step
        if self.best is not None and score <= self.best:
            return False
        self.best, self.best_step, self.best_weights = float(score), step, cpu_copy(encoder)
        return True

    def learned(self) -> bool:
        return self.start is not None and self.best is not None and self.best - self.start > self.margin()

    def decide(self, step: int, context: str) -> dict[str, Any]:
        """The quality dict for the network at `step`. `context` names the run's length in words
        for the reason ('the 150 s budget (10 steps)', '3 epochs (9 steps)')."""
        if not self.measured:
            return unmeasured("no --val folder was given, so the run was not measured; the model shipped is the "
                              "final one")
        if self.start is None:
            return {**unmeasured("the monitor had not measured the network yet; the model shipped is the current "
                                 "one"), "monitor": self.monitor}
        end = self.last if self.last_step == step else None
        margin = self.margin()
        record = {"metric": METRIC, "monitor": self.monitor, "start": self.start, "start_step": self.start_step,
                  "end": end, "end_step": step, "best": self.best, "best_step": self.best_step}
        at_end = (f"{end:.3f} at the end" if end is not None else "no trained network measured yet"
                  if self.best is None else "the current network not measured")
        if not self.learned():
            best = (f" (best {self.best:.3f} at step {self.best_step})"
                    if self.best is not None and self.best_step != step else "")
            if self.best is None or self.best <= self.start:  # nothing scored above the start: ship it
                reason = (f"kNN {self.start:.3f} at the random start, {at_end}{best}: {context} was too short or "
                          f"unsuited to learn (no gain beyond the monitor's noise of {margin:.3f}); the model "
                          "shipped is the random start")
                return {**record, "shipped": "start", "shipped_score": self.start, "verdict": "not_learned",
                        "reason": reason}
            # Above the start, within the noise: the trained weights ship (by the monitor they are at
            # least as good), and the verdict still says no gain was shown.
            final = end is not None and end >= self.start and end >= self.best - margin
            shipped, score = ("final", end) if final else ("best", self.best)
            which = "the final one" if final else f"the best one the monitor saw (step {self.best_step})"
            reason = (f"kNN {self.start:.3f} at the random start, {at_end}{best}: {context} gained no more than "
                      f"the monitor's noise of {margin:.3f}, so it is not measurably better than the random start; "
                      f"the model shipped is {which}")
            return {**record, "shipped": shipped, "shipped_score": score, "verdict": "not_learned", "reason": reason}
        assert self.best is not None
        if end is not None and end >= self.best - margin:
            reason = (f"kNN {self.start:.3f} at the random start, {end:.3f} at the end of {context}: learned; "
                      "the model shipped is the final one")
            return {**record, "shipped": "final", "shipped_score": end, "verdict": "learned", "reason": reason}
        reason = (f"kNN {self.start:.3f} at the random start, best {self.best:.3f} at step {self.best_step}, "
                  f"{at_end} of {context}: learned; the model shipped is the best one the monitor saw "
                  f"(step {self.best_step})")
        return {**record, "shipped": "best", "shipped_score": self.best, "verdict": "learned", "reason": reason}

    def shipped_weights(self, quality: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """The query encoder's weights to ship with `quality` (None: the final ones)."""
        return {"start": self.start_weights, "best": self.best_weights}.get(quality["shipped"])

    # -- through a checkpoint ------------------------------------------------------------------
    def state_dict(self, step: int) -> dict[str, Any]:
        """What a resumed session needs. The start weights are kept only while they may still
        ship (learning, once shown, stays shown: the best only rises); the best weights only
        while they are not the current network's."""
        return {"monitor": self.monitor, "queries": self.queries, "start": self.start, "start_step": self.start_step,
                "start_weights": None if self.learned() else self.start_weights,
                "best": self.best, "best_step": self.best_step,
                "best_weights": self.best_weights if self.best_step != step else None,
                "last": self.last, "last_step": self.last_step}

    def load_state_dict(self, saved: dict[str, Any], encoder: nn.Module) -> None:
        for name in ("start", "start_step", "start_weights", "best", "best_step", "best_weights", "last", "last_step"):
            setattr(self, name, saved.get(name))
        self.start_step = self.start_step or 0
        if self.best is not None and self.best_weights is None:  # the best was the network saved
            self.best_weights = cpu_copy(encoder)
