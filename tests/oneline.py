"""The house rule every command line's tests check: bad input ends as one line on stderr."""

from __future__ import annotations

import pytest


def assert_one_line_error(capsys: pytest.CaptureFixture[str], needle: str) -> None:
    """What was written to stderr is one line, holds ``needle`` and no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert needle in err, err
