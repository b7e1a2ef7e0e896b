"""Which folders a browser session may build a collection from: the allowed data roots.

Whoever opens the page can type a path into the build form, but only the person who started
the server decides what the app may read: ``streamlit run app/main.py -- --data-root DIR``
(repeatable). With no root the form is not offered at all. A typed path is accepted only when,
with ``~`` expanded and every symlink resolved, it lies inside a root (itself resolved).

What a refusal says must not tell a stranger anything about the rest of the disk: for a path
that is not inside a root, "does not exist", "is a file" and "not allowed" are one and the same
message (:data:`OUTSIDE`); only inside a root may a message be specific. Percent-encoded text,
``..`` segments and NUL bytes are refused by their spelling, before the disk is touched.

Relative paths are relative to the *first* root, so with one root a person types just the
sub-folder (``holidays/2024``). Plain functions, no Streamlit, so every case is unit-tested.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = ["DISABLED", "OUTSIDE", "PathRefused", "allowed_roots", "check_folder", "folder_choices", "inside"]

OUTSIDE = "Not an allowed image folder: choose one of the folders offered, or type a folder inside them."
"""The one message for every path outside the roots, whether it exists, is a file or a folder."""
DISABLED = ("Building from the app is off: start it with `streamlit run app/main.py -- --data-root DIR` "
            "to allow folders under DIR.")
ENCODED = re.compile(r"%[0-9A-Fa-f]{2}")
MAX_CHOICES_PER_ROOT = 200


class PathRefused(ValueError):
    """Why a typed folder cannot be used, in one line that reveals nothing outside the roots."""


def allowed_roots(given: Iterable[Path]) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """The roots given on the command line, resolved: ``(usable folders, missing ones)``.

    Resolving once here means a root reached through a symlink (``/data`` → ``/mnt/disk``)
    still contains the paths typed through either name. Duplicates are dropped, order kept
    (the first root is the one relative paths start from)."""
    usable: list[Path] = []
    missing: list[Path] = []
    for root in given:
        try:
            resolved = Path(root).expanduser().resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            missing.append(Path(root))
            continue
        if not resolved.is_dir():
            missing.append(Path(root))
        elif resolved not in usable:
            usable.append(resolved)
    return tuple(usable), tuple(missing)


def inside(path: Path, roots: Sequence[Path]) -> Path | None:
    """The root that contains ``path`` (both already resolved), if any."""
    return next((root for root in roots if path.is_relative_to(root)), None)


def check_folder(text: str, roots: Sequence[Path]) -> Path:
    """The folder a person typed, resolved, if it lies inside one of ``roots`` (resolved).

    Raises :class:`PathRefused`; for anything outside the roots the message is always
    :data:`OUTSIDE`."""
    if not roots:
        raise PathRefused(DISABLED)
    raw = text.strip()
    if not raw:
        raise PathRefused("Enter the folder of images to index.")
    if "\x00" in raw:
        raise PathRefused("A folder name cannot contain a NUL byte.")
    if ENCODED.search(raw):
        raise PathRefused("Type the folder as it is on disk: percent-encoded text (such as %2F) is not accepted.")
    try:
        typed = Path(raw).expanduser()  # "~nobody" fails here: a user that does not exist
    except RuntimeError:
        raise PathRefused(OUTSIDE) from None
    if ".." in typed.parts:
        raise PathRefused("'..' is not accepted: type the folder's own path, inside an allowed folder.")
    if not typed.is_absolute():
        typed = roots[0] / typed
    try:
        folder = typed.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        # Gone or a broken link: say so only if it would have been inside a root (a link inside
        # a root to a missing path elsewhere, or a link loop, gets the outside message).
        loose = _resolve_loosely(typed)
        if loose is not None and inside(loose, roots) is not None:
            raise PathRefused(f"No readable folder at {typed}.") from None
        raise PathRefused(OUTSIDE) from None
    if inside(folder, roots) is None:
        raise PathRefused(OUTSIDE)
    if not folder.is_dir():
        raise PathRefused(f"{typed} is a file, not a folder of images.")
    return folder


def _resolve_loosely(path: Path) -> Path | None:
    """Where ``path`` would lead, following the links that exist (None when even that fails)."""
    try:
        return path.resolve(strict=False)
    except (OSError, RuntimeError, ValueError):
        return None


def folder_choices(roots: Sequence[Path], limit: int = MAX_CHOICES_PER_ROOT) -> list[Path]:
    """The roots and their first-level sub-folders (not hidden ones), for the form's list.

    Each sub-folder passes :func:`check_folder` (a sub-folder that is a link to elsewhere is
    left out); at most ``limit`` per root, by name, so a root of thousands of folders does not
    slow the page down."""
    choices: list[Path] = []
    for root in roots:
        choices.append(root)
        try:
            with os.scandir(root) as entries:
                names = sorted(e.name for e in entries if not e.name.startswith(".") and _is_dir(e))
        except OSError:
            continue
        for name in names[:limit]:
            try:
                folder = check_folder(str(root / name), roots)
            except PathRefused:
                continue
            if folder not in choices:
                choices.append(folder)
    return choices


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
