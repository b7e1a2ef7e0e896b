"""Demo page: shown when there is no collection at all; builds the built-in demo and opens it.

The build runs in the background of the server process (:mod:`app.jobs`), so closing the tab
or a second visitor does not start it twice; this page only draws its progress."""

from __future__ import annotations

import streamlit as st

from app import demo, jobs, markup, state
from app.components import add_quality_note, job_stages
from app.jobs import Job
from indexer import store

WELCOME = (
    "There is no collection yet, so the app is building its **built-in demo**: the 1,797 handwritten "
    "digits that ship with scikit-learn, a short MoCo-v2 training on this computer's CPU, an ONNX export "
    "and a searchable collection with its map. It takes a few minutes once; the result is kept in "
    "{collection}.  \nTo search your own photos instead, see the Collection page or run "
    "`python -m indexer build YOUR_FOLDER`.")


def draw(job: Job) -> None:
    job_stages(job)
    st.caption(f"{job.seconds:.0f} s so far" if job.status == "running" else f"took {job.seconds:.0f} s")


def not_learned_note(paths: demo.DemoPaths, train_seconds: int) -> str | None:
    """What to say when the demo's training ended no better than its random start (its trainer's
    kNN monitor decides, recorded in the model), with how to train it longer; None otherwise."""
    try:
        measured = state.open_collection(paths.collection).quality
    except (store.CollectionError, OSError, ValueError):
        return None  # the next page says what is wrong with the collection
    if not measured.doubtful:
        return None
    leftovers = ", ".join(markup.code(p) for p in (paths.run, paths.model, paths.collection))
    return (f"The demo's {train_seconds} s training did not beat its random start on this computer "
            f"({markup.md(measured.summary())}), so the demo shows what an untrained network does. To train "
            f"longer, delete {leftovers} and start the app with `-- --demo-train-seconds 600`, or run "
            "`python -m app.demo --train-seconds 600`.")


def render() -> None:
    """Draw the page. Streamlit runs this file as ``__main__`` (below); importing it draws nothing.

    Starting the build is part of drawing: the first visit starts it (once per server)."""
    cfg = state.config()
    paths = demo.DemoPaths(cfg.workdir)
    st.title("Welcome")
    st.markdown(WELCOME.format(collection=markup.code(paths.collection)))
    job = demo.start_demo(cfg.workdir, cfg.demo_train_seconds)

    @st.fragment(run_every=1.0)
    def progress() -> None:
        current = jobs.get(demo.DEMO_KEY) or job
        draw(current)
        if current.status == "done" and state.is_collection(paths.collection):
            st.success("The demo is ready.")
            note = not_learned_note(paths, cfg.demo_train_seconds or demo.DEMO_TRAIN_SECONDS)
            if note is not None:  # shown here, and by the quality banner of the page that opens next
                st.warning(note)
                add_quality_note(str(paths.collection.resolve()), note)
            st.rerun(scope="app")
        elif current.status in ("failed", "cancelled"):
            st.error(f"The demo build stopped: {markup.md(current.error or current.status)}. "
                     "Reload the page to try again; finished stages are kept.")
            with st.expander("Output of the last commands"):
                st.code("\n".join(current.log))

    progress()


if __name__ == "__main__":
    render()
