"""What the Few-label page computes and draws, kept out of the page so it can be tested and reused.

Two questions, one module. *Evaluation*: "if I label only a few images per folder, how well are
the others sorted?" (folder labels as the truth, :func:`indexer.fewlabel.few_label_predictions`).
*Interactive*: "sort my collection from the few labels I type" (user labels stored in the
collection, :func:`indexer.fewlabel.classify_with_confidence`).

The numbers come from :mod:`indexer.fewlabel`, built on the classifiers of
:mod:`indexer.analysis` (the same code as ``moco eval`` and ``indexer eval``), so the page and
the command line agree. Results are behind ``st.cache_data`` keyed by the collection's
directory, its generation and the settings: a rerun (any click on the page) redraws from the
cache instead of retraining classifiers. The collection argument is ``_collection`` so that
Streamlit does not hash it (the key already names it).
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import numpy.typing as npt
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app import markup, state
from indexer import fewlabel, selection
from indexer.collection import Collection
from indexer.fewlabel import CurvePoint, FewLabelRun, LabelBudget, has_label
from indexer.quality import ModelQuality

CLASSIFIER_NAMES = {"knn": "weighted kNN", "logreg": "logistic regression", "label_propagation": "label propagation"}
INTERACTIVE_CLASSIFIERS = ("knn", "logreg")  # label propagation needs a graph per change: too slow to click through
PER_CLASS_STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
FRACTIONS = (0.01, 0.1)
# LabelSpreading builds an exact kNN graph over every image: ~3 minutes at 60k rows on two
# cores, times seeds and budgets for a curve. Beyond this many images it is not offered.
LABEL_PROPAGATION_MAX_ITEMS = 20_000
CSV_COLUMNS = ("path", "predicted_label", "confidence", "user_label")

IntArray = npt.NDArray[np.int64]


# ---------------------------------------------------------------------------------------------
# Labels of the collection
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderLabels:
    """The items with a folder label, as rows of ``collection.vectors`` and class ids."""

    rows: IntArray  # row of collection.vectors (and of the item table)
    y: IntArray  # class id, index into classes
    classes: tuple[str, ...]
    item_ids: IntArray

    def class_sizes(self) -> IntArray:
        return np.bincount(self.y, minlength=len(self.classes)).astype(np.int64)


def folder_labels(frame: pd.DataFrame) -> FolderLabels:
    """Folder labels from the item table (columns id, label, in the order of the vectors)."""
    mask = np.array([has_label(v) for v in frame["label"]], dtype=bool)
    names = frame["label"].to_numpy(dtype=object)[mask]
    classes = tuple(sorted(set(names)))
    lookup = {name: i for i, name in enumerate(classes)}
    y = np.array([lookup[n] for n in names], dtype=np.int64)
    return FolderLabels(np.flatnonzero(mask).astype(np.int64), y, classes,
                        frame["id"].to_numpy(dtype=np.int64)[mask])


def budgets_for(class_sizes: Sequence[int]) -> list[LabelBudget]:
    """The label budgets worth offering: per-class counts that leave every class something to
    test on (smaller than the smallest class), then 1% and 10%."""
    smallest = min(class_sizes) if len(class_sizes) else 0
    per_class = [LabelBudget(per_class=n) for n in PER_CLASS_STEPS if n < smallest]
    return per_class + [LabelBudget(fraction=f) for f in FRACTIONS]


def labelled_count(budget: LabelBudget, class_sizes: Sequence[int]) -> int:
    """How many images a budget labels (what :meth:`LabelBudget.sample` would draw)."""
    if budget.per_class is not None:
        return int(sum(min(budget.per_class, n) for n in class_sizes))
    return int(sum(max(1, round(budget.fraction * n)) for n in class_sizes))  # type: ignore[operator]


def distinct_budgets(budgets: Sequence[LabelBudget], class_sizes: Sequence[int]) -> list[LabelBudget]:
    """Budgets that label different numbers of images, sorted by that number: on a small
    collection 1% and 10% both mean one image per class, and a curve should show that once."""
    seen: dict[int, LabelBudget] = {}
    for budget in budgets:
        seen.setdefault(labelled_count(budget, class_sizes), budget)
    return [seen[n] for n in sorted(seen)]


def classifiers_for(n_items: int) -> list[str]:
    names = ["knn", "logreg", "label_propagation"]
    return names if n_items <= LABEL_PROPAGATION_MAX_ITEMS else names[:2]


def user_labels_by_row(collection: Collection, frame: pd.DataFrame) -> dict[int, str]:
    """The people's labels of the items indexed now (a label of a removed file is kept in the
    collection, in case the file comes back, but plays no part here), by row."""
    stored = collection.user_labels()
    return {row: stored[path] for row, path in enumerate(frame["path"]) if path in stored}


# ---------------------------------------------------------------------------------------------
# Evaluation with folder labels
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """Per-seed runs of one classifier at one budget, over the folder-labelled items."""

    classes: tuple[str, ...]
    item_ids: IntArray  # per folder-labelled row; runs index these rows
    runs: tuple[FewLabelRun, ...]

    @property
    def accuracies(self) -> list[float]:
        return [run.accuracy for run in self.runs]

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))

    @property
    def confusion(self) -> IntArray:
        """Pooled over seeds, so the matrix shows every seed's mistakes, not one lucky draw's."""
        n = len(self.classes)
        return sum((fewlabel.confusion_matrix(r.truth, r.pred, n) for r in self.runs), np.zeros((n, n), np.int64))


@st.cache_data(max_entries=32, show_spinner=False)
def evaluate(_collection: Collection, directory: str, generation: int, classifier: str, per_class: int | None,
             fraction: float | None, n_seeds: int) -> Evaluation:
    labels = folder_labels(state.item_table(_collection).frame)
    runs = fewlabel.few_label_predictions(
        _collection.vectors[labels.rows], labels.y, budget=LabelBudget(per_class, fraction),
        seeds=tuple(range(n_seeds)), classifier=classifier)  # type: ignore[arg-type]
    return Evaluation(labels.classes, labels.item_ids, tuple(runs))


@st.cache_data(max_entries=16, show_spinner=False)
def curve(_collection: Collection, directory: str, generation: int, classifiers: tuple[str, ...],
          n_seeds: int) -> list[CurvePoint]:
    labels = folder_labels(state.item_table(_collection).frame)
    sizes = labels.class_sizes().tolist()
    return fewlabel.accuracy_curve(
        _collection.vectors[labels.rows], labels.y, budgets=distinct_budgets(budgets_for(sizes), sizes),
        classifiers=classifiers, seeds=tuple(range(n_seeds)))  # type: ignore[arg-type]


SELECTION_MAX_ITEMS = 5000
"""The labelling replay runs on a seeded sample of at most this many labelled images: each of its
rounds refits k-means and a classifier, and the comparison of strategies needs no more."""
SELECTION_ROUNDS = (1, 2, 5, 10)
STRATEGY_NAMES = {"random": "random picks", "kmeans": "k-means centres",
                  "active": "active (k-means centres, then uncertainty + diversity)"}


@st.cache_data(max_entries=8, show_spinner=False)
def selection_comparison(_collection: Collection, directory: str, generation: int,
                         n_seeds: int) -> list[selection.RoundResult]:
    """Accuracy after 1, 2, 5 and 10 labels per class for each way of choosing what to label
    (:func:`indexer.selection.selection_curve`), replayed on the folder labels."""
    labels = folder_labels(state.item_table(_collection).frame)
    rows, y = labels.rows, labels.y
    if rows.size > SELECTION_MAX_ITEMS:
        keep = np.sort(np.random.default_rng(0).choice(rows.size, SELECTION_MAX_ITEMS, replace=False))
        rows, y = rows[keep], y[keep]
    rounds = tuple(r for r in SELECTION_ROUNDS if r * len(labels.classes) < rows.size)
    return selection.selection_curve(_collection.vectors[rows], y, rounds=rounds or (1,),
                                     seeds=tuple(range(n_seeds)))


def selection_figure(results: Sequence[selection.RoundResult]) -> go.Figure:
    """Accuracy versus labels per class, one line per strategy, error bars one std over seeds."""
    frame = pd.DataFrame({
        "strategy": [STRATEGY_NAMES.get(r.strategy, r.strategy) for r in results],
        "labels per class": [r.labels_per_class for r in results],
        "accuracy": [r.mean for r in results],
        "std": [r.std for r in results],
    })
    fig = px.line(frame, x="labels per class", y="accuracy", color="strategy", error_y="std", markers=True)
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])
    fig.update_layout(margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend={"orientation": "h", "y": 1.1})
    return fig


def per_class_table(evaluation: Evaluation) -> pd.DataFrame:
    """Accuracy of each class and the class it is most often mistaken for."""
    cm = evaluation.confusion
    off = cm.copy()
    np.fill_diagonal(off, 0)
    confused = [evaluation.classes[int(off[i].argmax())] if off[i].any() else "" for i in range(len(cm))]
    return pd.DataFrame({
        "class": evaluation.classes,
        "tested": cm.sum(axis=1) // max(len(evaluation.runs), 1),
        "accuracy": fewlabel.per_class_accuracy(cm),
        "most often taken for": confused,
    })


@dataclass(frozen=True)
class TrainingBaseline:
    """The random-network baseline the trainer measured, to show beside the page's accuracy.

    It is the trainer's kNN monitor on its own validation images, not this page's few-label
    accuracy on these folders: the two are different measures, so the page shows the monitor's
    random start against its shipped model (both measured the same way), never against the
    page's number."""

    random_start: float | None
    shipped: float | None
    caption: str  # markdown

    @property
    def gain(self) -> float | None:
        """Shipped minus random start, in the monitor's units (fractions)."""
        if self.random_start is None or self.shipped is None:
            return None
        return self.shipped - self.random_start


def training_baseline(measured: ModelQuality) -> TrainingBaseline:
    """What the Few labels page says about the random-network baseline of its model."""
    if not measured.measured or measured.start is None or measured.shipped_score is None:
        why = markup.md(measured.reason) if not measured.measured else "the trainer's record lacks the numbers"
        return TrainingBaseline(None, None, f"No random-network baseline was measured for this model ({why}), so "
                                "nothing says how much of the accuracy above training added.")
    start, shipped = measured.start, measured.shipped_score
    final = (f"; its final step scored {measured.end:.1%}"
             if measured.shipped != "final" and measured.end is not None else "")
    monitor = f" ({markup.md(measured.monitor)})" if measured.monitor else ""
    text = (f"Baseline measured at training time, not by this page: the trainer's {markup.md(measured.metric_name)} "
            f"monitor on its validation images{monitor} gave the random network **{start:.1%}** and the shipped "
            f"model ({markup.md(measured.shipped or '?')}) **{shipped:.1%}**{final}. ")
    if measured.doubtful:
        text += ("Training did not beat the random start: the accuracy above is about what an untrained network "
                 "gives, not what training added.")
    else:
        text += "The accuracy above is this page's own measure, so compare it with neither number directly."
    return TrainingBaseline(start, shipped, text)


@dataclass(frozen=True)
class Mistake:
    item_id: int
    truth: str
    predicted: str
    confidence: float


def mistakes(evaluation: Evaluation, limit: int) -> list[Mistake]:
    """The first seed's mistakes, most confident first: those are the surprising ones (a
    mislabelled folder, a near-duplicate across classes), the doubtful ones matter less."""
    run = evaluation.runs[0]
    wrong = np.flatnonzero(run.pred != run.truth)
    wrong = wrong[np.argsort(-run.confidence[wrong], kind="stable")][:limit]
    names = evaluation.classes
    return [Mistake(int(evaluation.item_ids[run.test[i]]), names[run.truth[i]], names[run.pred[i]],
                    float(run.confidence[i])) for i in wrong]


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def curve_figure(points: Sequence[CurvePoint]) -> go.Figure:
    """Accuracy versus labelled images, one line per classifier, error bars one std over seeds."""
    frame = pd.DataFrame({
        "classifier": [CLASSIFIER_NAMES.get(p.classifier, p.classifier) for p in points],
        "labelled images": [p.labelled for p in points],
        "accuracy": [p.mean for p in points],
        "std": [p.std for p in points],
        "budget": [p.budget.name for p in points],
    })
    fig = px.line(frame, x="labelled images", y="accuracy", color="classifier", error_y="std", markers=True,
                  hover_data={"budget": True, "std": ":.1%"}, log_x=True)
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])
    fig.update_layout(margin={"l": 10, "r": 10, "t": 30, "b": 10}, legend={"orientation": "h", "y": 1.1})
    return fig


def confusion_figure(confusion: npt.ArrayLike, classes: Sequence[str]) -> go.Figure:
    """Heatmap coloured by the share of each true class (so small classes stay visible),
    annotated with the counts."""
    cm = np.asarray(confusion)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    names = [html.escape(c) for c in classes]  # plotly reads axis text as a little HTML; labels are folder names
    fig = go.Figure(go.Heatmap(
        z=share, x=names, y=names, text=cm, texttemplate="%{text}", colorscale="Blues",
        zmin=0, zmax=1, colorbar={"title": "share", "tickformat": ".0%"},
        hovertemplate="true %{y}<br>predicted %{x}<br>%{text} images (%{z:.0%})<extra></extra>"))
    fig.update_xaxes(title="predicted", type="category")
    fig.update_yaxes(title="true", type="category", autorange="reversed")
    fig.update_layout(margin={"l": 10, "r": 10, "t": 30, "b": 10})
    return fig


# ---------------------------------------------------------------------------------------------
# Interactive labelling
# ---------------------------------------------------------------------------------------------


@st.cache_data(max_entries=16, show_spinner=False)
def suggestions(_collection: Collection, directory: str, generation: int, n: int, seed: int,
                labelled: tuple[tuple[int, str], ...]) -> list[int]:
    """Item ids worth labelling next, given the (row, label) pairs so far: k-means centres until the
    labelled classes average five labels each, then the classifier's least certain images spread
    over the collection (:func:`indexer.selection.active_suggestions`)."""
    rows = np.array([r for r, _ in labelled], dtype=np.int64)
    names = sorted({name for _, name in labelled})
    classes = np.array([names.index(name) for _, name in labelled], dtype=np.int64)
    picked = selection.active_suggestions(_collection.vectors, rows, classes, n, seed=seed)
    return [int(i) for i in np.asarray(_collection.ids)[picked]]


@st.cache_data(max_entries=16, show_spinner=False)
def classify(_collection: Collection, directory: str, generation: int, labels: tuple[tuple[int, str], ...],
             method: str) -> pd.DataFrame:
    """Every item's predicted class and confidence from the user labels (row, label)."""
    frame = state.item_table(_collection).frame
    rows = np.array([r for r, _ in labels], dtype=np.int64)
    classes = sorted({name for _, name in labels})
    lookup = {name: i for i, name in enumerate(classes)}
    y = np.array([lookup[name] for _, name in labels], dtype=np.int64)
    vectors = _collection.vectors
    pred, conf = fewlabel.classify_with_confidence(vectors[rows], y, vectors, method)  # type: ignore[arg-type]
    user = np.full(len(frame), "", dtype=object)
    user[rows] = [name for _, name in labels]
    return pd.DataFrame({
        "id": frame["id"].to_numpy(),
        "path": frame["path"].to_numpy(),
        "predicted_label": np.array(classes, dtype=object)[pred],
        "confidence": conf,
        "user_label": user,
    })


def filter_predictions(frame: pd.DataFrame, classes: Iterable[str], min_confidence: float) -> pd.DataFrame:
    """Rows predicted as one of ``classes`` (all when empty) with at least ``min_confidence``."""
    wanted = list(classes)
    keep = frame["confidence"] >= min_confidence
    if wanted:
        keep &= frame["predicted_label"].isin(wanted)
    return frame[keep]


def predictions_csv(frame: pd.DataFrame) -> bytes:
    return frame.loc[:, list(CSV_COLUMNS)].to_csv(index=False, float_format="%.4f").encode("utf-8")


class LabelCsvError(ValueError):
    """An uploaded label file that cannot be read; the message is one line for the page."""


def parse_label_csv(data: bytes) -> list[tuple[str, str]]:
    """(path, label) pairs from a CSV with a header naming ``path`` and ``label`` (any order,
    any case, other columns ignored); rows with an empty path or label are skipped."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise LabelCsvError("the file is not UTF-8 text (save it as CSV UTF-8)") from exc
    if "\x00" in text:
        raise LabelCsvError("the file is binary, not a CSV")
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise LabelCsvError(f"not a readable CSV ({exc})") from exc
    if not rows:
        raise LabelCsvError("the file is empty")
    header = [h.strip().lower() for h in rows[0]]
    if "path" not in header or "label" not in header:
        raise LabelCsvError(f"the header must name the columns path and label (found: {', '.join(header) or 'none'})")
    p, lab = header.index("path"), header.index("label")
    width = max(p, lab) + 1
    pairs = [(r[p].strip(), r[lab].strip()) for r in rows[1:] if len(r) >= width]
    return [(path, label) for path, label in pairs if path and label]


def normalise_path(path: str, image_root: Path) -> str:
    """The collection's form of a path: relative to the image root, forward slashes (so files
    written on Windows or with absolute paths still match)."""
    text = path.replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        try:
            return Path(text).resolve().relative_to(image_root.resolve()).as_posix()
        except (ValueError, OSError):
            return text
    return PurePosixPath(text).as_posix().removeprefix("./")


@dataclass(frozen=True)
class ImportReport:
    saved: int
    unknown: list[str]

    def line(self) -> str:
        text = f"Imported {self.saved} label{'s' if self.saved != 1 else ''}."
        if self.unknown:
            text += (f" {len(self.unknown)} path{'s' if len(self.unknown) != 1 else ''} not in the collection "
                     f"(e.g. {self.unknown[0]}) skipped.")
        return text


def import_labels(collection: Collection, pairs: Sequence[tuple[str, str]], known: Mapping[str, object]
                  ) -> ImportReport:
    """Store the labels of known paths in the collection; the others are reported, not guessed."""
    found: dict[str, str | None] = {}
    unknown = []
    for raw, label in pairs:
        path = normalise_path(raw, collection.image_root)
        if path in known:
            found[path] = label
        else:
            unknown.append(raw)
    collection.set_user_labels(found)
    return ImportReport(len(found), unknown)
