"""Collection page: what a collection holds (counts, model, index, skipped files) and builds and
updates started from the form, run for real as child processes."""

from __future__ import annotations

import io
import os
import re
import sys
import time
import warnings
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from app import builds, jobs, roots, state
from indexer.build import build
from indexer.collection import Collection
from tests.app.conftest import make_app, plain
from tests.indexer.conftest import VNNI, add_bad_files, int8_pair, make_images, make_model, picture

PAGE = "views/collection.py"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder with a model in models/ and no collection yet."""
    root = tmp_path_factory.mktemp("collection-page")
    make_model(root / "models" / "tiny.onnx")
    return root


@pytest.fixture(scope="module")
def bad_collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A collection of 19 good pictures and every kind of bad file (their expected reasons)."""
    base = tmp_path_factory.mktemp("bad-collection")
    images = make_images(base / "photos", per_class=6)
    expected = add_bad_files(images)
    out = base / "indexes" / "photos"
    with warnings.catch_warnings():  # Pillow warns about the bomb the indexer then refuses
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        build(images, out, model=make_model(base / "tiny.onnx"), device="cpu", progress=False).close()
    return out, expected


def _page(collection: Path | None, monkeypatch: pytest.MonkeyPatch, *extra: str) -> AppTest:
    at = make_app(collection, monkeypatch, *extra)
    at.switch_page(PAGE).run()  # before the first run, so the demo page (and its build) never starts
    assert not at.exception, at.exception
    return at


def _metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def _submit(at: AppTest, images: str, name: str = "", model: Path | None = None) -> AppTest:
    """Fill the form and press Build; ``model``: choose it in the list first (after the folder,
    which preselects the model trained on it, or none)."""
    at.text_input(key="build_images").input(images)
    at.text_input(key="build_name").input(name)
    if model is not None:
        at.run()
        at.selectbox(key="build_model").select(model)
    next(b for b in at.button if b.label == "Build").click().run()
    assert not at.exception, at.exception
    return at


def test_counts_model_index_and_skipped_files(bad_collection: tuple[Path, dict[str, str]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    directory, expected = bad_collection
    at = _page(directory, monkeypatch)
    assert _metric(at, "Indexed images") == "19"
    assert _metric(at, "Skipped files") == str(len(expected))
    assert _metric(at, "Generation") == "1"
    model_table = at.table[0]
    assert model_table.proto.hide_header and model_table.proto.hide_index  # a description list, no empty header
    rows = {plain(k).strip("*"): plain(v) for k, v in model_table.value.itertuples(index=False)}
    assert rows["architecture"] == "tiny-projection (test)"
    assert rows["image size"].startswith("32 px")
    assert rows["training quality"].startswith("not measured: ")
    assert any("recall@10" in m.value or "Flat" in m.value for m in at.markdown)  # the recipe, described
    assert any("CPUExecutionProvider" in m.value for m in at.markdown)
    by_reason, files = (d.value for d in at.dataframe)
    assert by_reason["files"].sum() == len(expected)
    assert set(files["path"]) == set(expected)
    for path, reason in expected.items():
        got = files.loc[files["path"] == path, "reason"].iloc[0]
        assert re.fullmatch(reason, got), (path, got)
    assert [e.value for e in at.error] == []


def test_without_a_collection_only_the_form_is_shown(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    at = _page(None, monkeypatch, f"--workdir={workdir}", f"--data-root={tmp_path}")
    assert [t.value for t in at.title] == ["Collections"]
    assert not at.metric and not at.dataframe
    assert at.selectbox(key="build_model").options == ["tiny.onnx · trained on none (test fixture), 32 px"]


def test_without_a_data_root_there_is_no_build_form(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    at = _page(None, monkeypatch, f"--workdir={workdir}")
    assert not at.text_input and not [b for b in at.button if b.label == "Build"]
    assert [c.value for c in at.caption if "--data-root" in c.value] == [roots.DISABLED]
    # A root that does not exist allows nothing either.
    at = _page(None, monkeypatch, f"--workdir={workdir}", f"--data-root={tmp_path / 'missing'}")
    assert not at.text_input and any(c.value == roots.DISABLED for c in at.caption)


def test_the_form_offers_the_roots_and_their_sub_folders(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                                        tmp_path: Path) -> None:
    (tmp_path / "a" / "cats").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "out").symlink_to(tmp_path / "b", target_is_directory=True)  # leads out of root a
    at = _page(None, monkeypatch, f"--workdir={workdir}", f"--data-root={tmp_path / 'a'}")
    a = (tmp_path / "a").resolve()
    assert at.selectbox(key="build_folder").options == [str(a), str(a / "cats")]


@pytest.mark.parametrize(("images", "name", "message"), [
    ("/no/such/folder", "", roots.OUTSIDE),
    ("{outside}", "", roots.OUTSIDE),
    ("{outside}/secret.jpg", "", roots.OUTSIDE),
    ("{root}/link-out", "", roots.OUTSIDE),
    ("link-out", "", roots.OUTSIDE),
    ("../outside", "", "'..' is not accepted"),
    ("%2e%2e%2Foutside", "", "percent-encoded"),
    ("{root}/file.jpg", "", "is a file, not a folder of images."),
    ("nothing-here", "", "No readable folder at"),
    ("", "../escape", "is not a plain folder name"),
    ("{root}", "a/b", "is not a plain folder name"),
])
def test_the_form_rejects_bad_input_with_one_line(workdir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  images: str, name: str, message: str) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "file.jpg").write_bytes(picture_bytes())
    (outside / "secret.jpg").write_bytes(picture_bytes())
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    at = _page(None, monkeypatch, f"--workdir={workdir}", f"--data-root={root}")
    _submit(at, images.format(root=root, outside=outside), name)
    assert len(at.error) == 1 and message in plain(at.error[0].value)
    assert "Traceback" not in at.error[0].value
    if message == roots.OUTSIDE:
        assert str(outside) not in at.error[0].value
    assert "collection_page_jobs" not in at.session_state  # no job was started


def picture_bytes() -> bytes:
    buf = io.BytesIO()
    picture(1).save(buf, "JPEG")
    return buf.getvalue()


def test_a_build_from_the_form_runs_in_the_background_and_makes_a_collection(
        workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = make_images(tmp_path / "holiday", per_class=3)
    at = _page(None, monkeypatch, f"--workdir={workdir}", f"--data-root={tmp_path}")
    tiny = workdir / "models" / "tiny.onnx"
    _submit(at, "holiday", "holiday", tiny)  # relative to the data root; a model not trained on it, chosen
    out = workdir / "indexes" / "holiday"
    job = jobs.get(builds.build_key(out))
    assert job is not None, "the form started no job"
    assert any(m.value == "**Building holiday**" for m in at.markdown)  # its panel is on the page
    assert job.wait(60), "the build did not finish in a minute"
    assert job.status == "done", job.error
    with Collection.open(out, device="cpu") as col:
        assert len(col) == 10 and col.image_root == images.resolve()
    at.run()
    assert not at.exception, at.exception
    assert any("done in" in s.value for s in at.success)
    assert "holiday" in at.sidebar.selectbox[0].options  # the picker lists the new collection
    _submit(at, str(images), "holiday")  # the same name again is refused
    assert "exists already" in at.error[0].value
    at.text_input(key="build_images").input("")  # the chosen folder from the list, when nothing is typed
    at.selectbox(key="build_folder").select(str(images.resolve()))
    _submit(at, "", "holiday-2")
    second = jobs.get(builds.build_key(workdir / "indexes" / "holiday-2"))
    assert second is not None and second.wait(60) and second.status == "done", second and second.error


def test_a_failed_build_shows_its_error_line(workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    at = _page(None, monkeypatch, f"--workdir={workdir}", f"--data-root={tmp_path}")
    _submit(at, str(tmp_path / "empty"), "nothing-here", workdir / "models" / "tiny.onnx")
    job = jobs.get(builds.build_key(workdir / "indexes" / "nothing-here"))
    assert job is not None and job.wait(60)
    at.run()
    assert job.status == "failed"
    assert len(at.error) == 1 and "no image files" in at.error[0].value


def test_a_running_job_shows_its_progress_bar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = ("import sys, time; sys.stdout.write('embedding:  40%|####      | 4/10\\r'); sys.stdout.flush(); "
              "time.sleep(60)")
    job = jobs.start("test:progress", "Slow job", [jobs.Stage("Sleeping", [sys.executable, "-c", script])], tmp_path)
    try:
        deadline = time.monotonic() + 30
        while job.states[0].fraction is None and time.monotonic() < deadline:
            time.sleep(0.05)
        at = make_app(None, monkeypatch, f"--workdir={tmp_path}")
        at.session_state["collection_page_jobs"] = ["test:progress"]
        at.switch_page(PAGE).run()
        assert not at.exception, at.exception
        bars = at.get("progress")
        assert len(bars) == 1 and bars[0].proto.value == 40 and "4/10" in bars[0].proto.text
    finally:
        job.cancel()
        job.wait(10)


def test_update_button_embeds_new_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_images(tmp_path / "photos", per_class=3)
    directory = tmp_path / "indexes" / "photos"
    build(root, directory, model=make_model(tmp_path / "tiny.onnx"), device="cpu", progress=False).close()
    at = _page(directory, monkeypatch)
    assert _metric(at, "Indexed images") == "10"
    picture(4242).save(root / "class0" / "new.png")
    at.button(key="update_collection").click().run()
    job = jobs.get(builds.update_key(directory))
    assert job is not None and job.wait(60) and job.status == "done", job and job.error
    at.run()
    assert not at.exception, at.exception
    assert _metric(at, "Indexed images") == "11" and _metric(at, "Generation") == "2"
    assert state.generation_of(directory) == 2


def test_check_build_returns_absolute_paths_under_the_indexes_folder(tmp_path: Path) -> None:
    model = make_model(tmp_path / "models" / "m.onnx")
    (tmp_path / "pics").mkdir()
    allowed = [tmp_path.resolve()]
    request = builds.check_build(str(tmp_path / "pics"), "", model, "auto", tmp_path / "indexes", allowed)
    assert request.out == (tmp_path / "indexes" / "pics").resolve() and request.images.is_absolute()
    with pytest.raises(builds.FormError, match="No model"):
        builds.check_build(str(tmp_path / "pics"), "x", None, "auto", tmp_path / "indexes", allowed)
    with pytest.raises(builds.FormError, match="recipe"):
        builds.check_build(str(tmp_path / "pics"), "x", model, "IVF1,Flat; rm -rf", tmp_path / "indexes", allowed)
    with pytest.raises(builds.FormError, match="Not an allowed image folder"):
        builds.check_build(str(tmp_path / "pics"), "x", model, "auto", tmp_path / "indexes", [model.parent])
    with pytest.raises(builds.FormError, match="--data-root"):
        builds.check_build(str(tmp_path / "pics"), "x", model, "auto", tmp_path / "indexes", [])
    assert builds.list_models(tmp_path) == [model]


def test_the_form_embeds_with_the_verified_int8_sibling_where_int8_is_faster(tmp_path: Path) -> None:
    """The model list offers networks; the precision follows the rule of ``indexer build`` (issue 18
    item 3): on a CPU with VNNI/AMX the verified int8 sibling embeds, elsewhere the fp32 model, and
    the form says which before anything starts."""
    (tmp_path / "pics").mkdir()
    fp32, int8 = int8_pair(tmp_path / "models", tmp_path / "pics")
    allowed = [tmp_path.resolve()]
    fast = builds.check_build(str(tmp_path / "pics"), "a", fp32, "auto", tmp_path / "indexes", allowed, cpu_flags=VNNI)
    assert fast.model == fp32.resolve() and fast.variant.path == int8.resolve() and fast.variant.precision == "int8"
    plain_cpu = builds.check_build(str(tmp_path / "pics"), "b", fp32, "auto", tmp_path / "indexes", allowed,
                                   cpu_flags=frozenset({"fpu", "avx2"}))
    assert plain_cpu.variant.path == fp32.resolve() and plain_cpu.variant.precision == "fp32"
    words = builds.variant_words(fp32, cpu_flags=VNNI)
    assert words.startswith("Precision int8 (photos-int8.onnx)") and "verified" in words
    assert "no VNNI/AMX" in builds.variant_words(fp32, cpu_flags=frozenset())
    int8.unlink()
    assert builds.variant_words(fp32, cpu_flags=VNNI).startswith("Precision fp32 (photos.onnx): fp32: no int8 sibling")


def test_the_form_preselects_the_model_trained_on_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The form never picks a model silently: the one trained on the folder is preselected and
    named with what it was trained on; for a folder no model was trained on, none is selected
    and the form asks the person to choose (issue 17 item 6)."""
    workdir, data = tmp_path / "work", tmp_path / "data"
    holiday = make_images(data / "holiday", per_class=2)
    (data / "clothes").mkdir()
    mine = make_model(workdir / "models" / "holiday.onnx",
                      props={"moco.train_data": f"7 images in {holiday.resolve()}"})
    stamp = mine.stat().st_mtime - 100
    os.utime(mine, (stamp, stamp))  # older than the other model: the newest file is not what decides
    make_model(workdir / "models" / "digits.onnx", image_size=16, props={"moco.train_data": "1797 images in /x/digits"})
    at = _page(None, monkeypatch, f"--workdir={workdir}", f"--data-root={data}")
    at.text_input(key="build_images").input("holiday").run()
    picker = at.selectbox(key="build_model")
    assert picker.value == mine
    assert picker.options == ["digits.onnx · trained on 1797 images in /x/digits, 16 px",
                              f"holiday.onnx · trained on 7 images in {holiday.resolve()}, 32 px"]
    assert any("trained on this folder" in c.value and "holiday.onnx" in c.value for c in at.caption)
    at.text_input(key="build_images").input("clothes").run()
    assert at.selectbox(key="build_model").value is None  # nothing chosen for the person
    assert any("No model was trained on" in w.value for w in at.warning)
    next(b for b in at.button if b.label == "Build").click().run()
    assert len(at.error) == 1 and "No model was trained on" in plain(at.error[0].value)
    assert "collection_page_jobs" not in at.session_state
    at.selectbox(key="build_model").select(workdir / "models" / "digits.onnx").run()  # the person's choice holds
    assert at.selectbox(key="build_model").value == workdir / "models" / "digits.onnx"
    assert any("chosen by you" in c.value for c in at.caption)


def test_the_message_after_a_build_fits_how_the_app_was_started(tmp_path: Path) -> None:
    key = builds.build_key(tmp_path / "indexes" / "new")
    listed = builds.done_message(key, "Building new", 12.3, None)
    assert "done in 12 s" in listed and "sidebar" in listed
    fixed = builds.done_message(key, "Building new", 12.3, tmp_path / "old")
    assert "sidebar" not in fixed and "--collection" in fixed and str((tmp_path / "indexes" / "new").resolve()) in fixed
    updated = builds.done_message(builds.update_key(tmp_path / "old"), "Updating old", 3, tmp_path / "old")
    assert "updated collection" in updated and "sidebar" not in updated
