"""End to end in a real headless Chromium: start the server, upload a query, see its neighbours;
names shown as written; and a browser session cannot build, list or view anything outside the
folders the server was started with (``--data-root``), however the path is spelled.

Uses Debian's chromium (``apt-get install chromium``, done by ``.ci/run``) driven by playwright;
never a browser download. Without a browser the test is skipped, except where
``MOCO_REQUIRE_BROWSER=1`` (CI) makes a missing browser a failure. The screenshot is kept in
``test-artifacts/`` for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from app import local_server, roots
from indexer.build import build
from indexer.collection import Collection
from tests.indexer.conftest import COLORS, make_images, make_model, picture

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"


def browser_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return Path(local_server.CHROMIUM).is_file()


pytestmark = pytest.mark.skipif(
    not browser_available() and os.environ.get("MOCO_REQUIRE_BROWSER") != "1",
    reason="needs playwright and Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def server(collection_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app on one collection, with no --data-root (so no build form)."""
    with local_server.serve("--collection", str(collection_dir),
                            log=tmp_path_factory.mktemp("server") / "streamlit.log") as running:
        yield running.url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = local_server.launch_chromium(p)
        try:
            yield launched
        finally:
            launched.close()


def test_upload_in_a_real_browser_shows_neighbours(server: str, browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    query = tmp_path / "my-query.png"
    picture(777, COLORS[2]).save(query)
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    try:
        page.goto(server)
        expect(page.get_by_text("Top 10 neighbours")).to_be_visible(timeout=60_000)
        page.locator("input[type=file]").set_input_files(str(query))
        expect(page.get_by_text("my-query.png", exact=True)).to_be_visible(timeout=60_000)
        results = page.get_by_role("button", name="Search this")
        expect(results).to_have_count(10, timeout=30_000)
        page.wait_for_timeout(500)  # let the thumbnails paint before the picture is taken
        page.screenshot(path=str(ARTIFACTS / "neighbours-upload.png"), full_page=True)
        # Clicking a neighbour, then choosing the same file again, makes the upload the query again.
        results.first.click()
        expect(page.get_by_text("my-query.png", exact=True)).to_have_count(0, timeout=30_000)
        page.locator("input[type=file]").set_input_files(str(query))
        expect(page.get_by_text("my-query.png", exact=True)).to_be_visible(timeout=30_000)
    finally:
        page.close()
    assert (ARTIFACTS / "neighbours-upload.png").stat().st_size > 10_000


def test_names_with_markdown_are_shown_as_written(server: str, browser: Any, tmp_path: Path) -> None:
    """An upload's name is the sender's text: drawn exactly, in code and in running text."""
    from playwright.sync_api import expect

    name = "a`b` **c** _d_ $x$ :red[r] :smile: <b>e<i> [l](x) www.x.org me@x.org 1. #h.png"
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    picture(5, COLORS[0]).save(good / name)
    (bad / name).write_bytes(b"not a picture")
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    try:
        page.goto(server)
        expect(page.get_by_text("Top 10 neighbours")).to_be_visible(timeout=60_000)
        page.locator("input[type=file]").set_input_files(str(good / name))
        expect(page.locator("code").filter(has_text=name)).to_have_count(1, timeout=30_000)
        assert page.locator("code").filter(has_text=name).inner_text() == name
        page.locator("input[type=file]").set_input_files(str(bad / name))
        error = page.get_by_test_id("stAlertContentError")
        expect(error).to_have_count(1, timeout=30_000)
        shown = error.inner_text().strip().replace("\u2060", "")  # the invisible joiner that stops autolinks
        assert shown == f"Cannot use {name}: it is not an image the app can read (jpg, png or webp)."
        assert error.locator("a, b, strong, em, code, .katex").count() == 0, error.inner_html()
    finally:
        page.close()


def test_without_a_data_root_the_build_form_is_absent(server: str, browser: Any) -> None:
    from playwright.sync_api import expect

    page = browser.new_page()
    try:
        page.goto(f"{server}/collection")
        expect(page.get_by_text("Building from the app is off")).to_be_visible(timeout=60_000)
        assert page.get_by_role("button", name="Build").count() == 0
        assert page.get_by_role("textbox", name="…or type a folder inside them", exact=True).count() == 0
    finally:
        page.close()


# ---------------------------------------------------------------------------------------------
# A server that allows one data root: nothing outside it can be built, listed or viewed
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """allowed/ (the data root: photos, a file, links out) beside outside/ (secrets), a collection
    of allowed/photos that holds a link to a secret picture, and the server over them."""
    base = tmp_path_factory.mktemp("guarded")
    allowed, outside = base / "allowed", base / "outside"
    photos = make_images(allowed / "photos", per_class=4)
    make_images(outside / "secret-photos", per_class=2)
    picture(99, COLORS[1]).save(outside / "secret.png")
    (allowed / "file.jpg").write_bytes(b"not a folder")
    (allowed / "link-out").symlink_to(outside / "secret-photos", target_is_directory=True)
    (photos / "class0" / "innocent.png").symlink_to(outside / "secret.png")
    workdir = base / "work"
    model = make_model(workdir / "models" / "tiny.onnx")
    build(photos, workdir / "indexes" / "photos", model=model, device="cpu", progress=False).close()
    with local_server.serve("--workdir", str(workdir), "--data-root", str(allowed),
                            log=base / "streamlit.log") as running:
        yield {"url": running.url, "allowed": allowed, "outside": outside, "indexes": workdir / "indexes"}


def test_a_browser_cannot_build_list_or_view_outside_the_data_roots(guarded: dict[str, Any], browser: Any) -> None:
    from playwright.sync_api import expect

    allowed, outside = guarded["allowed"], guarded["outside"]
    attempts = {  # typed path -> the one line the page answers
        str(outside / "secret-photos"): roots.OUTSIDE,  # plain
        str(outside / "secret.png"): roots.OUTSIDE,  # a file outside: no "is a file"
        str(outside / "nothing"): roots.OUTSIDE,  # nothing: no "does not exist"
        "/etc": roots.OUTSIDE,
        str(allowed / "link-out"): roots.OUTSIDE,  # a link inside that leads out
        "link-out": roots.OUTSIDE,  # the same, relative to the data root
        "../outside/secret-photos": "'..' is not accepted: type the folder's own path, inside an allowed folder.",
        f"{allowed}/%2e%2e/outside": "Type the folder as it is on disk: percent-encoded text (such as %2F) is "
                                     "not accepted.",
        "..%2Foutside%2Fsecret-photos": "Type the folder as it is on disk: percent-encoded text (such as %2F) is "
                                        "not accepted.",
        "file.jpg": f"{allowed / 'file.jpg'} is a file, not a folder of images.",  # inside: may be specific
    }
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    try:
        page.goto(f"{guarded['url']}/collection")
        folder = page.get_by_role("combobox", name="Image folder")
        expect(folder).to_be_visible(timeout=60_000)
        options = page.get_by_role("option")
        for _ in range(4):  # a rerun of the page (it settles after loading) closes a menu opened meanwhile
            folder.click()  # the list offers the root and its sub-folders, never the link that leads out
            try:
                expect(options).to_have_count(2, timeout=10_000)
                break
            except AssertionError:
                page.keyboard.press("Escape")
        offered = [o.strip() for o in options.all_inner_texts()]
        assert offered == [str(allowed.resolve()), str((allowed / "photos").resolve())]
        page.keyboard.press("Escape")
        for n, (typed, message) in enumerate(attempts.items()):
            page.get_by_role("textbox", name="…or type a folder inside them", exact=True).fill(typed)
            page.get_by_role("textbox", name="Collection name", exact=True).fill(f"attempt-{n}")
            page.get_by_role("button", name="Build").click()
            error = page.get_by_test_id("stAlertContentError")
            expect(error).to_have_text(message, timeout=30_000)
            if message == roots.OUTSIDE:
                assert str(outside) not in page.locator("body").inner_text()  # (the typed box aside)
        assert sorted(p.name for p in guarded["indexes"].iterdir()) == ["photos"]  # nothing was built
        # The sidebar lists the collections under indexes/ only.
        page.get_by_test_id("stSidebar").get_by_role("combobox").click()
        assert [o.strip() for o in page.get_by_role("option").all_inner_texts()] == ["photos"]
        page.keyboard.press("Escape")

        # A picture of the collection that is a link to a file outside: its original is not shown.
        page.goto(guarded["url"])
        expect(page.get_by_text("Top 10 neighbours")).to_be_visible(timeout=60_000)
        page.get_by_text("Pick from the collection", exact=True).click()
        page.get_by_role("textbox", name="Filter by file name", exact=True).fill("innocent")
        page.get_by_role("textbox", name="Filter by file name", exact=True).press("Enter")
        expect(page.get_by_text("1 images match")).to_be_visible(timeout=30_000)
        use = page.get_by_role("button", name="Use", exact=True)
        expect(use).to_have_count(1, timeout=30_000)  # the earlier grid's buttons gone
        use.click()
        expect(page.locator("code").filter(has_text="class0/innocent.png")).to_be_visible(timeout=30_000)
        images_before = page.get_by_role("img").count()
        page.get_by_text("Show the original").click()
        expect(page.get_by_text("The original file is not in the image folder")).to_be_visible(timeout=30_000)
        assert page.get_by_role("img").count() == images_before

        # Nor is anything reachable by a URL of the server itself.
        for path in ("/media/..%2F..%2F..%2Fetc%2Fpasswd", "/app/static/..%2F..%2Fetc%2Fpasswd",
                     f"/media/{outside / 'secret.png'}", "/component/..%2F..%2Fetc%2Fpasswd"):
            response = page.request.get(guarded["url"] + path)
            assert response.status != 200 or b"root:" not in response.body(), path
    finally:
        page.close()


# ---------------------------------------------------------------------------------------------
# Nothing is fetched from another host
# ---------------------------------------------------------------------------------------------


def test_the_app_requests_nothing_from_another_host(server: str, browser: Any) -> None:
    """Icons, fonts and scripts come from the app's own server: a page that calls a font service
    or a CDN leaks who uses the app, and breaks where there is no internet."""
    from playwright.sync_api import expect

    own = urlsplit(server).netloc
    requested: list[str] = []
    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.on("request", lambda request: requested.append(request.url))
    try:
        page.goto(server)
        expect(page.get_by_text("Top 10 neighbours")).to_be_visible(timeout=60_000)
        for title, shown in (("Map", "Map"), ("Few labels", "Few labels"), ("Collection", "Collection")):
            page.get_by_test_id("stSidebarNav").get_by_text(title, exact=True).click()
            expect(page.get_by_role("heading", name=shown).first).to_be_visible(timeout=60_000)
        page.wait_for_timeout(1500)  # late requests: the favicon, fonts, lazy chunks
    finally:
        page.close()
    assert requested
    outside = sorted({url for url in requested if urlsplit(url).scheme in ("http", "https", "ws", "wss")
                      and urlsplit(url).netloc != own})
    assert not outside, outside


# ---------------------------------------------------------------------------------------------
# Labels typed in the interactive mode land on the image beside their box (issue 17.7)
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def labelling(collection_dir: Path, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The app on a copy of the session's collection (labels are written into it)."""
    copy = tmp_path / "photos"
    shutil.copytree(collection_dir, copy)
    with local_server.serve("--collection", str(copy), log=tmp_path / "streamlit.log") as running:
        yield {"url": running.url, "collection": copy}


def test_typed_labels_land_on_the_image_beside_their_box(labelling: dict[str, Any], browser: Any) -> None:
    """Type a label under every suggested image, ending each with Enter, Tab or a click
    elsewhere, then save: each label is stored on the image whose name was shown above its box."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    try:
        page.goto(f"{labelling['url']}/few_labels")
        page.get_by_text("Label interactively", exact=True).click()
        expect(page.get_by_text("Label these", exact=True)).to_be_visible(timeout=60_000)
        boxes = page.get_by_placeholder("label", exact=True)
        expect(boxes).to_have_count(8, timeout=30_000)
        cells = page.get_by_test_id("stColumn").filter(has=page.get_by_placeholder("label", exact=True))
        names = [cell.get_by_test_id("stCaptionContainer").inner_text().replace("\u2060", "").strip()
                 for cell in cells.all()]
        assert len(names) == 8 and len(set(names)) == 8, names
        endings = ["Enter", "click", "Tab", "Enter", "Enter", "click", "Tab", "Enter"]
        for n, ending in enumerate(endings):
            box = boxes.nth(n)
            box.click()
            box.press_sequentially(f"tag{n}", delay=20)
            if ending == "click":
                page.get_by_text("Label these", exact=True).click()
            else:
                box.press(ending)
            page.wait_for_timeout(300)  # time for a rerun, were one triggered
        page.wait_for_timeout(1000)
        shown = [cell.get_by_test_id("stCaptionContainer").inner_text().replace("\u2060", "").strip()
                 for cell in cells.all()]
        assert shown == names  # the grid did not move while the labels were typed
        assert [boxes.nth(n).input_value() for n in range(8)] == [f"tag{n}" for n in range(8)]
        with Collection.open(labelling["collection"]) as opened:
            assert opened.user_labels() == {}  # nothing stored before Save
        page.get_by_role("button", name="Save labels").click()
        expect(page.get_by_text("Saved 8 labels.")).to_be_visible(timeout=30_000)
    finally:
        page.close()
    with Collection.open(labelling["collection"]) as opened:
        assert opened.user_labels() == {name: f"tag{n}" for n, name in enumerate(names)}


def test_the_per_class_table_fits_without_scrolling(server: str, browser: Any) -> None:
    """At the default wide layout the Few labels page's per-class table shows all its columns."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    try:
        page.goto(f"{server}/few_labels")
        evaluate = page.get_by_role("button", name="Evaluate")
        expect(evaluate).to_be_visible(timeout=60_000)
        page.wait_for_timeout(1000)  # the first run settles before the click
        evaluate.click()
        heading = page.get_by_role("heading", name="Per class")
        expect(heading).to_be_visible(timeout=60_000)
        heading.scroll_into_view_if_needed()
        table = page.get_by_test_id("stDataFrame").last
        expect(table).to_be_visible(timeout=30_000)
        page.wait_for_timeout(500)
        widths = table.locator(".dvn-scroller").evaluate("e => [e.scrollWidth, e.clientWidth]")
    finally:
        page.close()
    assert widths[0] <= widths[1], f"the table scrolls sideways: {widths[0]} px of content in {widths[1]} px"


def test_the_map_takes_the_page_width(server: str, browser: Any) -> None:
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    try:
        page.goto(f"{server}/map")
        chart = page.get_by_test_id("stPlotlyChart")
        expect(chart).to_be_visible(timeout=60_000)
        page.wait_for_timeout(500)
        chart_width = chart.bounding_box()["width"]
        main_width = page.get_by_test_id("stMainBlockContainer").bounding_box()["width"]
        plot_width = chart.locator(".nsewdrag").first.bounding_box()["width"]  # the area the points use
    finally:
        page.close()
    assert chart_width >= 0.85 * main_width, (chart_width, main_width)
    assert plot_width >= 0.6 * main_width, (plot_width, main_width)
