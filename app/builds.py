"""Builds and updates started from the app: form checks, the commands and their job keys.

Plain functions (no Streamlit), so the rules a person meets in the form are unit-tested and
the commands are exactly those of the command line: ``python -m indexer build|update`` run as
child processes by :mod:`app.jobs`, so a build never stalls the server's other sessions.
Job keys are derived from the output folder, so two sessions asking for the same build share
one job instead of fighting over the collection's writer lock.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app import jobs, markup, roots
from indexer import models, store
from indexer.embed import ModelError

__all__ = ["RECIPES", "BuildRequest", "FormError", "build_key", "check_build", "done_message", "folder_or_none",
           "list_models", "model_label", "preferred_model", "start_build", "start_update", "update_key",
           "variant_words"]

REPO = Path(__file__).resolve().parent.parent  # the children run `python -m indexer` from here
RECIPES = ("auto", "flat", "hnsw", "ivf")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class FormError(ValueError):
    """What is wrong with the form, in one line for the person who filled it in."""


@dataclass(frozen=True)
class BuildRequest:
    """A checked build: absolute paths, so the child's working folder does not matter."""

    images: Path
    out: Path
    model: Path
    recipe: str
    variant: models.Variant
    """What embeds: ``model`` or its verified int8 sibling on a CPU where int8 is faster, with
    why (:func:`indexer.models.choose_variant`, the rule ``indexer build`` follows for a model
    it chose itself); the form shows it before the build starts."""


def list_models(workdir: Path) -> list[Path]:
    """``WORKDIR/models/*.onnx``, newest first (:func:`indexer.models.list_models`)."""
    return models.list_models(workdir / "models")


def model_label(path: Path) -> str:
    """How the form lists a model: its file name and what it was trained on."""
    info = models.model_info(path)
    if info.error:
        return f"{path.name} (unreadable)"
    return f"{path.name} · trained on {info.train_data}, {info.image_size} px"


def folder_or_none(text: str, data_roots: Sequence[Path]) -> Path | None:
    """The folder the form names, when it is an allowed one; None otherwise (the form's check
    says why when the person submits it, and nothing about a refused path is shown before)."""
    try:
        return roots.check_folder(text, data_roots) if text.strip() else None
    except roots.PathRefused:
        return None


def preferred_model(folder: Path | None, candidates: Sequence[Path]) -> Path | None:
    """The model ``indexer build`` would choose for ``folder`` among ``candidates`` (the one
    trained on it, :func:`indexer.models.choose_model`), or None when none was: then the person
    chooses, seeing what each was trained on, instead of getting the newest file silently."""
    if folder is None or not candidates:
        return None
    try:
        return models.choose_model(folder, candidates=candidates).path
    except ModelError:
        return None


def variant_words(model: Path, *, cpu_flags: frozenset[str] | None = None) -> str:
    """Which variant of ``model`` a build would embed with, and why, in one sentence for the form
    (shown before the person presses Build, so an int8 stand-in is never silent)."""
    try:
        variant = models.choose_variant(Path(model), cpu_flags=cpu_flags)
    except ModelError as exc:
        return f"It cannot be used: {exc}."
    return f"Precision {variant.precision} ({variant.path.name}): {variant.reason}."


def check_name(text: str, images: Path) -> str:
    """A plain folder name (no path separators, no ``..``); empty means the image folder's name."""
    name = text.strip() or images.name
    if not NAME.fullmatch(name):
        raise FormError(f"{name!r} is not a plain folder name: use letters, digits, '.', '_' or '-' "
                        "(no '/' or leading dot).")
    return name


def check_build(images: str, name: str, model: Path | None, recipe: str, indexes: Path,
                data_roots: Sequence[Path], *, cpu_flags: frozenset[str] | None = None) -> BuildRequest:
    """The form's fields, checked; :class:`FormError` says what to fix.

    ``data_roots`` are the folders the server allows (resolved, :func:`app.roots.allowed_roots`);
    the image folder must lie inside one of them (:func:`app.roots.check_folder`). The model
    picked in the list is a choice of network, not of precision: its variant is chosen as
    ``indexer build`` chooses it (``cpu_flags``: this CPU's, unless given)."""
    try:
        folder = roots.check_folder(images, data_roots)
    except roots.PathRefused as exc:
        raise FormError(str(exc)) from None
    out = (indexes / check_name(name, folder)).resolve()
    if (out / store.MANIFEST).is_file():
        raise FormError(f"A collection named {out.name} exists already: pick another name, or open it and "
                        "use 'Update this collection'.")
    if out.exists() and not out.is_dir():
        raise FormError(f"{out} is a file; pick another name.")
    if model is None:
        raise FormError(f"No model was trained on {folder}: choose one in the Model list (each says what it was "
                        "trained on), or train one on this folder and export it to models/NAME.onnx "
                        "(python -m exports runs/NAME -o models/NAME.onnx).")
    if not Path(model).is_file():
        raise FormError(f"The model {model} is gone; reload the page.")
    if recipe not in RECIPES:
        raise FormError(f"Unknown index recipe {recipe!r} (one of {', '.join(RECIPES)}).")
    try:
        variant = models.choose_variant(Path(model).resolve(), cpu_flags=cpu_flags)
    except ModelError as exc:
        raise FormError(str(exc)) from None
    return BuildRequest(folder, out, Path(model).resolve(), recipe, variant)


def build_key(out: Path) -> str:
    return f"build:{Path(out).resolve()}"


def update_key(directory: Path) -> str:
    return f"update:{Path(directory).resolve()}"


def done_message(key: str, title: str, seconds: float, fixed: Path | None) -> str:
    """What to say when a build or update job ends well (Markdown). ``fixed``: the app's
    ``--collection``, when it was started on one: then there is no collection list in the sidebar,
    and the new collection is opened by starting the app on it."""
    kind, _, where = key.partition(":")
    head = f"{markup.md(title)}: done in {seconds:.0f} s."
    if kind == "update":
        return f"{head} This page shows the updated collection."
    if fixed is not None:
        return (f"{head} Written to {markup.code(where)}. This app was started on one collection "
                f"({markup.code(fixed)}); to open the new one, run "
                f"{markup.code(f'streamlit run app/main.py -- --collection {where}')}.")
    return f"{head} Choose it in the sidebar's collection list."


def start_build(request: BuildRequest) -> jobs.Job:
    argv = jobs.python_module("indexer", "build", request.images, "--out", request.out, "--model", request.variant.path,
                              "--index", request.recipe)
    stage = jobs.Stage(f"Embed, index and map {request.images.name}", argv)
    return jobs.start(build_key(request.out), f"Building {request.out.name}", [stage], cwd=REPO)


def start_update(directory: Path) -> jobs.Job:
    directory = Path(directory).resolve()
    stage = jobs.Stage("Embed new and changed files, drop deleted ones",
                       jobs.python_module("indexer", "update", directory))
    return jobs.start(update_key(directory), f"Updating {directory.name}", [stage], cwd=REPO)
