"""Entry point: ``streamlit run app/main.py [-- --collection DIR] [--data-root DIR ...]``.

``--data-root`` (repeatable) names the folders a browser session may build collections from;
without one the build form is not offered (:mod:`app.roots`). The server listens on 127.0.0.1
unless ``--server.address`` says otherwise (``app/.streamlit/config.toml``).

Chooses the collection (the ``--collection`` given, else a picker over ``indexes/``), and
when there is none at all, opens the demo page that builds the built-in demo. Pages live in
``app/views/`` (one file each: they draw and call :mod:`app.state` and :mod:`indexer`).

Each page's drawing is its ``render()``, called under ``if __name__ == "__main__"``: Streamlit
runs a page file as ``__main__``, while ``import app.views.map`` draws nothing (so every module
of the app can be imported, and checked, on its own). The pages stay files rather than callables
given to ``st.Page``: Streamlit's ``AppTest.switch_page`` finds only file pages (a callable page
is registered without a script path), and the URLs, titles and icons come from the file names.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` puts app/ on the path, not the repo
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import markup, state  # noqa: E402
from app.demo import DemoPaths  # noqa: E402

VIEWS = Path(__file__).resolve().parent / "views"
# The tab's icon is a file served by the app itself: Streamlit turns a ":material/…:" page icon
# into a link to Google's font service and an emoji into one to a CDN, so every visit would call
# another host (and show no icon offline). Material icons inside the page ship with Streamlit.
ICON = Path(__file__).resolve().parent / "icon.png"

st.set_page_config(page_title="MoCo image search", page_icon=str(ICON), layout="wide")
cfg = state.config()


def choose_collection() -> Path | None:
    """The collection for this session: ``--collection`` if given, else the sidebar picker."""
    if cfg.collection is not None:
        if not state.is_collection(cfg.collection):
            st.error(f"No collection at {markup.code(cfg.collection)} "
                     "(make one with: `python -m indexer build IMAGE_DIR`).")
            st.stop()
        return cfg.collection
    found = state.list_collections(cfg.indexes)
    if not found:
        return None
    names = [p.name for p in found]
    demo_name = DemoPaths(cfg.workdir).collection.name
    previous = state.selected_collection()
    index = names.index(previous.name) if previous is not None and previous.name in names else (
        names.index(demo_name) if demo_name in names else 0)
    choice = st.sidebar.selectbox("Collection", names, index=index,
                                  help=f"collections under {markup.code(cfg.indexes)}")
    return found[names.index(choice)]


collection_dir = choose_collection()
st.session_state["collection_dir"] = str(collection_dir) if collection_dir else None

if collection_dir is None:
    pages = [st.Page(VIEWS / "demo.py", title="Demo", icon=":material/science:", default=True),
             st.Page(VIEWS / "collection.py", title="Collection", icon=":material/folder_open:")]
else:
    pages = [st.Page(VIEWS / "neighbours.py", title="Neighbours", icon=":material/image_search:", default=True),
             st.Page(VIEWS / "map.py", title="Map", icon=":material/scatter_plot:"),
             st.Page(VIEWS / "few_labels.py", title="Few labels", icon=":material/label:"),
             st.Page(VIEWS / "curate.py", title="Curate", icon=":material/rule:"),
             st.Page(VIEWS / "collection.py", title="Collection", icon=":material/folder_open:")]
st.navigation(pages).run()
