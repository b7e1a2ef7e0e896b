"""Collection page: what the open collection holds and how it was made, and builds from the UI.

Builds and updates run as child processes (``python -m indexer build|update``) in the
server's background (:mod:`app.jobs`); this page only starts them and draws their progress,
so the person can leave the page, and other sessions keep working meanwhile. With no collection
at all (a fresh clone) the page shows only the build form.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import streamlit as st

from app import builds, jobs, markup, roots, state
from app.components import job_stages, quality_banner
from indexer import ann, store
from indexer.collection import Collection
from indexer.embed import ModelError
from indexer.models import describe_precision, model_info

SESSION_JOBS = "collection_page_jobs"


def remember_job(key: str) -> None:
    """This session follows the job (its panel stays on the page after the job ends)."""
    keys: list[str] = st.session_state.setdefault(SESSION_JOBS, [])
    if key not in keys:
        keys.append(key)


def show_summary(collection: Collection) -> None:
    manifest = collection.manifest
    counts = manifest["counts"]
    st.title(markup.md(collection.directory.name))
    st.caption(f"Collection {markup.code(collection.directory)} · images from {markup.code(collection.image_root)}")
    quality_banner(collection)
    cells = st.columns(4)
    cells[0].metric("Indexed images", f"{counts['indexed']:,}")
    cells[1].metric("Skipped files", f"{counts['skipped']:,}")
    cells[2].metric("Embedding size", f"{collection.dim}")
    cells[3].metric("Generation", f"{collection.generation}")


def model_rows(collection: Collection) -> dict[str, str]:
    """What the model table says, plain text (property -> value); the quality rows come from the
    trainer's record (:mod:`indexer.quality`)."""
    manifest = collection.manifest
    props = manifest["model"]["props"]
    measured = collection.quality
    rows = {
        "architecture": f"{props.get('moco.arch', '?')} ({props.get('moco.preset', '?')})",
        "image size": f"{props.get('moco.image_size', '?')} px ({props.get('moco.resize', '?')})",
        "embedding size": props.get("moco.embedding_dim", str(collection.dim)),
        "trained on": props.get("moco.train_data", "?"),
        "training quality": measured.summary(),
    }
    if measured.monitor:
        rows["quality monitor"] = measured.monitor
    rows.update({
        "checkpoint sha256": props.get("moco.checkpoint_sha256", "?")[:16],
        "model sha256": manifest["model"]["sha256"][:16],
        "precision": describe_precision(props),  # the variant that made the vectors (fp32, int8)
        "model file": f"{manifest['model_file']} (from {manifest['model'].get('source', '?')})",
    })
    return rows


def show_model(collection: Collection) -> None:
    st.subheader("Model")
    rows = model_rows(collection)
    # A two-column description list: property names bold, no header row. st.table renders
    # markdown in cells, and values come from the model file and the disk, so they are escaped.
    frame = pd.DataFrame({"property": [f"**{markup.md(k)}**" for k in rows],
                          "value": [markup.md(v) for v in rows.values()]})
    st.table(frame, hide_index=True, hide_header=True, alt="The model that made this collection's vectors")


def show_index(collection: Collection) -> None:
    recipe = collection.recipe
    st.subheader("Index")
    st.markdown(ann.describe_recipe(recipe) if recipe else "no index recipe recorded")
    cells = st.columns(3)
    if recipe.get("recall_at_10") is not None:
        cells[0].metric("recall@10", f"{recipe['recall_at_10']:.3f}",
                        help="measured against exact search on held-out queries when the index was built")
    if recipe.get("latency_p50_ms") is not None:
        cells[1].metric("p50 latency", f"{recipe['latency_p50_ms']:.2f} ms")
        cells[2].metric("p99 latency", f"{recipe['latency_p99_ms']:.2f} ms")


def show_hardware(collection: Collection) -> None:
    """Where queries run: the model's ONNX Runtime providers and FAISS's GPUs."""
    st.subheader("Hardware")
    try:
        providers = ", ".join(collection.model.providers)  # opened once per generation, shared with queries
    except ModelError as exc:
        providers = f"cannot load the model: {markup.md(exc)}"
    gpus = ann.gpu_count()
    st.markdown(f"- embedding (ONNX Runtime): {providers}\n"
                f"- search (FAISS): {gpus} GPU{'s' if gpus != 1 else ''} usable; a top-10 search runs on the "
                f"{collection.searcher.device_for(10).upper()}")


def show_history(collection: Collection) -> None:
    manifest = collection.manifest
    last = manifest.get("last_run") or {}
    projection = manifest.get("projection") or {}
    st.subheader("History")
    lines = [f"- created {manifest.get('created', '?')}, last written {manifest.get('updated', '?')} "
             f"(generation {collection.generation})"]
    if last:
        lines.append(f"- last run embedded {last.get('embedded', 0):,} files in {last.get('embed_seconds', 0):.1f} s")
    if projection:
        lines.append(f"- map: {projection.get('fit_points', 0):,} points fitted ({projection.get('method', '')})")
    st.markdown("\n".join(lines))


def show_skipped(collection: Collection) -> None:
    skipped = collection.skipped
    st.subheader("Skipped files")
    if not skipped:
        st.caption("No file was skipped.")
        return
    by_reason = Counter(s["reason"] or "unknown" for s in skipped)
    st.dataframe(pd.DataFrame(by_reason.most_common(), columns=["reason", "files"]), hide_index=True)
    rows = pd.DataFrame(skipped, columns=["path", "reason", "error"]).map(  # names as a file manager shows them
        lambda v: markup.readable(v) if isinstance(v, str) else v)
    st.dataframe(rows, hide_index=True, width="stretch")


def show_update(collection: Collection) -> None:
    st.subheader("Update")
    st.caption("Embed new and changed files under the image folder and drop deleted ones; the running app "
               "keeps serving the current version until the update commits.")
    key = builds.update_key(collection.directory)
    running = (job := jobs.get(key)) is not None and job.status == "running"
    if st.button("Update this collection", key="update_collection", disabled=running):
        builds.start_update(collection.directory)
        remember_job(key)
    elif job is not None:
        remember_job(key)  # started by another session: show it here too


def show_build_form(collection: Collection | None) -> None:
    """The form, only when the server allows data roots; a typed folder is checked against them
    (:mod:`app.roots`) before anything under it is read.

    Not an ``st.form``: the model list must follow the folder as it is chosen, preselecting the
    model trained on it (the rule of ``indexer build``, :func:`app.builds.preferred_model`) and
    selecting nothing when none was, so no model is ever used without the person seeing it."""
    cfg = state.config()
    st.subheader("Build a new collection")
    allowed = data_roots(cfg.data_roots)
    if not allowed:
        st.caption(roots.DISABLED)
        return
    models = builds.list_models(cfg.workdir)
    if collection is not None:
        models.append(collection.directory / collection.manifest["model_file"])
    choices = [str(p) for p in roots.folder_choices(allowed)]
    chosen = st.selectbox("Image folder", choices, key="build_folder",
                          help="an allowed folder or one of its sub-folders; every image under it, recursively, "
                               "is indexed, and a first-level sub-folder is the label")
    typed = st.text_input("…or type a folder inside them", key="build_images",
                          placeholder=f"e.g. {allowed[0] / 'photos'}, or photos (relative to {allowed[0]})",
                          help="absolute, ~/…, or relative to the first allowed folder; links are followed, "
                               "and must stay inside an allowed folder")
    name = st.text_input("Collection name", key="build_name", placeholder="default: the folder's name",
                         help=f"a new folder under {markup.md(cfg.indexes)}")
    images = typed if typed.strip() else (chosen or "")
    if models:
        model = model_picker(builds.folder_or_none(images, allowed), models, collection)
    else:
        model = None
        st.warning(f"No model in {markup.code(cfg.workdir / 'models')}: export one with "
                   "`python -m exports runs/NAME -o models/NAME.onnx`.")
    recipe = st.selectbox("Index", builds.RECIPES, key="build_recipe",
                          help="auto: exact search up to ~20k images, then IVF tuned to recall@10 ≥ 0.95")
    if st.button("Build", type="primary", key="build_submit"):
        try:
            request = builds.check_build(images, name, model, recipe, cfg.indexes, allowed)
        except builds.FormError as exc:
            st.error(markup.md(exc))
        else:
            builds.start_build(request)
            remember_job(builds.build_key(request.out))


def model_picker(folder: Path | None, models: list[Path], collection: Collection | None) -> Path | None:
    """The model list: each entry says what it was trained on; when the folder changes, the model
    trained on it is preselected, or none when no model was (the person must choose)."""
    preferred = builds.preferred_model(folder, models)
    if st.session_state.get("build_model_for") != str(folder) or "build_model" not in st.session_state:
        st.session_state["build_model_for"] = str(folder)
        st.session_state["build_model"] = preferred
    model: Path | None = st.selectbox("Model", models, key="build_model", placeholder="choose a model",
                                      format_func=lambda p: _model_name(p, collection))
    if model is not None:
        why = "trained on this folder" if model == preferred else "chosen by you"
        st.caption(f"Embeds with {markup.code(model.name)}, trained on "
                   f"{markup.md(model_info(model).train_data)} ({why}). {markup.md(builds.variant_words(model))}")
    elif folder is not None:
        st.warning(f"No model was trained on {markup.code(folder)}: choose one (each says what it was trained "
                   "on); a model trained on other pictures embeds these less well.")
    return model


@st.cache_resource(show_spinner=False)
def data_roots(given: tuple[Path, ...]) -> tuple[Path, ...]:
    """The allowed roots, resolved once per server process; a missing one is said once, on
    the server's console (the person who named it reads that), not to every browser session."""
    usable, missing = roots.allowed_roots(given)
    for root in missing:
        print(f"app: --data-root {root} is not a folder; ignored", file=sys.stderr)
    return usable


def _model_name(path: Path, collection: Collection | None) -> str:
    if collection is not None and path.parent == collection.directory:
        return f"the model of {collection.directory.name} ({builds.model_label(path)})"
    return builds.model_label(path)


def draw_job(job: jobs.Job) -> None:
    st.markdown(f"**{markup.md(job.title)}**")
    job_stages(job)
    if job.status == "done":
        summary = [line for line in job.log if not line.startswith("$ ")][-4:]
        st.success(builds.done_message(job.key, job.title, job.seconds, state.config().collection))
        if summary:
            st.code("\n".join(summary), language=None)
    elif job.status in ("failed", "cancelled"):
        st.error(markup.md(job.error or f"{job.title}: {job.status}"))
        with st.expander("Output of the command"):
            st.code("\n".join(job.log), language=None)


def job_panel(key: str) -> None:
    """One job's progress; while it runs, the panel redraws itself every second (a fragment, so
    the rest of the page is not rerun), and when it ends the whole app reruns once, so the
    sidebar lists a new collection and the page shows an updated one."""
    job = jobs.get(key)
    if job is None:
        return
    was_running = job.status == "running"

    @st.fragment(run_every=1.0 if was_running else None)
    def panel() -> None:
        current = jobs.get(key) or job
        draw_job(current)
        if was_running and current.status != "running":
            st.rerun(scope="app")

    panel()


def open_selected() -> Collection | None:
    directory = state.selected_collection()
    if directory is None:
        return None
    try:
        return state.open_collection(directory)
    except (store.CollectionError, OSError, ValueError) as exc:
        st.error(f"Cannot open {markup.code(directory)}: {markup.md(exc)}")
        return None


def render() -> None:
    """Draw the page. Streamlit runs this file as ``__main__`` (below); importing it draws nothing."""
    collection = open_selected()
    if collection is not None:
        show_summary(collection)
        left, right = st.columns(2, gap="large")
        with left:
            show_model(collection)
            show_hardware(collection)
        with right:
            show_index(collection)
            show_history(collection)
        show_skipped(collection)
        show_update(collection)
        st.divider()
    else:
        st.title("Collections")
        st.caption("No collection is open yet: build one from a folder of images.")
    show_build_form(collection)
    for job_key in st.session_state.get(SESSION_JOBS, []):
        job_panel(job_key)


if __name__ == "__main__":
    render()
