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

from app import jobs, roots
from indexer import store

__all__ = ["RECIPES", "BuildRequest", "FormError", "build_key", "check_build", "list_models", "start_build",
           "start_update", "update_key"]

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


def list_models(workdir: Path) -> list[Path]:
    """``WORKDIR/models/*.onnx``, newest first (the one ``indexer build`` would pick by default)."""
    folder = workdir / "models"
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.onnx"), key=lambda p: (-p.stat().st_mtime, p.name))


def check_name(text: str, images: Path) -> str:
    """A plain folder name (no path separators, no ``..``); empty means the image folder's name."""
    name = text.strip() or images.name
    if not NAME.fullmatch(name):
        raise FormError(f"{name!r} is not a plain folder name: use letters, digits, '.', '_' or '-' "
                        "(no '/' or leading dot).")
    return name


def check_build(images: str, name: str, model: Path | None, recipe: str, indexes: Path,
                data_roots: Sequence[Path]) -> BuildRequest:
    """The form's fields, checked; :class:`FormError` says what to fix.

    ``data_roots`` are the folders the server allows (resolved, :func:`app.roots.allowed_roots`);
    the image folder must lie inside one of them (:func:`app.roots.check_folder`)."""
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
        raise FormError("No model to embed with: export one to models/NAME.onnx "
                        "(python -m exports runs/NAME -o models/NAME.onnx).")
    if not Path(model).is_file():
        raise FormError(f"The model {model} is gone; reload the page.")
    if recipe not in RECIPES:
        raise FormError(f"Unknown index recipe {recipe!r} (one of {', '.join(RECIPES)}).")
    return BuildRequest(folder, out, Path(model).resolve(), recipe)


def build_key(out: Path) -> str:
    return f"build:{Path(out).resolve()}"


def update_key(directory: Path) -> str:
    return f"update:{Path(directory).resolve()}"


def start_build(request: BuildRequest) -> jobs.Job:
    argv = jobs.python_module("indexer", "build", request.images, "--out", request.out, "--model", request.model,
                              "--index", request.recipe)
    stage = jobs.Stage(f"Embed, index and map {request.images.name}", argv)
    return jobs.start(build_key(request.out), f"Building {request.out.name}", [stage], cwd=REPO)


def start_update(directory: Path) -> jobs.Job:
    directory = Path(directory).resolve()
    stage = jobs.Stage("Embed new and changed files, drop deleted ones",
                       jobs.python_module("indexer", "update", directory))
    return jobs.start(update_key(directory), f"Updating {directory.name}", [stage], cwd=REPO)
