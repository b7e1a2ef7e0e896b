"""Curate page: likely label mistakes, near-duplicates, outliers and representative images.

The scores come from :mod:`indexer.curate` (kept in the collection per generation; computed here
when missing) through :mod:`app.curating`, which also filters and pages the galleries. Accepting
a suggested label stores a person's label in the collection, as the Few labels page does; the
duplicates' choice leaves as a CSV. Nothing here deletes or moves a file.
"""

from __future__ import annotations

from typing import Any

import streamlit as st

from app import curating, markup, state
from app.components import quality_banner
from indexer.collection import Collection

COLUMNS = 4
TABS = ("Label mistakes", "Duplicates", "Outliers", "Representative")


def open_as_query(collection: Collection, item_id: int) -> None:
    state.set_item_query(collection, item_id)
    st.switch_page("views/neighbours.py")


def thumbnail(collection: Collection, item_id: int) -> None:
    jpeg = collection.thumbnail(item_id)
    if jpeg is not None:
        st.image(jpeg, width="stretch")
    else:
        st.caption("(no thumbnail)")


def label_filter(name: str, rows: list[dict[str, Any]], labels: dict[str, str | None]) -> list[str]:
    """A multiselect of the labels present among ``rows``' items (empty: all)."""
    present = sorted({labels[r["path"]] for r in rows if labels.get(r["path"])})
    if not present:
        return []
    return st.multiselect("Only these labels", present, key=f"curate:{name}:labels",
                          placeholder="all labels")


def pager(name: str, n: int, size: int) -> int:
    """The page number chosen for a gallery of ``n`` entries (drawn only when there is more than one)."""
    pages = curating.page_count(n, size)
    if pages == 1:
        return 1
    return int(st.number_input(f"Page (of {pages})", min_value=1, max_value=pages, value=1, step=1,
                               key=f"curate:{name}:page"))


def gallery(collection: Collection, name: str, rows: list[dict[str, Any]], caption) -> None:
    """Paged thumbnails with a caption each; clicking one opens its neighbours."""
    shown = curating.page(rows, pager(name, len(rows), curating.PAGE_SIZE))
    for start in range(0, len(shown), COLUMNS):
        for cell, row in zip(st.columns(COLUMNS), shown[start:start + COLUMNS]):
            with cell:
                thumbnail(collection, row["id"])
                st.caption(caption(row))
                if st.button("Neighbours", key=f"curate:{name}:open:{row['id']}", width="stretch"):
                    open_as_query(collection, row["id"])


def label_mistakes(collection: Collection, result: dict[str, Any], labels: dict[str, str | None]) -> None:
    issues = result["label_issues"]
    if result.get("note"):
        st.info(markup.md(result["note"]))
        return
    if not issues:
        st.success("No likely label mistakes: every labelled image agrees with its neighbours' labels.")
        return
    st.caption(f"{len(issues):,} images whose {markup.md(result['label_source'])} label disagrees with the labels "
               "of their nearest neighbours (cleanlab's confident learning), most likely mistakes first. Accept the "
               "suggestion to store it as your label, or keep the given one; your files are not touched.")
    chosen = label_filter("issues", issues, labels)
    rows = curating.with_label(issues, labels, chosen)
    decided = collection.user_labels()
    shown = curating.page(rows, pager("issues", len(rows), curating.PAGE_SIZE))
    for start in range(0, len(shown), COLUMNS):
        for cell, issue in zip(st.columns(COLUMNS), shown[start:start + COLUMNS]):
            with cell:
                thumbnail(collection, issue["id"])
                st.caption(f"labelled **{markup.md(issue['label'])}**, looks like **{markup.md(issue['suggested'])}** "
                           f"({issue['confidence']:.0%})  \n{markup.code(issue['path'].rsplit('/', 1)[-1])}")
                if issue["path"] in decided:
                    st.caption(f"your label: **{markup.md(decided[issue['path']])}**")
                left, right = st.columns(2)
                if left.button("Accept", key=f"curate:accept:{issue['id']}", width="stretch",
                               help=f"store {issue['suggested']} as your label for this image"):
                    save_label(collection, issue["path"], issue["suggested"])
                if right.button("Keep", key=f"curate:keep:{issue['id']}", width="stretch",
                                help=f"store {issue['label']} as your label: checked, and right"):
                    save_label(collection, issue["path"], issue["label"])
                if st.button("Neighbours", key=f"curate:issues:open:{issue['id']}", width="stretch"):
                    open_as_query(collection, issue["id"])


def save_label(collection: Collection, path: str, label: str) -> None:
    collection.set_user_label(path, label)
    st.toast(f"Saved: {path} is {label}")
    st.rerun()


def duplicates(collection: Collection, result: dict[str, Any], labels: dict[str, str | None]) -> None:
    groups = result["duplicate_groups"]
    if not groups:
        st.success("No near-duplicates found.")
        return
    exact = sum(1 for g in groups if any(m["exact"] for m in g))
    st.caption(f"{len(groups):,} groups of near-duplicates ({exact:,} holding exact copies), "
               f"{sum(map(len, groups)):,} images. Untick the images you would remove, then download the list: "
               "the app never deletes or moves your files.")
    members = [m for g in groups for m in g]
    chosen = label_filter("dupes", members, labels)
    rows = curating.groups_with_label(groups, labels, chosen)
    keep: dict[int, bool] = st.session_state.setdefault(f"curate:keep:{collection.directory}", {})
    shown = curating.page(rows, pager("dupes", len(rows), curating.GROUPS_PER_PAGE), curating.GROUPS_PER_PAGE)
    for group in shown:
        st.divider()
        for cell, member in zip(st.columns(max(COLUMNS, min(len(group), 6))), group):
            with cell:
                thumbnail(collection, member["id"])
                copy = " · exact copy" if member["exact"] else ""
                st.caption(f"{markup.code(member['path'])}{copy}")
                keep[member["id"]] = st.checkbox("keep", value=keep.get(member["id"], member is group[0]),
                                                 key=f"curate:keepbox:{member['id']}")
    st.download_button("Download the choice (CSV of paths)", curating.duplicates_csv(groups, keep),
                       file_name=f"{collection.directory.name}-duplicates.csv", mime="text/csv")


def render() -> None:
    """Draw the page. Streamlit runs this file as ``__main__`` (below); importing it draws nothing."""
    collection = state.require_collection()
    st.title("Curate")
    quality_banner(collection)
    labels_source = st.segmented_control("Check which labels", ["auto", "folder", "user"], default="auto",
                                         key="curate:source", help="folder: the first-level folder names; user: "
                                         "the labels people set here or on the Few labels page; auto: the folder "
                                         "labels when there are any")
    found = curating.curation(collection, labels_source or "auto")
    if not found.kept:
        st.caption("The collection's storage is read-only: the scores were computed for this session only.")
    result = found.report
    frame = state.item_table(collection).frame
    user = collection.user_labels()
    labels = {path: user.get(path) or label for path, label in zip(frame["path"], frame["label"])}
    tabs = st.tabs(list(TABS))
    with tabs[0]:
        label_mistakes(collection, result, labels)
    with tabs[1]:
        duplicates(collection, result, labels)
    with tabs[2]:
        st.caption("The images farthest from their 10th nearest neighbour, most unusual first: odd ones out, "
                   "damaged files, or a kind of picture the collection has few of.")
        chosen = label_filter("outliers", result["outliers"], labels)
        gallery(collection, "outliers", curating.with_label(result["outliers"], labels, chosen),
                lambda row: f"distance {row['score']:.3f}  \n{markup.code(row['path'].rsplit('/', 1)[-1])}")
    with tabs[3]:
        st.caption("The images closest to the centre of each k-means cluster: what each part of the collection "
                   "looks like.")
        chosen = label_filter("representative", result["representative"], labels)
        gallery(collection, "representative", curating.with_label(result["representative"], labels, chosen),
                lambda row: f"cluster {row['cluster']} · {row['score']:.3f}  \n"
                            f"{markup.code(row['path'].rsplit('/', 1)[-1])}")


if __name__ == "__main__":
    render()
