"""The API key: read from a file (never from the command line, where ``ps`` shows it) and
checked in constant time.

Both the expected key and the one a request sends are hashed with SHA-256 before
:func:`hmac.compare_digest` compares them, so neither the key's content nor its length can be
learnt from response times. The key is never logged: it is held here only, and messages
name the file, not its content.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from indexer.cli import UsageError

__all__ = ["KeyCheck", "read_key"]

MAX_KEY_BYTES = 4096


def read_key(path: str | Path) -> str:
    """The key in ``path``: its first line without surrounding white space, at least 16 characters."""
    try:
        data = Path(path).read_bytes()[: MAX_KEY_BYTES + 1]
    except OSError as exc:
        raise UsageError(f"cannot read the API key file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_BYTES:
        raise UsageError(f"the API key file {path} is over {MAX_KEY_BYTES} bytes; it should hold one line")
    try:
        lines = data.decode("utf-8").strip().splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"the API key file {path} is not UTF-8 text") from None
    key = lines[0].strip() if lines else ""
    if len(key) < 16 or any(c.isspace() for c in key):
        raise UsageError(f"the API key in {path} must be one line of at least 16 characters without spaces "
                         "(e.g. from 'python -c \"import secrets; print(secrets.token_urlsafe(32))\"')")
    return key


class KeyCheck:
    """Whether an ``Authorization`` header carries the key (always true when no key is set)."""

    def __init__(self, key: str | None) -> None:
        self._digest = hashlib.sha256(key.encode()).digest() if key is not None else None

    @property
    def required(self) -> bool:
        return self._digest is not None

    def allows(self, authorization: str | None) -> bool:
        if self._digest is None:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        sent = hashlib.sha256(given.strip().encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(sent, self._digest) and scheme.lower() == "bearer"

    def __repr__(self) -> str:  # never the key, nor its hash
        return f"KeyCheck(required={self.required})"
