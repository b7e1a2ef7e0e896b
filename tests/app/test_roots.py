"""The data-root check (app/roots.py) case by case, and the markdown escaping (app/markup.py).

Plain functions, no Streamlit and no browser: every way a typed path could lead out of the
allowed folders, and the rule that a path outside them gets one and the same message.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app import markup, roots, state


@pytest.fixture()
def tree(tmp_path: Path) -> dict[str, Path]:
    """An allowed root with sub-folders, a file and links, and an outside world beside it."""
    root = tmp_path / "allowed"
    (root / "holiday" / "beach").mkdir(parents=True)
    (root / "pets").mkdir()
    (root / ".hidden").mkdir()
    (root / "photo.jpg").write_bytes(b"not really a jpeg")
    outside = tmp_path / "outside"
    (outside / "secrets").mkdir(parents=True)
    (outside / "secret.txt").write_text("private")
    (root / "to-outside").symlink_to(outside / "secrets", target_is_directory=True)
    (root / "to-outside-file").symlink_to(outside / "secret.txt")
    (root / "to-nowhere-outside").symlink_to(outside / "missing")
    (root / "to-pets").symlink_to(root / "pets", target_is_directory=True)
    (root / "loop").symlink_to(root / "loop")
    return {"root": root.resolve(), "outside": outside.resolve()}


def refused(text: str, allowed: list[Path]) -> str:
    with pytest.raises(roots.PathRefused) as info:
        roots.check_folder(text, allowed)
    return str(info.value)


def test_folders_inside_a_root_are_accepted_resolved(tree: dict[str, Path]) -> None:
    root = tree["root"]
    assert roots.check_folder(str(root), [root]) == root
    assert roots.check_folder(f"  {root / 'holiday'}  ", [root]) == root / "holiday"
    assert roots.check_folder("holiday/beach", [root]) == root / "holiday" / "beach"  # relative to the first root
    assert roots.check_folder(str(root / "to-pets"), [root]) == root / "pets"  # a link that stays inside


def test_relative_paths_start_from_the_first_root(tree: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "pets").mkdir(parents=True)
    assert roots.check_folder("pets", [other.resolve(), tree["root"]]) == other.resolve() / "pets"
    assert roots.check_folder("pets", [tree["root"], other.resolve()]) == tree["root"] / "pets"


@pytest.mark.parametrize("text", [
    "{outside}",  # a folder outside
    "{outside}/secrets",
    "{outside}/secret.txt",  # a file outside: no "is a file"
    "{outside}/does-not-exist",  # nothing: no "does not exist"
    "/etc", "/etc/passwd", "/",
    "{root}/to-outside",  # a link inside pointing out
    "to-outside",  # the same link, relative
    "{root}/to-outside-file",
    "{root}/to-nowhere-outside",  # a dangling link that would lead out
    "to-nowhere-outside/deeper",
    "~nobody-with-this-name",  # an unknown user's home
])
def test_everything_outside_gets_one_and_the_same_message(tree: dict[str, Path], text: str) -> None:
    assert refused(text.format(**tree), [tree["root"]]) == roots.OUTSIDE


@pytest.mark.parametrize(("text", "message"), [
    ("../outside", "'..' is not accepted"),
    ("{root}/../outside/secrets", "'..' is not accepted"),
    ("holiday/../../outside", "'..' is not accepted"),
    ("{root}/holiday/..", "'..' is not accepted"),  # even when it would stay inside
    ("%2e%2e/outside", "percent-encoded"),
    ("..%2Foutside", "percent-encoded"),
    ("{root}%2F..%2F..%2Fetc", "percent-encoded"),
    ("holiday\x00/../../etc", "NUL byte"),
    ("", "Enter the folder"),
    ("   ", "Enter the folder"),
])
def test_spelling_that_could_lead_out_is_refused_before_the_disk_is_read(tree: dict[str, Path], text: str,
                                                                        message: str) -> None:
    assert message in refused(text.format(**tree), [tree["root"]])


def test_inside_a_root_the_message_may_be_specific(tree: dict[str, Path]) -> None:
    root = tree["root"]
    assert refused(str(root / "photo.jpg"), [root]) == f"{root / 'photo.jpg'} is a file, not a folder of images."
    assert refused("photo.jpg", [root]) == f"{root / 'photo.jpg'} is a file, not a folder of images."
    assert refused("no-such-folder", [root]) == f"No readable folder at {root / 'no-such-folder'}."
    # A link loop leads nowhere that can be told: it gets the outside message.
    assert refused(str(root / "loop"), [root]) == roots.OUTSIDE


def test_no_root_means_no_building(tree: dict[str, Path]) -> None:
    assert refused(str(tree["root"]), []) == roots.DISABLED
    assert "--data-root DIR" in roots.DISABLED


def test_home_folders_are_expanded(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tree["root"].parent))
    assert roots.check_folder("~/allowed/pets", [tree["root"]]) == tree["root"] / "pets"
    assert refused("~/outside", [tree["root"]]) == roots.OUTSIDE


def test_roots_given_through_a_link_contain_paths_typed_either_way(tree: dict[str, Path], tmp_path: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(tree["root"], target_is_directory=True)
    usable, missing = roots.allowed_roots([alias, tmp_path / "gone", tree["root"] / "photo.jpg", tree["root"]])
    assert usable == (tree["root"],)  # resolved, the duplicate dropped
    assert missing == (tmp_path / "gone", tree["root"] / "photo.jpg")
    assert roots.check_folder(str(alias / "pets"), usable) == tree["root"] / "pets"


def test_data_roots_come_from_the_command_line_and_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOCO_APP_ARGS", "--data-root '/srv/my photos'")
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = state.parse_args(["--data-root", "/a", "--data-root=~/b", "--server.port", "1"])
    assert cfg.data_roots == (Path("/a"), Path("/home/someone/b"), Path("/srv/my photos"))
    monkeypatch.delenv("MOCO_APP_ARGS")
    assert state.parse_args([]).data_roots == ()


def test_choices_are_the_roots_and_their_sub_folders_that_stay_inside(tree: dict[str, Path]) -> None:
    root = tree["root"]
    assert roots.folder_choices([root]) == [root, root / "holiday", root / "pets"]
    assert roots.folder_choices([root], limit=1) == [root, root / "holiday"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every folder")
def test_an_unreadable_root_still_offers_itself(tree: dict[str, Path]) -> None:
    locked = tree["root"] / "pets"
    locked.chmod(0)
    try:
        assert roots.folder_choices([locked]) == [locked]
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize(("text", "shown"), [
    ("a`b`.png", r"a\`b\`\.png"),
    ("**bold** _it_ [x](y) <b>", r"\*\*bold\*\* \_it\_ \[x\]\(y\) \<b\>"),
    ("www.x.org https://y me@z.org", "www\u2060\\.x\\.org https\u2060\\://y me\\@\u2060z\\.org"),
    ("$x^2$ :red[r] :material/home: # h", r"\$x\^2\$ \:red\[r\] \:material/home\: \# h"),
    ("line\nbreak\ttab", "line\ufffdbreak\ufffdtab"),
    ("caf\udce9.jpg", r"caf\ufffd\.jpg".replace(r"\ufffd", "\ufffd")),  # a Latin-1 name, kept as a surrogate
])
def test_markdown_escaping(text: str, shown: str) -> None:
    assert markup.md(text) == shown


def test_code_spans_hold_any_backticks() -> None:
    assert markup.code("plain.png") == "`plain.png`"
    assert markup.code("a`b.png") == "``a`b.png``"
    assert markup.code("``x") == "``` ``x ```"
    assert markup.code("") == ""
    assert markup.readable(Path("x\udcff")) == "x\ufffd"
