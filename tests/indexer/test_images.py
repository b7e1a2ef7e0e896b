"""Tests for indexer.images: safe decoding, mode conversion, resize recipe and folder scanning.

Every test makes its own tiny images in tmp_path, so the suite needs no data and runs in seconds.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from indexer.images import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    ImageRef,
    LoadedImage,
    apply_resize,
    fs_to_text,
    load_rgb,
    load_rgb_bytes,
    open_regular_file,
    parse_resize_recipe,
    read_image,
    resize_recipe,
    resolve_relpath,
    scan_images,
    text_to_fs,
    thumbnail_jpeg,
    to_uint8_array,
    working_size,
)


def _noise(size: tuple[int, int] = (64, 48), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------------------------


def _reason(path: Path, **kwargs: object) -> str:
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path, **kwargs)  # type: ignore[arg-type]
    assert str(path) in str(info.value)  # the message names the file
    return info.value.reason


def test_empty_file(tmp_path: Path) -> None:
    assert _reason(_write(tmp_path / "empty.jpg", b"")) == "empty file"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path: Path, fmt: str) -> None:
    data = _encode(_noise(), fmt)
    path = _write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) // 2])
    assert _reason(path) == "truncated"
    assert _reason(path, min_side=8) == "truncated"  # draft mode decodes too
    with pytest.raises(ImageDecodeError) as info:
        load_rgb_bytes(data[: len(data) // 2])
    assert info.value.reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_text_with_image_extension(tmp_path: Path) -> None:
    path = _write(tmp_path / "notes.jpg", b"this is not a picture\n" * 10)
    assert _reason(path) == "not an image"
    with pytest.raises(ImageDecodeError, match="not an image"):
        load_rgb_bytes(b"hello")


def test_decompression_bomb_refused_before_decoding(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    path = _write(tmp_path / "big.png", _encode(Image.new("RGB", (100, 100)), "PNG"))
    assert _reason(path, max_pixels=5_000) == "decompression bomb"
    assert load_rgb(path, max_pixels=10_000).size == (100, 100)  # the limit is inclusive
    assert Image.MAX_IMAGE_PIXELS == before  # the Pillow global is never touched
    assert DEFAULT_MAX_PIXELS == 100_000_000


def test_missing_and_broken_symlink(tmp_path: Path) -> None:
    assert _reason(tmp_path / "nope.jpg") == "missing"
    link = tmp_path / "dangling.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    assert _reason(link) == "broken symlink"


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "folder.jpg").mkdir()
    assert _reason(tmp_path / "folder.jpg") == "not a file"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_permission_denied(tmp_path: Path) -> None:
    path = _write(tmp_path / "secret.png", _encode(_noise(), "PNG"))
    path.chmod(0)
    try:
        assert _reason(path) == "permission denied"
    finally:
        path.chmod(0o644)


def test_permission_error_is_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs as root too (where chmod 0 does not stop reads): simulate the failing open() of this file.
    path = _write(tmp_path / "secret.png", _encode(_noise(), "PNG"))
    real_open = os.open

    def deny(name: object, *args: object, **kwargs: object) -> int:
        if os.fspath(name) == str(path):  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied")
        return real_open(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", deny)
    assert _reason(path) == "permission denied"


def test_error_survives_pickling() -> None:
    # DataLoader workers send exceptions to the main process by pickling them.
    err = ImageDecodeError("truncated", "image file is truncated", "/x/y.jpg")
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.path, str(back)) == (err.reason, err.path, str(err))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's TIFF plugin warns about bad tags
def test_garbage_after_valid_header_raises_only_decode_error() -> None:
    """A valid start followed by junk is refused with ImageDecodeError, never another exception.

    Formats whose data has structure a decoder checks (PNG's zlib stream, GIF's LZW codes, BMP's
    and TIFF's sizes) are refused at every cut. JPEG and WebP decoders conceal damaged
    entropy-coded data as browsers do (no checksum tells junk from data), so past a complete
    header they give the picture at its announced size; cut inside the header, they are refused.
    """
    rng = np.random.default_rng(1)
    junk = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    reasons = {"not an image", "corrupt", "truncated", "decompression bomb"}
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"):
        good = _encode(_noise(), fmt)
        for cut in (16, 64, len(good) // 3):
            data = good[:cut] + junk
            if fmt in ("JPEG", "WEBP") and cut == len(good) // 3:
                concealed = load_rgb_bytes(data)
                assert (concealed.mode, concealed.size) == ("RGB", (64, 48)), (fmt, cut)
                continue
            with pytest.raises(ImageDecodeError) as info:
                load_rgb_bytes(data)
            assert info.value.reason in reasons, (fmt, cut, str(info.value))


def test_a_damaged_png_is_refused_not_decoded_half_black(tmp_path: Path) -> None:
    """Reading EXIF must not hide a failed decode: Pillow's PNG getexif() loads the pixels, and a
    second load() after a failed one used to return the half-decoded picture (black rows)."""
    good = _encode(_noise(), "PNG")
    damaged = good[: len(good) // 3] + bytes(range(256)) * 8
    with pytest.raises(ImageDecodeError, match="corrupt|truncated"):
        load_rgb_bytes(damaged)
    with pytest.raises(ImageDecodeError, match="corrupt|truncated"):
        load_rgb(_write(tmp_path / "damaged.png", damaged))


# ----------------------------------------------------------------------------------------------
# Orientation and modes
# ----------------------------------------------------------------------------------------------


def test_exif_orientation_applied(tmp_path: Path) -> None:
    # 40 x 20, left half red, right half blue; orientation 6 = "rotate 90 degrees clockwise".
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _write(
        tmp_path / "phone.jpg", _encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    )
    out = to_uint8_array(load_rgb(path))
    assert out.shape == (40, 20, 3)  # now portrait
    top, bottom = out[:15].mean(axis=(0, 1)), out[25:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # the left (red) edge went to the top
    assert bottom[2] > 200 and bottom[0] < 60


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((4, 4, 4), dtype=np.uint8)  # black, fully transparent
    arr[0, 0] = (255, 0, 0, 255)  # opaque red
    arr[0, 1] = (255, 0, 0, 128)  # half-transparent red
    path = _write(tmp_path / "logo.png", _encode(Image.fromarray(arr, "RGBA"), "PNG"))
    out = to_uint8_array(load_rgb(path))
    assert tuple(out[3, 3]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert out[0, 1, 0] == 255 and 120 <= out[0, 1, 1] <= 135


def test_la_composited_on_white() -> None:
    img = Image.new("LA", (2, 2), (0, 0))
    out = to_uint8_array(load_rgb_bytes(_encode(img, "PNG")))
    assert (out == 255).all()


def test_palette_with_transparency() -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 black, index 1 green
    img.putpixel((1, 1), 1)
    out = to_uint8_array(load_rgb_bytes(_encode(img, "PNG", transparency=0)))
    assert tuple(out[0, 0]) == (255, 255, 255)  # transparent black -> white
    assert tuple(out[1, 1]) == (0, 255, 0)


def test_sixteen_bit_grey_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    path = _write(tmp_path / "depth.png", _encode(Image.fromarray(values), "PNG"))
    out = to_uint8_array(load_rgb(path))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 100, 255, 4]  # 1000 / 257 = 3.9 -> 4
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_thirty_two_bit_and_float_grey() -> None:
    ints = Image.fromarray(np.array([[-100, 0, 100000]], dtype=np.int32))  # beyond 16 bits
    assert to_uint8_array(load_rgb_bytes(_encode(ints, "TIFF")))[0, :, 0].tolist() == [0, 0, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert to_uint8_array(load_rgb_bytes(_encode(unit, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.nan]], dtype=np.float32))
    assert to_uint8_array(load_rgb_bytes(_encode(wide, "TIFF")))[0, :, 0].tolist() == [0, 128, 255, 128]


def test_cmyk_jpeg() -> None:
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red in CMYK
    out = to_uint8_array(load_rgb_bytes(_encode(img, "JPEG", quality=95)))
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 230 and g < 30 and b < 30


@pytest.mark.parametrize("mode", ["1", "L"])
def test_bilevel_and_grey(mode: str) -> None:
    img = Image.new(mode, (3, 3), 1 if mode == "1" else 200)
    out = load_rgb_bytes(_encode(img, "PNG"))
    assert out.mode == "RGB"
    assert to_uint8_array(out)[0, 0].tolist() == ([255] * 3 if mode == "1" else [200] * 3)


def test_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    path = _write(tmp_path / "anim.gif", buf.getvalue())
    out = to_uint8_array(load_rgb(path))
    assert tuple(out[4, 4]) == (255, 0, 0)


def test_content_decides_format_not_suffix(tmp_path: Path) -> None:
    path = _write(tmp_path / "really_a_png.jpg", _encode(Image.new("RGB", (5, 7), (1, 2, 3)), "PNG"))
    assert to_uint8_array(load_rgb(path))[0, 0].tolist() == [1, 2, 3]


def test_returned_image_is_loaded_and_detached(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jpg", _encode(_noise(), "JPEG"))
    img = load_rgb(path)
    path.unlink()  # the file is closed and every pixel is already in memory
    assert img.mode == "RGB" and to_uint8_array(img).shape == (48, 64, 3)


# ----------------------------------------------------------------------------------------------
# Draft mode and resize recipe
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("min_side", [64, 75, 76, 150, 599, 600, 1000])
def test_draft_keeps_short_side(tmp_path: Path, min_side: int) -> None:
    path = _write(tmp_path / "photo.jpg", _encode(_noise((800, 600)), "JPEG"))
    img = load_rgb(path, min_side=min_side)
    assert min(img.size) >= min(min_side, 600)
    assert img.size[0] * 3 == img.size[1] * 4  # 1/1, 1/2, 1/4, 1/8 of 800 x 600
    if min_side <= 75:
        assert img.size == (100, 75)  # 1/8 scale: far less to decode
    assert load_rgb(path).size == (800, 600)


def test_draft_is_noop_for_png(tmp_path: Path) -> None:
    path = _write(tmp_path / "p.png", _encode(_noise((300, 200)), "PNG"))
    assert load_rgb(path, min_side=32).size == (300, 200)


def test_resize_recipe_strings() -> None:
    assert resize_recipe(64) == "short_side=73;center_crop=64"
    assert resize_recipe(224) == "short_side=256;center_crop=224"
    assert working_size(64) == 73 and working_size(224) == 256
    assert parse_resize_recipe("short_side=73;center_crop=64") == {"short_side": 73, "center_crop": 64}
    assert parse_resize_recipe(" center_crop=64 ; short_side=73 ;") == {"short_side": 73, "center_crop": 64}
    for bad in ("", "short_side=73", "short_side=73;center_crop=x", "short_side=60;center_crop=64",
                "short_side=73;center_crop=64;mode=fancy", "short_side=0;center_crop=0"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_resize_recipe(bad)


@pytest.mark.parametrize("size", [(300, 200), (50, 120), (10, 10), (73, 73), (64, 1000), (1, 1)])
@pytest.mark.parametrize("image_size", [32, 64])
def test_apply_resize_exact_square(size: tuple[int, int], image_size: int) -> None:
    out = apply_resize(_noise(size), resize_recipe(image_size))
    arr = to_uint8_array(out)
    assert arr.shape == (image_size, image_size, 3) and arr.dtype == np.uint8
    assert arr.flags.c_contiguous and arr.flags.writeable


def test_apply_resize_is_centered() -> None:
    arr = np.zeros((73, 200, 3), dtype=np.uint8)
    arr[:, 90:110] = 255  # a white stripe in the middle of a wide image
    out = to_uint8_array(apply_resize(Image.fromarray(arr), "short_side=73;center_crop=64"))
    assert out[:, 32].min() == 255 and out[:, 0].max() == 0 and out[:, -1].max() == 0


# ----------------------------------------------------------------------------------------------
# Scanning
# ----------------------------------------------------------------------------------------------


def test_scan_labels_hidden_sorting(tmp_path: Path) -> None:
    png = _encode(Image.new("RGB", (2, 2)), "PNG")
    for rel in ("cats/b.png", "cats/a.PNG", "dogs/deep/er/x.jpeg", "root.gif", "cats/.hidden.png",
                ".cache/thumb.png", "cats/notes.txt", "dogs/README", "Zebra/z.webp"):  # fmt: skip
        _write(tmp_path / rel, png)
    (tmp_path / "dogs" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "linked").symlink_to(tmp_path / "cats", target_is_directory=True)
    (tmp_path / "cats" / "loop").symlink_to(tmp_path, target_is_directory=True)

    refs = scan_images(tmp_path)
    rels = [r.relpath for r in refs]
    assert rels == sorted(rels)
    assert rels == [
        "Zebra/z.webp",
        "cats/a.PNG",
        "cats/b.png",
        "dogs/deep/er/x.jpeg",
        "dogs/gone.jpg",
        "linked/a.PNG",
        "linked/b.png",
        "root.gif",
    ]
    by_rel = {r.relpath: r for r in refs}
    assert by_rel["cats/a.PNG"].label == "cats"
    assert by_rel["dogs/deep/er/x.jpeg"].label == "dogs"
    assert by_rel["linked/b.png"].label == "linked"
    assert by_rel["root.gif"].label is None
    good = by_rel["cats/b.png"]
    assert good.path.is_absolute() and good.path == tmp_path / "cats" / "b.png"
    assert good.size == len(png) and good.mtime_ns > 0
    broken = by_rel["dogs/gone.jpg"]
    assert (broken.size, broken.mtime_ns) == (0, 0)
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(broken.path)
    assert info.value.reason == "broken symlink"
    assert isinstance(refs[0], ImageRef)
    with pytest.raises(AttributeError):
        refs[0].size = 1  # type: ignore[misc]  # frozen


def test_scan_relative_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "imgs" / "a" / "1.jpg", _encode(_noise((4, 4)), "JPEG"))
    monkeypatch.chdir(tmp_path)
    (ref,) = scan_images("imgs")
    assert ref.path == tmp_path / "imgs" / "a" / "1.jpg" and ref.relpath == "a/1.jpg"


def test_scan_bad_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        scan_images(tmp_path / "nope")
    _write(tmp_path / "file.jpg", b"x")
    with pytest.raises(NotADirectoryError):
        scan_images(tmp_path / "file.jpg")


def test_extensions() -> None:
    assert IMAGE_EXTENSIONS == frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})


def test_import_pulls_in_no_heavy_modules() -> None:
    # The training side imports indexer.images; it must not need torch, FAISS or ONNX Runtime.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import indexer, indexer.images, indexer.analysis\n"
        "heavy = [m for m in ('faiss', 'onnxruntime', 'torch', 'sklearn') if sys.modules.get(m)]\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_lazy_package_attributes() -> None:
    import indexer

    assert indexer.images.load_rgb is load_rgb  # sub-modules reachable as attributes
    assert "analysis" in dir(indexer)
    with pytest.raises(AttributeError):
        _ = indexer.no_such_name


def _jpeg_size_and_pixels(data: bytes) -> tuple[tuple[int, int], np.ndarray]:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "JPEG"
        return img.size, np.asarray(img.convert("RGB"), dtype=np.int16)


def test_thumbnails_of_small_images_show_their_pixels_sharply() -> None:
    rng = np.random.default_rng(0)
    checker = (rng.random((8, 8, 1)) > 0.5).repeat(3, axis=2).astype(np.uint8) * 255
    size, pixels = _jpeg_size_and_pixels(thumbnail_jpeg(Image.fromarray(checker)))
    assert size == (128, 128)  # enlarged 16 times, not left for the browser to blur
    centres = pixels[8::16, 8::16]  # the middle of each 16 x 16 block is the source pixel
    assert np.abs(centres - checker).max() < 40
    assert _jpeg_size_and_pixels(thumbnail_jpeg(Image.new("L", (32, 24), 90)))[0] == (128, 96)


def test_thumbnails_of_larger_or_draft_decoded_images_only_shrink() -> None:
    assert _jpeg_size_and_pixels(thumbnail_jpeg(Image.new("RGB", (400, 300), "red")))[0] == (128, 96)
    assert _jpeg_size_and_pixels(thumbnail_jpeg(Image.new("RGB", (100, 50), "red")))[0] == (100, 50)
    # a 480 px photo decoded at 1/8 scale is 60 px, but it is not a small image: no blocks
    drafted = Image.new("RGB", (60, 45), "red")
    assert _jpeg_size_and_pixels(thumbnail_jpeg(drafted, file_size=(480, 360)))[0] == (60, 45)
    assert _jpeg_size_and_pixels(thumbnail_jpeg(drafted, file_size=(60, 45)))[0] == (120, 90)


# ----------------------------------------------------------------------------------------------
# Odd files and shapes (issue 15): special files, aspect ratio, resize memory, names
# ----------------------------------------------------------------------------------------------


def test_special_files_named_like_images_are_refused_unopened(tmp_path: Path) -> None:
    import socket

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came: it must not be opened
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(fifo)
    assert info.value.reason == "not a file" and "FIFO" in str(info.value)
    with pytest.raises(ImageDecodeError, match="not a file"):
        open_regular_file(fifo)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock.png"))
        assert _reason(tmp_path / "sock.png") == "not a file"
    assert _reason(Path("/dev/null")) == "not a file"  # a device


def test_aspect_ratio_cap(tmp_path: Path) -> None:
    assert DEFAULT_MAX_ASPECT == 50
    ok = _write(tmp_path / "ok.png", _encode(Image.new("RGB", (500, 10)), "PNG"))
    strip = _write(tmp_path / "strip.png", _encode(Image.new("RGB", (10, 501)), "PNG"))
    assert load_rgb(ok).size == (500, 10)  # 50:1 is still a picture (the limit is inclusive)
    assert _reason(strip) == "extreme aspect ratio"
    with pytest.raises(ImageDecodeError, match="extreme aspect ratio"):
        load_rgb_bytes(strip.read_bytes())  # uploads follow the same rule
    assert load_rgb(strip, max_aspect=51).size == (10, 501)
    assert _reason(ok, max_aspect=10) == "extreme aspect ratio"
    with pytest.raises(ValueError):
        load_rgb(ok, max_aspect=0.5)


def test_read_image_gives_the_shown_size_and_the_files_hash(tmp_path: Path) -> None:
    import hashlib

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown turned by 90 degrees
    path = _write(tmp_path / "phone.jpg", _encode(_noise((800, 600)), "JPEG", exif=exif.tobytes()))
    loaded = read_image(path, min_side=64, sha256=True)
    assert (loaded.width, loaded.height) == (600, 800)  # the file's size as shown, not the draft's
    assert loaded.image.size == (75, 100)  # decoded at 1/8 and turned upright
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_image(path).sha256 is None  # hashed only when asked
    assert isinstance(loaded, LoadedImage)


def _resize_then_crop(img: Image.Image, short_side: int, crop: int) -> Image.Image:
    """The reference arithmetic (torchvision's Resize(int) + CenterCrop), resizing the whole image."""
    w, h = img.size
    new = (short_side, max(short_side, int(short_side * h / w))) if w <= h else \
        (max(short_side, int(short_side * w / h)), short_side)
    if new != img.size:
        img = img.resize(new, Image.Resampling.BICUBIC)
    left, top = round((new[0] - crop) / 2.0), round((new[1] - crop) / 2.0)
    return img.crop((left, top, left + crop, top + crop))


def test_apply_resize_is_the_reference_arithmetic_up_to_16_to_1() -> None:
    rng = np.random.default_rng(1)
    for trial in range(120):
        image_size = int(rng.choice([32, 64, 224]))
        short = int(rng.integers(1, 300))
        long = int(rng.integers(short, short * 16 + 1))
        size = (long, short) if trial % 2 else (short, long)
        if size[0] * size[1] > 2_000_000:
            continue
        img = _noise(size, seed=trial)
        expected = to_uint8_array(_resize_then_crop(img, working_size(image_size), image_size))
        assert np.array_equal(to_uint8_array(apply_resize(img, resize_recipe(image_size))), expected), size


def test_apply_resize_of_a_long_strip_is_its_centre_without_enlarging_it() -> None:
    ramp = np.tile(np.linspace(0, 255, 4000).astype(np.uint8)[None, :, None], (20, 1, 3))  # 4000 x 20
    img = Image.fromarray(ramp)
    out = to_uint8_array(apply_resize(img, "short_side=73;center_crop=64"))
    reference = to_uint8_array(_resize_then_crop(img, 73, 64))
    assert out.shape == (64, 64, 3)
    assert np.abs(out.astype(int) - reference).max() <= 2  # the same pixels, resampled from the centre only
    assert 120 < out.mean() < 135  # the middle of the ramp


def test_file_names_as_lossless_text() -> None:
    assert fs_to_text("café/é.png") == "café/é.png"  # valid UTF-8 names are their own key
    assert fs_to_text("a\\b.png") == "a\\b.png"  # so are names with a backslash that escapes nothing
    raw = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: a lone surrogate in Python's str
    assert fs_to_text(raw) == "caf\\xe9.png" and text_to_fs("caf\\xe9.png") == raw
    assert fs_to_text("caf\\xe9.png") == "caf\\\\xe9.png"  # the literal name differs from the byte
    assert resolve_relpath("/r", "d/caf\\xe9.png") == Path(os.fsdecode(b"/r/d/caf\xe9.png"))
    rng = np.random.default_rng(0)
    alphabet = ["\\", "x", "e", "9", "f", "a", "/", "é", os.fsdecode(b"\xe9"), os.fsdecode(b"\x80"),
                os.fsdecode(b"\xff")]
    keys: dict[str, str] = {}
    for _ in range(5000):
        name = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), int(rng.integers(0, 8))))
        text = fs_to_text(name)
        text.encode("utf-8")  # valid: SQLite, JSON and terminals accept it
        assert text_to_fs(text) == name
        assert keys.setdefault(text, name) == name  # two names never share a key
