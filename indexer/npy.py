"""Reading NumPy's .npy / .npz files from several threads of one process.

NumPy parses each array's header with ``ast.literal_eval``. On CPython 3.11 (at least up to
3.11.7, the version CI runs) the interpreter's conversion of a parse tree into ``ast`` objects
keeps its recursion depth in state shared by all threads, so two threads parsing at once can
fail with ``SystemError: AST constructor recursion depth mismatch`` (CPython gh-106905). That is
exactly what a collection sees: the service's request threads and the app's script threads open
generations while an update in another thread reads the parts it keeps. Every header this
package reads goes through one lock; reading the array data itself (a memory map, or a few
kilobytes of ids) is not slowed by it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = ["load_array", "reading_headers"]

_HEADER_LOCK = threading.RLock()


@contextmanager
def reading_headers() -> Iterator[None]:
    """Hold while NumPy may parse a header: around ``np.load`` of an .npz and every access to
    its members (each member's header is parsed when it is read)."""
    with _HEADER_LOCK:
        yield


def load_array(path: Path) -> np.ndarray:
    """``np.load`` of one .npy file, never unpickling (loading a file never runs code from it)."""
    with _HEADER_LOCK:
        return np.load(path, allow_pickle=False)
