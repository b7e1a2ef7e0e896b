"""Few-label page: how far a handful of labels goes with these embeddings, and labelling by hand.

*Evaluate* pretends only a few images per folder were labelled, classifies the rest and compares
with their folders: the number a person needs before labelling anything. *Label interactively*
suggests images spread over the space, stores the labels typed (or imported from a CSV) in the
collection, and sorts the whole collection from them. The numbers and the caches live in
:mod:`app.fewlabels`; this file only draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from app import fewlabels, markup, state
from app.components import Tile, quality_banner, tile_grid
from indexer.collection import Collection
from indexer.fewlabel import LabelBudget

EVALUATE, INTERACTIVE = "Evaluate with folder labels", "Label interactively"
MISTAKES_SHOWN = 15
SUGGESTIONS_DEFAULT = 8
COLUMNS = 4


@dataclass(frozen=True)
class View:
    """The collection this page draws, passed to each part of the page.

    ``directory`` (resolved) is the cache key of :mod:`app.fewlabels` and part of every widget
    and session key, so two collections keep two states."""

    collection: Collection
    directory: str

    @classmethod
    def of(cls, collection: Collection) -> View:
        return cls(collection, str(Path(collection.directory).resolve()))

    def key(self, name: str) -> str:
        """Widget and session keys of this page, per collection."""
        return f"fewlabels:{name}:{self.directory}"


def open_as_query(view: View, item_id: int) -> None:
    state.set_item_query(view.collection, item_id)
    st.switch_page("views/neighbours.py")


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    budget: LabelBudget
    classifier: str
    n_seeds: int
    compare: bool


def evaluation_settings(view: View, labels: fewlabels.FolderLabels) -> EvalSettings | None:
    """The form; returns the settings last submitted, None before the first Evaluate (so opening
    the page on a large collection trains nothing). They are kept in the session, not only in
    the widgets, because Streamlit forgets a widget's value while the other mode is shown."""
    budgets = fewlabels.budgets_for(labels.class_sizes().tolist())
    classifiers = fewlabels.classifiers_for(len(labels.rows))
    sizes = labels.class_sizes().tolist()
    saved: EvalSettings | None = st.session_state.get(view.key("settings"))
    if saved is None or saved.budget not in budgets or saved.classifier not in classifiers:
        saved = None
    shown = saved or EvalSettings(next((b for b in budgets if b.per_class == 5), budgets[0]), classifiers[0], 3, False)
    with st.form(view.key("eval-form"), border=False):
        left, middle, right = st.columns([2, 2, 1])
        budget = left.selectbox("Labels per class", budgets, index=budgets.index(shown.budget),
                                format_func=lambda b: f"{b.name} ({fewlabels.labelled_count(b, sizes):,} images)",
                                help="Stratified: every class gets this many (or this share of its images).")
        classifier = middle.selectbox("Classifier", classifiers, index=classifiers.index(shown.classifier),
                                      format_func=fewlabels.CLASSIFIER_NAMES.get)
        n_seeds = right.number_input("Seeds", min_value=1, max_value=10, value=shown.n_seeds,
                                     help="Each seed labels a different random subset.")
        compare = st.checkbox("Compare all classifiers on the curve", value=shown.compare)
        if st.form_submit_button("Evaluate", type="primary"):
            saved = EvalSettings(budget, classifier, int(n_seeds), bool(compare))
            st.session_state[view.key("settings")] = saved
    if len(classifiers) < 3:
        st.caption(f"Label propagation is offered up to {fewlabels.LABEL_PROPAGATION_MAX_ITEMS:,} labelled images.")
    return saved


def show_headline(evaluation: fewlabels.Evaluation, budget: LabelBudget, baseline: fewlabels.TrainingBaseline) -> None:
    """The page's accuracy and, beside it, the random-network baseline the trainer measured (its
    own kNN monitor, named as such: a different measure from the page's)."""
    runs = evaluation.runs
    accs = evaluation.accuracies
    left, right = st.columns(2)
    left.metric(f"Accuracy on the remaining images ({budget.name})", f"{evaluation.mean:.1%}",
                help="Mean over seeds of the share of unlabelled images classified into their own folder.")
    if baseline.shipped is not None and baseline.gain is not None:
        right.metric("Trainer's kNN monitor: shipped model", f"{baseline.shipped:.1%}",
                     delta=f"{100 * baseline.gain:+.1f} points vs the random network ({baseline.random_start:.1%})",
                     help="Measured at training time on the trainer's validation images, not by this page.")
    spread = f"± {evaluation.std:.1%} over {len(runs)} seeds (from {min(accs):.1%} to {max(accs):.1%})" \
        if len(runs) > 1 else "one seed"
    st.caption(f"{spread}; {runs[0].train.size:,} images labelled, {runs[0].test.size:,} classified per seed.")
    st.caption(baseline.caption)


def show_curve(view: View, classifiers: tuple[str, ...], n_seeds: int) -> None:
    st.subheader("Accuracy versus labels")
    with st.spinner("Computing the curve…"):
        points = fewlabels.curve(view.collection, view.directory, view.collection.generation, classifiers, n_seeds)
    if points:
        st.plotly_chart(fewlabels.curve_figure(points), key=view.key("curve"))
        st.caption("Error bars: one standard deviation over seeds. Budgets: "
                   + ", ".join(dict.fromkeys(p.budget.name for p in points)) + ".")


def show_selection(view: View, n_seeds: int) -> None:
    """How much the choice of images to label matters: the interactive mode's suggestions against
    random picks, replayed round by round on the folder labels (on request: it refits per round)."""
    st.subheader("Which images to label")
    st.caption("Replays labelling rounds (one image per class each) with the folder labels: random picks, "
               "k-means centres, and the interactive mode's suggestions (k-means first, then the images the "
               "classifier is least sure of, spread out). Accuracy of the weighted kNN on the images not labelled.")
    if not st.toggle("Compare the ways of choosing", key=view.key("compare-selection")):
        return
    with st.spinner("Replaying labelling rounds…"):
        results = fewlabels.selection_comparison(view.collection, view.directory, view.collection.generation,
                                                 n_seeds)
    st.plotly_chart(fewlabels.selection_figure(results), key=view.key("selection"))
    st.caption(f"Error bars: one standard deviation over {n_seeds} seeds; at most "
               f"{fewlabels.SELECTION_MAX_ITEMS:,} images (a seeded sample).")


def show_classes(view: View, evaluation: fewlabels.Evaluation) -> None:
    """The matrix, then the table, each the page's full width: side by side, a table of four
    columns with folder names needed a horizontal scroll, and a matrix of many classes is cramped."""
    st.subheader("Confusion matrix")
    st.plotly_chart(fewlabels.confusion_figure(evaluation.confusion, evaluation.classes), key=view.key("confusion"),
                    width="stretch")
    st.caption("Counts summed over seeds; colour = share of the true class.")
    st.subheader("Per class")
    st.dataframe(fewlabels.per_class_table(evaluation), hide_index=True, width="stretch", column_config={
        "class": st.column_config.TextColumn("class", width="medium"),
        "tested": st.column_config.NumberColumn("tested / seed", width="small",
                                                help="Images classified per seed (those not labelled)."),
        "accuracy": st.column_config.ProgressColumn("accuracy", format="percent", min_value=0, max_value=1,
                                                    width="medium"),
        "most often taken for": st.column_config.TextColumn("most often taken for", width="medium")})


def show_mistakes(view: View, evaluation: fewlabels.Evaluation) -> None:
    found = fewlabels.mistakes(evaluation, MISTAKES_SHOWN)
    st.subheader("Mistakes")
    if not found:
        st.caption("No mistakes with the first seed.")
        return
    wrong = int((evaluation.runs[0].pred != evaluation.runs[0].truth).sum())
    st.caption(f"First seed: {wrong:,} wrong; the most confident mistakes first.")
    tiles = [Tile(m.item_id, [f"true **{markup.md(m.truth)}**",
                              f"predicted **{markup.md(m.predicted)}** ({m.confidence:.0%})"])
             for m in found]
    clicked = tile_grid(view.collection, tiles, key=view.key("mistakes"), columns=5)
    if clicked is not None:
        open_as_query(view, clicked)


def evaluation_mode(view: View, labels: fewlabels.FolderLabels) -> None:
    settings = evaluation_settings(view, labels)
    if settings is None:
        st.caption("Choose a budget and a classifier, then press Evaluate.")
        return
    budget = settings.budget
    try:
        with st.spinner("Training on the few labels…"):
            evaluation = fewlabels.evaluate(view.collection, view.directory, view.collection.generation,
                                            settings.classifier, budget.per_class, budget.fraction, settings.n_seeds)
    except ValueError as exc:
        st.error(f"Cannot evaluate: {markup.md(exc)}")
        return
    show_headline(evaluation, budget, fewlabels.training_baseline(view.collection.quality))
    chosen = tuple(fewlabels.classifiers_for(len(labels.rows))) if settings.compare else (settings.classifier,)
    show_curve(view, chosen, settings.n_seeds)
    show_selection(view, settings.n_seeds)
    show_classes(view, evaluation)
    show_mistakes(view, evaluation)


# ---------------------------------------------------------------------------------------------
# Interactive labelling
# ---------------------------------------------------------------------------------------------


def import_csv(view: View, frame: pd.DataFrame) -> None:
    """Labels from a CSV (path,label). Each upload is imported once: the uploader keeps its file
    across reruns, so its id is remembered."""
    with st.expander("Import labels from a CSV"):
        upload = st.file_uploader("CSV with the columns path and label", type=["csv"], key=view.key("csv"))
        if upload is None:
            return
        done = view.key("csv-done")
        if st.session_state.get(done, (None, ""))[0] != upload.file_id:
            try:
                pairs = fewlabels.parse_label_csv(upload.getvalue())
            except fewlabels.LabelCsvError as exc:
                message = f"error:Cannot import {upload.name}: {exc}"
            else:
                report = fewlabels.import_labels(view.collection, pairs, dict.fromkeys(frame["path"]))
                message = ("ok:" if report.saved else "warning:") + report.line()
            st.session_state[done] = (upload.file_id, message)
        kind, _, text = st.session_state[done][1].partition(":")
        {"error": st.error, "warning": st.warning}.get(kind, st.success)(markup.md(text))


def label_suggestions(view: View, frame: pd.DataFrame, labelled: dict[int, str]) -> None:
    st.subheader("Label these")
    left, right = st.columns([1, 3], vertical_alignment="bottom")
    n = int(left.number_input("How many", min_value=1, max_value=40, value=SUGGESTIONS_DEFAULT, key=view.key("n")))
    if right.button("Other suggestions", key=view.key("reshuffle")):
        st.session_state[view.key("round")] = st.session_state.get(view.key("round"), 0) + 1
    ids = suggested_grid(view, n, labelled)
    if not ids:
        st.caption("Every image has a label.")
        return
    known = sorted(set(labelled.values()))
    how = ("The images the classifier trained on your labels is least sure of, spread over the collection "
           "(uncertainty with diversity): each label there teaches it most. " if len(known) >= 2 else
           "One image per region of the embedding space, regions without labels first. ")
    st.caption(how
               + (f"Labels so far: {markup.md(', '.join(known))}. " if known
                  else "Type a label under each (or leave it empty). ")
               + "Nothing is stored until you press Save labels.")
    table = state.item_table(view.collection)
    # Enter does not submit: a submit saves and brings the next suggestions, and a grid that
    # changes while a person types under it puts the next label beside another image.
    with st.form(view.key("label-form"), border=False, enter_to_submit=False):
        for start in range(0, len(ids), COLUMNS):
            for cell, item_id in zip(st.columns(COLUMNS), ids[start:start + COLUMNS]):
                with cell:
                    thumb = view.collection.thumbnail(item_id)
                    if thumb is not None:
                        st.image(thumb, width="stretch")
                    st.caption(markup.md(table.row(item_id)["path"]))
                    st.text_input("Label", key=view.key(f"label:{item_id}"), placeholder="label",
                                  label_visibility="collapsed")
        submitted = st.form_submit_button("Save labels", type="primary")
    if submitted:
        save_typed(view, ids, table)


def suggested_grid(view: View, n: int, labelled: dict[int, str]) -> list[int]:
    """The images to label, held in the session until the person asks for others ("Other
    suggestions", another count, Save labels) or the collection changes. Why: suggestions depend
    on the labels, and a grid recomputed on a rerun (a CSV import, another widget) would move the
    images while a person types under them; each box is keyed by its item id, so a label stays
    with its image, but the person must also still see that image beside the box."""
    wanted = (view.collection.generation, n, int(st.session_state.get(view.key("round"), 0)))
    held = st.session_state.get(view.key("grid"))
    if held is None or held[0] != wanted:
        with st.spinner("Choosing the images to label next…"):
            ids = fewlabels.suggestions(view.collection, view.directory, wanted[0], n, wanted[2],
                                        tuple(sorted(labelled.items())))
        held = (wanted, tuple(ids))
        st.session_state[view.key("grid")] = held
    return list(held[1])


def save_typed(view: View, ids: list[int], table: state.ItemTable) -> None:
    typed = {str(table.row(item_id)["path"]): str(st.session_state.get(view.key(f"label:{item_id}")) or "").strip()
             for item_id in ids}
    typed = {path: text for path, text in typed.items() if text}
    view.collection.set_user_labels(typed)
    if typed:  # the next suggestions leave out what was just labelled
        st.session_state.pop(view.key("grid"), None)
    saved = len(typed)
    st.session_state[view.key("flash")] = f"Saved {saved} label{'s' if saved != 1 else ''}." if saved \
        else "Nothing to save: type a label under an image first."
    st.rerun()


def show_labels(labelled: dict[int, str]) -> None:
    if not labelled:
        return
    counts = pd.Series(list(labelled.values())).value_counts()
    st.caption("Your labels: " + ", ".join(f"{markup.md(name)} ({count})" for name, count in counts.items()))


def classification(view: View, frame: pd.DataFrame, labelled: dict[int, str]) -> None:
    st.subheader("The whole collection")
    if len(set(labelled.values())) < 2:
        st.info("Label images of at least two classes to classify the whole collection.")
        return
    method = st.selectbox("Classifier", fewlabels.INTERACTIVE_CLASSIFIERS, key=view.key("method"),
                          format_func=fewlabels.CLASSIFIER_NAMES.get)
    with st.spinner("Classifying…"):
        predictions = fewlabels.classify(view.collection, view.directory, view.collection.generation,
                                         tuple(sorted(labelled.items())), method)
    left, right = st.columns([3, 2])
    classes = left.multiselect("Predicted class", sorted(set(labelled.values())), key=view.key("classes"),
                               placeholder="all classes")
    minimum = right.slider("Minimum confidence", 0.0, 1.0, 0.0, 0.05, key=view.key("min-conf"))
    shown = fewlabels.filter_predictions(predictions, classes, minimum)
    st.caption(f"{len(shown):,} of {len(predictions):,} images. Confidence: the predicted class's share of the "
               "kNN votes, or its probability.")
    st.dataframe(shown.drop(columns=["id"]), hide_index=True, column_config={
        "confidence": st.column_config.ProgressColumn("confidence", format="percent", min_value=0, max_value=1)})
    st.download_button("Download CSV", fewlabels.predictions_csv(shown), key=view.key("download"),
                       file_name=f"{Path(view.directory).name}-predictions.csv", mime="text/csv", on_click="ignore")


def interactive_mode(view: View) -> None:
    frame = state.item_table(view.collection).frame
    import_csv(view, frame)
    flash = st.session_state.pop(view.key("flash"), None)
    if flash:
        st.success(flash)
    labelled = fewlabels.user_labels_by_row(view.collection, frame)
    show_labels(labelled)
    label_suggestions(view, frame, labelled)
    classification(view, frame, labelled)


# ---------------------------------------------------------------------------------------------
# Page
# ---------------------------------------------------------------------------------------------


def render() -> None:
    """Draw the page. Streamlit runs this file as ``__main__`` (below); importing it draws nothing."""
    view = View.of(state.require_collection())
    st.title("Few labels")
    quality_banner(view.collection)
    folder = fewlabels.folder_labels(state.item_table(view.collection).frame)
    if len(np.unique(folder.y)) < 2:
        st.info("Fewer than two folder labels (IMAGE_DIR/LABEL/…), so nothing to evaluate against: "
                "label images here.")
        interactive_mode(view)
    elif st.radio("Mode", [EVALUATE, INTERACTIVE], horizontal=True, key=view.key("mode"),
                  label_visibility="collapsed") == EVALUATE:
        evaluation_mode(view, folder)
    else:
        interactive_mode(view)


if __name__ == "__main__":
    render()
