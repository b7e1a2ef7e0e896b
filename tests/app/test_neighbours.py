"""The Neighbours page (landing page): default query, clicking results, uploads good and bad."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app import markup, state
from app.query import MAX_UPLOAD_MB, UploadError, embed_upload
from indexer import store
from indexer.build import build
from indexer.collection import Collection
from tests.app.conftest import PER_CLASS
from tests.indexer.conftest import COLORS, encode, make_images, make_model, picture


def query_title(at: AppTest) -> str:
    """The query's file name, drawn as inline code under the "Query" heading."""
    return next(m.value for m in at.markdown if m.value.startswith("`")).split()[0]


def test_landing_page_opens_with_a_query_and_its_neighbours(app: AppTest) -> None:
    app.run()
    assert not app.exception
    assert [s.value for s in app.subheader] == ["Query", "Top 10 neighbours"]
    result_buttons = [b for b in app.button if b.key and b.key.startswith("hits:")]
    assert len(result_buttons) == 10
    assert app.file_uploader[0].label.startswith("Find images like this one")


def test_clicking_a_result_makes_it_the_query(app: AppTest, collection_dir: Path) -> None:
    app.run()
    first = next(b for b in app.button if b.key and b.key.startswith("hits:"))
    item_id = int(first.key.split(":")[1])
    first.click().run()
    assert not app.exception
    with Collection.open(collection_dir) as collection:
        expected = collection.item(item_id).path
    assert query_title(app) == f"`{expected}`"
    # The new query's own neighbours are shown, and it is not among them.
    assert f"hits:{item_id}" not in [b.key for b in app.button]


def test_uploading_an_image_finds_its_class(app: AppTest) -> None:
    app.run()
    # A new picture of class 1's colour: its nearest neighbours are class 1 pictures.
    data = encode(picture(4242, COLORS[1]), "PNG")
    app.file_uploader[0].upload("query.png", data, "image/png").run()
    assert not app.exception
    assert not app.error
    assert query_title(app) == "`query.png`"
    captions = [c.value for c in app.caption if c.value.startswith("**")]  # "**0.93** · label  \n`name`"
    labels = [c.split("·")[1].split()[0] for c in captions[:5]]
    assert labels.count("class1") >= 4, labels


def test_a_bad_upload_gets_one_clear_line(app: AppTest) -> None:
    app.run()
    app.file_uploader[0].upload("notes.png", b"this is a text file, not a picture\n" * 20, "image/png").run()
    assert not app.exception
    expected = "Cannot use notes.png: it is not an image the app can read (jpg, png or webp)."
    assert [e.value for e in app.error] == [markup.md(expected)]  # escaped: the file name is the sender's
    # The previous query and its neighbours are still there.
    assert [s.value for s in app.subheader] == ["Query", "Top 10 neighbours"]


def test_upload_rules(collection_dir: Path) -> None:
    with Collection.open(collection_dir) as collection:
        with pytest.raises(UploadError, match="limit is"):
            embed_upload(collection, "huge.jpg", b"\xff" * (MAX_UPLOAD_MB * 2**20 + 1))
        with pytest.raises(UploadError, match="empty"):
            embed_upload(collection, "empty.jpg", b"")
        jpeg_named_png = encode(picture(1, COLORS[0]), "JPEG")
        embedded = embed_upload(collection, "photo.png", jpeg_named_png)
        assert embedded.vector.shape == (collection.dim,)
        assert embedded.thumbnail[:2] == b"\xff\xd8"


def test_uploading_the_same_file_again_after_a_click_makes_it_the_query_again(app: AppTest) -> None:
    app.run()
    data = encode(picture(4242, COLORS[1]), "PNG")
    app.file_uploader[0].upload("query.png", data, "image/png").run()
    assert query_title(app) == "`query.png`"
    next(b for b in app.button if b.key and b.key.startswith("hits:")).click().run()
    assert query_title(app) != "`query.png`"
    assert app.file_uploader[0].value is None  # emptied, so choosing the same file is a new choice
    app.file_uploader[0].upload("query.png", data, "image/png").run()
    assert not app.exception
    assert query_title(app) == "`query.png`"
    app.run()  # a rerun for another reason keeps the upload as the query
    assert query_title(app) == "`query.png`"


def test_markdown_in_an_upload_name_is_shown_as_written(app: AppTest) -> None:
    app.run()
    name = "my `odd` **name** $x$ :red[r].png"
    app.file_uploader[0].upload(name, encode(picture(5, COLORS[0]), "PNG"), "image/png").run()
    assert not app.exception and not app.error
    assert query_title(app) == markup.code(name).split()[0]
    assert any(m.value.startswith(markup.code(name) + "  \n") for m in app.markdown)
    bad = "`bad` *file*.png"
    app.file_uploader[0].upload(bad, b"not a picture", "image/png").run()
    expected = f"Cannot use {bad}: it is not an image the app can read (jpg, png or webp)."
    assert [e.value for e in app.error] == [markup.md(expected)]


def test_odd_file_and_folder_names_are_shown_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names from the disk (files and label folders) are never drawn as markdown."""
    root = tmp_path / "photos"
    names = {"[x](y)": "a*b*.png", "_lab_": "c`d`.png", "`e`": "$f$.png"}
    for seed, (label, name) in enumerate(names.items()):
        (root / label).mkdir(parents=True)
        picture(seed, COLORS[seed]).save(root / label / name)
        picture(seed + 10, COLORS[seed]).save(root / label / f"plain{seed}.png")
    directory = tmp_path / "indexes" / "odd"
    build(root, directory, model=make_model(tmp_path / "m.onnx"), device="cpu", progress=False).close()
    from tests.app.conftest import make_app

    at = make_app(directory, monkeypatch)
    at.run()
    at.segmented_control(key="query_mode").set_value("Pick from the collection").run()
    for label, name in names.items():
        at.text_input(key="name_filter").input(name).run()
        assert any(c.value == markup.md(name) for c in at.caption)  # the browse grid's caption
        next(b for b in at.button if b.key and b.key.startswith("browse:")).click().run()
        assert not at.exception
        assert any(m.value == f"{markup.code(f'{label}/{name}')}  \nlabel **{markup.md(label)}**"
                   for m in at.markdown)
        captions = [c.value for c in at.caption if c.value.startswith("**")]
        assert any(markup.md(label) in c for c in captions), captions


def test_filter_and_browse_pick(app: AppTest, collection_dir: Path) -> None:
    app.run()
    app.segmented_control(key="query_mode").set_value("Pick from the collection").run()
    app.text_input(key="name_filter").input("class2/").run()
    assert any(c.value == f"{PER_CLASS} images match" for c in app.caption)
    pick = next(b for b in app.button if b.key and b.key.startswith("browse:"))
    pick.click().run()
    assert query_title(app).startswith("`class2/")


def test_images_are_served_only_from_inside_the_root(collection_dir: Path, tmp_path: Path) -> None:
    with Collection.open(collection_dir) as collection:
        inside = collection.items[0].path
        assert state.safe_image_path(collection, inside) == (collection.image_root / inside).resolve()
        outside = tmp_path / "secret.txt"
        outside.write_text("private")
        assert state.safe_image_path(collection, str(outside)) is None
        assert state.safe_image_path(collection, "../" * 10 + str(outside).lstrip("/")) is None
        assert state.safe_image_path(collection, "no/such/file.jpg") is None
        assert state.safe_image_path(collection, "class0/\x00.png") is None


def test_a_link_inside_the_root_to_a_file_outside_is_not_served(tmp_path: Path) -> None:
    root = make_images(tmp_path / "photos", per_class=2)
    secret = tmp_path / "secret.png"
    picture(99, COLORS[0]).save(secret)
    (root / "class0" / "innocent.png").symlink_to(secret)
    (root / "class1" / "inside-link.png").symlink_to(root / "loose.jpg")
    with build(root, tmp_path / "col", model=make_model(tmp_path / "m.onnx"), device="cpu",
               progress=False) as collection:
        assert state.safe_image_path(collection, "class0/innocent.png") is None
        assert state.safe_image_path(collection, "class1/inside-link.png") == (root / "loose.jpg").resolve()


def test_a_collection_that_cannot_be_opened_gets_one_line_with_its_name_as_written(
        collection_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection of a newer format (or deleted, damaged meanwhile): the page says why in one
    line, the folder's name drawn as written, and draws nothing else."""
    copy = tmp_path / "`odd` *name*"
    shutil.copytree(collection_dir, copy)
    manifest = json.loads((copy / store.MANIFEST).read_text())
    manifest["format_version"] = store.FORMAT_VERSION + 1
    (copy / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(store.CollectionError) as refused:
        Collection.open(copy)
    from tests.app.conftest import make_app

    at = make_app(copy, monkeypatch)
    at.run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == [f"Cannot open {markup.code(copy)}: {markup.md(refused.value)}"]
    assert not at.subheader and not at.image


def test_collection_argument_that_is_not_a_collection(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.app.conftest import make_app

    at = make_app(tmp_path / "nothing-here", monkeypatch)
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and "No collection at" in at.error[0].value


def test_the_original_is_shown_from_inside_the_image_folder_only(collection_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.app.conftest import make_app

    copy = tmp_path / "collection"
    shutil.copytree(collection_dir, copy)
    at = make_app(copy, monkeypatch)
    at.run()
    images_before = len(at.image)
    at.toggle(key="show_original").set_value(True).run()
    assert not at.exception
    assert len(at.image) == images_before + 1
    # The file gone from the image folder: a line says so, nothing else is read.
    title = query_title(at).strip("`")
    with Collection.open(copy) as collection:
        (collection.image_root / title).rename(tmp_path / "moved-away")
    try:
        at.run()
        assert any("not in the image folder" in c.value for c in at.caption)
    finally:
        (tmp_path / "moved-away").rename(collection.image_root / title)
