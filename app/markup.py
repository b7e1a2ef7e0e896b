"""Text that people and their files supply, made safe to show inside Streamlit's markdown.

File names, folder labels, typed labels and paths reach the page through ``st.markdown``,
``st.caption``, ``st.error`` and friends, which all render markdown (plus Streamlit's own
``:red[…]``, ``:material/…:`` and ``$…$`` syntax). A name like ```a`b*c*.png``` or
``$x$.jpg`` would otherwise be drawn as code, emphasis or a formula, and a name with a
newline could start a heading. Every piece of such text goes through :func:`md` (running
text) or :func:`code` (an inline code span) at the place it is drawn; plain-text widgets
(``st.code``, tables, select boxes) need only :func:`readable`.
"""

from __future__ import annotations

import re

__all__ = ["code", "md", "readable"]

_AUTOLINK = re.compile(r"(?i)(?<=www)(?=\\\.)|(?<=https)(?=\\:)|(?<=http)(?=\\:)|(?<=@)")
"""Just after ``www`` (before its dot), ``http``/``https`` (before the colon) and ``@``."""

_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+\-.!|~$:&@^])")
"""The characters that can start markdown, GitHub-flavoured or Streamlit syntax (emphasis, code,
links and autolinks, HTML and entities, headings, lists, tables, strikethrough, ``$`` maths,
``:icon:`` and ``:colour[…]``); a backslash makes each of them plain (CommonMark allows it
before any ASCII punctuation). ``/ , ; ? ' " % =`` start nothing on their own and stay as they
are, so messages read naturally."""


def readable(text: object) -> str:
    """``text`` as a string a browser can show on one line.

    Undecodable bytes in a file name (kept by Python as surrogate escapes) become U+FFFD, as
    they would in a file manager, instead of failing to encode; control characters (newlines,
    tabs, escapes) become U+FFFD too, so a name stays on its one line."""
    value = str(text)
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() or ch == " " else "\ufffd" for ch in value)


def md(text: object) -> str:
    """``text`` escaped for markdown: shown exactly as written, never formatted.

    Backslashes cannot stop GitHub-flavoured autolinks (``www.x.org``, ``https://…``,
    ``a@b.org``: Streamlit's renderer finds them in the text after escapes are undone), so an
    invisible word joiner is put where it breaks their pattern without changing what is read."""
    return _AUTOLINK.sub("\u2060", _SPECIAL.sub(r"\\\1", readable(text)))


def code(text: object) -> str:
    """``text`` as an inline code span, whatever backticks it holds.

    The fence is one backtick longer than the longest run inside (the CommonMark rule), and a
    space pads text that starts or ends with a backtick or a space, which the renderer strips."""
    value = readable(text)
    if not value:
        return ""
    longest = max((len(run) for run in re.findall(r"`+", value)), default=0)
    fence = "`" * (longest + 1)
    if value[:1] in ("`", " ") or value[-1:] in ("`", " "):
        value = f" {value} "
    return f"{fence}{value}{fence}"
