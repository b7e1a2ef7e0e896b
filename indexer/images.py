"""The one image decoding path shared by training, export checks, indexing and queries.

Every consumer (``moco`` data loading, ``exports`` verification, the indexer and the app's
uploads) opens, orients, converts and resizes pictures through this module, so a model is
served on exactly the pixels it was trained and evaluated on. It depends on Pillow and numpy
only (no torch, FAISS or ONNX Runtime), so that the training side can import it cheaply.

Decoding is defensive because real photo folders contain empty files, half-copied JPEGs,
text files with image extensions, gigantic scans, broken links, FIFOs and unreadable folders.
:func:`load_rgb` turns each of those into an :class:`ImageDecodeError` with a short ``reason``
that callers record (e.g. in ``items.sqlite``) instead of crashing a long indexing or training
run. No Pillow global (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) is
changed here: other code in the same process may rely on them, and mutating them is not
thread-safe.

Memory is bounded by the output, not by the input's shape:

* a file is identified from its first bytes (Pillow's format probes, on a buffered handle, so a
  few kB are read) before anything else; a 2 GB file of zeros named ``.tif`` is refused after
  one 8 kB read, never read whole, and only identified images are hashed (in 1 MB chunks);
* the header's size is checked before any pixel is decoded: more than ``max_pixels`` pixels
  ("decompression bomb") or a long side more than :data:`DEFAULT_MAX_ASPECT` times the short
  side ("extreme aspect ratio": a 200,000 x 1 PNG of 667 bytes) is refused unread;
* :func:`apply_resize` never enlarges a long strip: past :data:`EXACT_RESIZE_AREA` it resizes
  only the centre square the model sees (Pillow's ``resize(box=...)``), so its memory is a small
  multiple of the model's input whatever the shape of the image it is given.

File names are bytes on POSIX and need not be UTF-8 (old disks, archives). Python holds them as
``str`` with surrogate escapes, which SQLite, JSON files and terminals refuse. Each name found by
:func:`scan_images` therefore has two forms: ``ImageRef.path``, the real path to open, and
``ImageRef.relpath``, a lossless, valid-UTF-8 text key (:func:`fs_to_text`: each undecodable
byte becomes ``\\xNN``, readable in a terminal or the app); :func:`text_to_fs` and
:func:`resolve_relpath` turn a stored key back into the file's path.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from indexer.files import NotRegularFile, open_regular, sha256_handle

__all__ = [
    "DEFAULT_MAX_ASPECT",
    "DEFAULT_MAX_PIXELS",
    "EXACT_RESIZE_AREA",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageRef",
    "LoadedImage",
    "apply_resize",
    "fs_to_text",
    "load_rgb",
    "load_rgb_bytes",
    "open_regular_file",
    "parse_resize_recipe",
    "read_image",
    "resize_recipe",
    "resolve_relpath",
    "THUMBNAIL_SIZE",
    "scan_images",
    "text_to_fs",
    "thumbnail_jpeg",
    "to_uint8_array",
    "working_size",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
)
"""File suffixes treated as images (lower-case; compare with ``suffix.lower()``)."""

DEFAULT_MAX_PIXELS = 100_000_000
"""Largest width * height decoded by default: a 100 MP photo still fits (about 300 MB as RGB),
while a crafted 50,000 x 50,000 PNG of a few kB (a decompression bomb) is refused unread."""

DEFAULT_MAX_ASPECT = 50.0
"""Largest ratio of long side to short side decoded by default. The model sees the centre square
of an image, which for a 50:1 strip is 2% of it; beyond that a file is a separator line, a
banner or a crafted strip (a 667-byte PNG of 200,000 x 1 pixels), not a picture to learn from or
search by, and decoding and enlarging it would cost memory in proportion to its length. Such
files are refused from their header ("extreme aspect ratio"), before any pixel is decoded.
Panoramas (up to about 10:1) and long screenshots (about 20:1) stay well inside."""

# Only the formats named by IMAGE_EXTENSIONS (DIB: a BMP variant; multi-picture MPO files from
# cameras and phones are opened by the JPEG plugin). Restricting Image.open keeps rarely
# exercised parsers, and EPS (which would run Ghostscript), away from untrusted uploads. The
# content decides the format, not the suffix, so a PNG saved as ``.jpg`` still opens.
_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF")

# Ratio of the resize short side to the crop size: the standard ImageNet evaluation recipe
# (resize 256, crop 224) scaled to any image size.
_CROP_FRACTION = 0.875

_ORIENTATION_TAG = 0x0112


class ImageDecodeError(Exception):
    """An image that cannot be turned into RGB pixels.

    ``reason`` is a short, stable, machine-friendly string (stored per item and counted in
    reports): ``"missing"``, ``"broken symlink"``, ``"permission denied"``, ``"not a file"``
    (a FIFO, socket or device named like an image: never opened, a FIFO would block forever),
    ``"unreadable folder"`` (a sub-folder that cannot be listed, see :func:`scan_images`),
    ``"read error"``, ``"empty file"``, ``"not an image"``, ``"truncated"``, ``"corrupt"``,
    ``"decompression bomb"``, ``"extreme aspect ratio"``, ``"unsupported mode"``,
    ``"out of memory"``. ``str(error)`` is the readable message.
    """

    def __init__(self, reason: str, detail: str = "", path: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.path = path
        message = reason if not detail else f"{reason}: {detail}"
        if path is not None:
            message = f"{path}: {message}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        # DataLoader workers and process pools pickle exceptions; the default reduce would
        # rebuild from the formatted message only and lose ``reason``.
        return (type(self), (self.reason, self.detail, self.path))


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedImage:
    """A decoded image and what an index stores about its file.

    ``image`` is fully loaded 8-bit RGB (possibly JPEG-draft scaled). ``width``/``height`` are
    the file's own size as shown (EXIF rotation applied), not the draft-scaled size, so the size
    stored for a photo does not depend on the model it was indexed for. ``sha256`` is the hash of
    the file's bytes when :func:`read_image` was asked for it: the content identity ``update``
    compares when size or mtime changed.
    """

    image: Image.Image
    width: int
    height: int
    sha256: str | None = None


def read_image(
    path: str | os.PathLike[str],
    *,
    min_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = DEFAULT_MAX_ASPECT,
    sha256: bool = False,
) -> LoadedImage:
    """Decode the image file at ``path`` (see :func:`load_rgb`), with its shown size and hash.

    The file is opened once (:func:`open_regular_file`: never a FIFO, device or folder),
    identified from its first bytes and decoded from the open handle, so Pillow reads what the
    decoder needs and nothing is held twice in memory. With ``sha256`` the same handle is then
    hashed in 1 MB chunks: only files that decoded are read to the end, so a huge non-image
    costs one small read, and a huge image costs constant memory to hash.
    """
    _check_limits(min_side, max_pixels, max_aspect)
    name = os.fspath(path)
    fh = open_regular_file(name)
    with fh:
        if os.fstat(fh.fileno()).st_size == 0:
            raise ImageDecodeError("empty file", "0 bytes", name)
        if not sha256:
            return _decode(fh, name=name, min_side=min_side, max_pixels=max_pixels, max_aspect=max_aspect)
        # Pillow closes the handle it decoded from (even one it did not open): give it its own.
        with os.fdopen(os.dup(fh.fileno()), "rb") as pillow_fh:
            loaded = _decode(pillow_fh, name=name, min_side=min_side, max_pixels=max_pixels, max_aspect=max_aspect)
        return LoadedImage(loaded.image, loaded.width, loaded.height, _hash_handle(fh, name))


def load_rgb(
    path: str | os.PathLike[str],
    *,
    min_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> Image.Image:
    """Decode the image file at ``path`` into a fully loaded 8-bit RGB image.

    ``min_side``: when given, JPEGs are decoded at a reduced scale (libjpeg's DCT scaling via
    ``draft``) as long as the decoded short side stays >= ``min_side``; this makes decoding
    multi-megapixel photos for a 64-224 px model several times faster. Other formats decode
    at full size. ``max_pixels``: images whose header announces more pixels are refused before
    any pixel is decoded, and so are those whose long side is more than ``max_aspect`` times the
    short one (:data:`DEFAULT_MAX_ASPECT`). Pillow's own guard still applies underneath (it
    warns above ``Image.MAX_IMAGE_PIXELS``, ~89 MP, and refuses above twice that); it is left
    untouched because it is process-wide, so a ``max_pixels`` above ~179 MP cannot raise the
    limit.

    EXIF orientation is applied, the first frame of animations is used and every mode is
    converted to RGB (alpha composited on white). Every failure raises
    :class:`ImageDecodeError`, never another exception type, so callers need one ``except``.
    """
    return read_image(path, min_side=min_side, max_pixels=max_pixels, max_aspect=max_aspect).image


def load_rgb_bytes(
    data: bytes,
    *,
    min_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> Image.Image:
    """Decode an image held in memory (an upload); same rules and errors as :func:`load_rgb`."""
    _check_limits(min_side, max_pixels, max_aspect)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load_rgb_bytes expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("empty file", "0 bytes", "<bytes>")
    return _decode(io.BytesIO(bytes(data)), name="<bytes>", min_side=min_side, max_pixels=max_pixels,
                   max_aspect=max_aspect).image


def open_regular_file(path: str | os.PathLike[str]) -> IO[bytes]:
    """Open a regular file for reading; refuse anything else without ever blocking on it.

    :func:`indexer.files.open_regular` does the opening (never a FIFO, device or folder, and no
    hang on a file swapped for a FIFO meanwhile); here every failure becomes an
    :class:`ImageDecodeError` whose reason says why (missing, broken symlink, permission
    denied, not a file, unreadable folder, read error).
    """
    name = os.fspath(path)
    try:
        return open_regular(name)
    except NotRegularFile as exc:
        if exc.kind == "a folder":
            try:
                with os.scandir(name):
                    pass
            except OSError as err:
                raise ImageDecodeError("unreadable folder", str(err.strerror or err), name) from err
        raise ImageDecodeError("not a file", exc.kind, name) from exc
    except FileNotFoundError as exc:
        reason = "broken symlink" if os.path.islink(name) else "missing"
        raise ImageDecodeError(reason, "no such file", name) from exc
    except PermissionError as exc:
        raise ImageDecodeError("permission denied", str(exc.strerror or exc), name) from exc
    except OSError as exc:  # ELOOP (a symlink loop), ENAMETOOLONG, EIO ...
        raise ImageDecodeError("read error", str(exc.strerror or exc), name) from exc


def _hash_handle(fh: IO[bytes], name: str) -> str:
    """sha256 of a whole open file (:func:`indexer.files.sha256_handle`); a failed read is an
    :class:`ImageDecodeError`."""
    try:
        return sha256_handle(fh)
    except OSError as exc:
        raise ImageDecodeError("read error", str(exc.strerror or exc), name) from exc


def _check_limits(min_side: int | None, max_pixels: int, max_aspect: float) -> None:
    """Reject nonsensical arguments early: they are programming errors, not bad images."""
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side must be >= 1 or None, got {min_side}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if not max_aspect >= 1.0:  # also refuses NaN
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")


def _decode(fp: IO[bytes], *, name: str, min_side: int | None, max_pixels: int,
            max_aspect: float) -> LoadedImage:
    """Identify, check the header's size, optionally draft, load, orient and convert.

    ``Image.open`` only reads the header (its format probes look at the first bytes), so a
    non-image is refused after one small read and an oversized or degenerate one before any
    pixel is decoded. Errors are mapped to reasons.
    """
    try:
        img = Image.open(fp, formats=_FORMATS)
    except ImageDecodeError:
        raise
    except Exception as exc:  # every decoder failure becomes a reason
        raise ImageDecodeError(_reason_for(exc), _describe(exc), name) from exc
    try:
        width, height = img.size
        if width * height > max_pixels:
            raise ImageDecodeError(
                "decompression bomb",
                f"{width}x{height} = {width * height:,} pixels is more than max_pixels={max_pixels:,}",
                name,
            )
        short, long = min(width, height), max(width, height)
        if short < 1:
            raise ImageDecodeError("corrupt", f"{width}x{height} has no pixels", name)
        if long > max_aspect * short:
            raise ImageDecodeError("extreme aspect ratio",
                                   f"{width}x{height} is longer than {max_aspect:g}:1", name)
        if min_side is not None:
            _draft(img, min_side)
        # load() decodes every pixel now, so a truncated file fails here and not later in a
        # resize or a DataLoader worker. LOAD_TRUNCATED_IMAGES is left at Pillow's False. It runs
        # before anything reads EXIF: Pillow's PNG getexif() loads the pixels itself, and a failed
        # load there, swallowed, left a half-decoded (black) image that a second load() accepted.
        img.load()
        if _stored_sideways(img):
            width, height = height, width
        _apply_exif_orientation(img)
        return LoadedImage(_to_rgb(img, name), width, height)
    except ImageDecodeError:
        raise
    except Exception as exc:  # every decoder failure becomes a reason
        raise ImageDecodeError(_reason_for(exc), _describe(exc), name) from exc
    finally:
        img.close()


def _stored_sideways(img: Image.Image) -> bool:
    """True when the EXIF orientation turns the picture by 90 degrees (phones store it so)."""
    try:
        return img.getexif().get(_ORIENTATION_TAG) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - corrupt EXIF: the pixels are kept as decoded
        return False

def _reason_for(exc: BaseException) -> str:
    """Map a Pillow/decoder exception to one of the short reasons of ImageDecodeError."""
    if isinstance(exc, Image.DecompressionBombError):
        return "decompression bomb"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return "truncated"
    return "corrupt"


def _describe(exc: BaseException) -> str:
    """A one-line description of the underlying error for the human-readable message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _draft(img: Image.Image, min_side: int) -> None:
    """Ask the JPEG decoder for a 1/2, 1/4 or 1/8 scale that keeps the short side >= min_side.

    Pillow picks the largest scale s with s <= min(W // w, H // h) for the requested (w, h) and
    decodes ceil(W / s) x ceil(H / s); requesting ceil(W * f) x ceil(H * f) with
    f = min_side / short side therefore never goes below ``min_side``. A no-op for non-JPEGs.
    """
    width, height = img.size
    short = min(width, height)
    if short <= min_side:
        return
    factor = min_side / short
    img.draft("RGB", (max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))))


def _apply_exif_orientation(img: Image.Image) -> None:
    """Rotate/flip in place as the EXIF orientation tag says (phones store pictures sideways).

    A malformed EXIF block must not make otherwise readable pixels unusable, so errors while
    reading the tag leave the image as decoded.
    """
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001 - corrupt EXIF: keep the pixels, skip the rotation
        return
    if orientation in (None, 1):
        return
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - same as above
        log.debug("ignoring unusable EXIF orientation %r", orientation)


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """Return a new 8-bit RGB image for any Pillow mode.

    Transparent pixels become white (the usual background of logos and icons, and what a
    browser shows), rather than whatever colour happens to sit under alpha = 0. High bit-depth
    and float grey are scaled to 0-255 instead of being clipped to mostly white.
    """
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        return _grey_to_uint8(img, name).convert("RGB")
    has_alpha = (
        mode in _ALPHA_MODES
        or "transparency" in img.info
        or (mode == "P" and getattr(img.palette, "mode", "") == "RGBA")
    )
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")  # RGB -> copy; L, 1, P, CMYK, YCbCr, RGBX ... -> RGB
    except ValueError as exc:  # e.g. LAB or HSV: no direct conversion in Pillow
        raise ImageDecodeError("unsupported mode", f"cannot convert mode {mode} to RGB", name) from exc


def _grey_to_uint8(img: Image.Image, name: str) -> Image.Image:
    """Scale 16/32-bit integer or float grey to an 8-bit 'L' image.

    * ``I;16*`` (16-bit PNG/TIFF): v / 257, i.e. 65535 -> 255, the full 16-bit range.
    * ``I`` (32-bit): if all values are within 0..65535 it is 16-bit data decoded into 32 bits
      (how Pillow stores many 16-bit files), scaled like ``I;16``; otherwise min-max stretched.
    * ``F``: NaN/inf -> 0; data already in [0, 1] is multiplied by 255, anything else is
      min-max stretched.
    """
    try:
        arr = np.asarray(img)
    except Exception as exc:  # exotic raw layouts numpy cannot view
        raise ImageDecodeError("unsupported mode", f"cannot read mode {img.mode} pixels", name) from exc
    if arr.ndim != 2:
        raise ImageDecodeError("unsupported mode", f"mode {img.mode} with shape {arr.shape}", name)
    values = arr.astype(np.float32)
    if img.mode == "F":
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lo = float(values.min()) if values.size else 0.0
    hi = float(values.max()) if values.size else 0.0
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = values * 255.0
    elif img.mode != "F" and lo >= 0.0 and hi <= 65535.0:
        scaled = values / 257.0
    elif hi > lo:
        scaled = (values - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(values)
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


# --------------------------------------------------------------------------------------------
# Resize recipe (the same for export, indexing and evaluation)
# --------------------------------------------------------------------------------------------


def working_size(image_size: int) -> int:
    """Short side used to decode/resize images for a model of input size ``image_size``.

    round(S / 0.875): 73 for 64, 256 for 224. Training decodes images at this size (a little
    above S, leaving room for crops) and serving resizes to it before the center crop.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    return round(image_size / _CROP_FRACTION)


def resize_recipe(image_size: int) -> str:
    """The resize recipe string stored in the ONNX metadata (``moco.resize``).

    ``"short_side=73;center_crop=64"`` for 64. Serialised as text so that the exported model
    says how it must be fed, and the indexer follows that instead of guessing.
    """
    return f"short_side={working_size(image_size)};center_crop={image_size}"


_RECIPE_KEYS = ("short_side", "center_crop")


def parse_resize_recipe(text: str) -> dict[str, int]:
    """Parse ``"short_side=73;center_crop=64"`` into ``{"short_side": 73, "center_crop": 64}``.

    Strict on purpose: an unknown key or a malformed value means a model from a newer or
    different exporter, and silently ignoring part of its recipe would feed it pixels it was
    not trained on. Raises ``ValueError`` with the offending text.
    """
    parts = [p.strip() for p in str(text).split(";") if p.strip()]
    out: dict[str, int] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _RECIPE_KEYS:
            raise ValueError(f"unknown resize recipe entry {part!r} in {text!r}; expected {_RECIPE_KEYS}")
        if key in out:
            raise ValueError(f"duplicate resize recipe key {key!r} in {text!r}")
        try:
            number = int(value.strip())
        except ValueError:
            raise ValueError(f"resize recipe value for {key!r} is not an integer in {text!r}") from None
        if number < 1:
            raise ValueError(f"resize recipe value for {key!r} must be >= 1 in {text!r}")
        out[key] = number
    missing = [k for k in _RECIPE_KEYS if k not in out]
    if missing:
        raise ValueError(f"resize recipe {text!r} lacks {missing}")
    if out["center_crop"] > out["short_side"]:
        raise ValueError(f"resize recipe {text!r}: center_crop is larger than short_side")
    return out


EXACT_RESIZE_AREA = 16
"""Largest resized image :func:`apply_resize` makes whole, in units of ``short_side ** 2`` (a
16:1 strip; 4 MB for a 224 px model): every picture up to that shape is resized whole and then
cropped, the reference arithmetic, bit for bit. A longer strip is never enlarged whole."""


def apply_resize(img: Image.Image, recipe: str) -> Image.Image:
    """Resize the short side to ``short_side`` (bicubic, antialiased), then center crop S x S.

    Bicubic: Pillow's resampling filters widen their support when downscaling, so this is
    antialiased, unlike a plain interpolating resize. The long side is ``int(short_side *
    long / short)`` and the crop offset ``round((size - S) / 2)``, the same arithmetic as
    torchvision's ``Resize(int)`` + ``CenterCrop``. The output is always exactly S x S.

    Memory is bounded by the output: an image whose resized form would exceed
    :data:`EXACT_RESIZE_AREA` x ``short_side**2`` pixels (a 200,000 x 1 strip would become
    14.6 M x 73) has only the crop's source region resampled (``resize(box=...)``, the same
    filter and scale; the values differ from resize-then-crop by Pillow's pass order only, under
    one level on average). :func:`load_rgb` refuses strips longer than 50:1 by default anyway;
    this keeps any image a caller passes in safe.
    """
    spec = parse_resize_recipe(recipe)
    short_side, crop = spec["short_side"], spec["center_crop"]
    if img.mode != "RGB":
        img = img.convert("RGB")
    width, height = img.size
    if width <= height:
        new_w, new_h = short_side, max(short_side, int(short_side * height / width))
    else:
        new_w, new_h = max(short_side, int(short_side * width / height)), short_side
    left = round((new_w - crop) / 2.0)
    top = round((new_h - crop) / 2.0)
    if (new_w, new_h) == (width, height):
        return img.crop((left, top, left + crop, top + crop))
    if new_w * new_h <= EXACT_RESIZE_AREA * short_side * short_side:
        return img.resize((new_w, new_h), Image.Resampling.BICUBIC).crop((left, top, left + crop, top + crop))
    sx, sy = width / new_w, height / new_h
    box = (left * sx, top * sy, min(width, (left + crop) * sx), min(height, (top + crop) * sy))
    return img.resize((crop, crop), Image.Resampling.BICUBIC, box=box)


def to_uint8_array(img: Image.Image) -> npt.NDArray[np.uint8]:
    """HxWx3 C-contiguous, writable uint8 array (the ONNX model's ``images`` input layout)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.array(img, dtype=np.uint8, copy=True, order="C")


THUMBNAIL_SIZE = 128
"""Longest side of stored thumbnails: a grid cell in the app; a few kB as JPEG."""
THUMBNAIL_QUALITY = 80


def thumbnail_jpeg(img: Image.Image, size: int = THUMBNAIL_SIZE, *,
                   file_size: tuple[int, int] | None = None) -> bytes:
    """The small JPEG a grid shows for an image (collection items and uploaded queries alike).

    Larger images shrink to ``size`` on their longest side. Small ones (a 32 px CIFAR image, a
    scanned digit), whose file is at most half of ``size``, are enlarged by a whole factor with
    nearest-neighbour sampling: the browser would otherwise blur them up to the grid cell, and a
    person judging neighbours needs to see the pixels the model saw. ``file_size`` is the file's
    own width and height: an image decoded at a reduced (JPEG draft) scale is not enlarged, so a
    photo decoded small is never shown as blocks.
    """
    full_scale = file_size is None or tuple(file_size) == img.size
    if full_scale and max(img.size) * 2 <= size:
        factor = size // max(img.size)
        thumb = img.resize((img.width * factor, img.height * factor), Image.Resampling.NEAREST)
    else:
        thumb = img.copy()
        thumb.thumbnail((size, size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    thumb.convert("RGB").save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Folder scanning
# --------------------------------------------------------------------------------------------


def fs_to_text(name: str) -> str:
    r"""A file-system name (``str`` with surrogate escapes) as lossless, valid-UTF-8 text.

    Why: POSIX names are bytes, often not UTF-8 on old disks and archives; Python keeps each
    undecodable byte as a lone surrogate (U+DC80-U+DCFF), which SQLite, JSON files and
    terminals refuse (``UnicodeEncodeError``). The text form writes such a byte as ``\xNN``
    (lower-case hex), readable where it is shown. To stay reversible, a literal backslash is
    doubled when the text after it starts with a backslash or an ``x``; any other name,
    every valid UTF-8 name without such a backslash included, is its own text, so keys
    stored by earlier versions are unchanged. :func:`text_to_fs` is the inverse.
    """
    if "\\" not in name and not any("\udc80" <= ch <= "\udcff" for ch in name):
        return name
    out: list[str] = []
    for ch in reversed(name):  # right to left: a backslash depends on what follows it
        if "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch == "\\":
            following = out[-1][:1] if out else ""
            out.append("\\\\" if following in ("\\", "x") else "\\")
        else:
            out.append(ch)
    return "".join(reversed(out))


_HEX = frozenset("0123456789abcdef")


def text_to_fs(text: str) -> str:
    """The inverse of :func:`fs_to_text`: the name to open, with surrogate escapes."""
    if "\\" not in text:
        return text
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and text[i + 1:i + 2] == "\\":
            out.append("\\")
            i += 2
        elif (ch == "\\" and text[i + 1:i + 2] == "x" and len(text[i + 2:i + 4]) == 2
              and set(text[i + 2:i + 4]) <= _HEX and int(text[i + 2:i + 4], 16) >= 0x80):
            out.append(chr(0xDC00 + int(text[i + 2:i + 4], 16)))
            i += 4
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def resolve_relpath(root: str | os.PathLike[str], relpath: str) -> Path:
    """The file a stored ``relpath`` (an :attr:`ImageRef.relpath`) names under ``root``."""
    return Path(root) / text_to_fs(relpath)


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One image file found under a root folder, or one entry that could not be looked into.

    ``path`` is absolute but not symlink-resolved (so a broken link can still be reported as
    such), with the name's real bytes; ``relpath`` is the POSIX path relative to the root as
    lossless valid text (:func:`fs_to_text`; the stable key used in indexes, caches and
    reports; :func:`resolve_relpath` turns it back). ``label`` is the first-level sub-folder
    (ImageFolder rule, as text too) or None for files in the root; ``size``/``mtime_ns`` come
    from the link target (0 for broken links) and let an index update skip unchanged files
    without reading them. A sub-folder that cannot be listed is an entry too, with a
    ``relpath`` ending in ``/``: decoding it fails with the reason "unreadable folder".
    """

    path: Path
    relpath: str
    label: str | None
    size: int
    mtime_ns: int


def scan_images(root: str | os.PathLike[str]) -> list[ImageRef]:
    """List the image files under ``root`` recursively, sorted by ``relpath``.

    Hidden files and folders (name starting with '.') are skipped: they hold thumbnails,
    ``.git`` objects or macOS ``._`` resource forks, not pictures. Symlinks are followed
    (directory cycles are detected, cut and logged). Nothing else is dropped silently: every
    entry below is listed, so that whoever decodes it records it with its reason:

    * a broken link named like an image (size 0, mtime 0): "broken symlink";
    * a FIFO, socket or device named like an image: "not a file" (it is never opened);
    * a sub-folder that cannot be listed (permissions): one entry ``"sub/dir/"``, "unreadable
      folder"; once it can be read, the next scan lists its images instead;
    * a folder named like an image (``x.jpg/``) is a folder: it is walked into like any other,
      and its images are indexed under ``x.jpg/...``.

    Names that are not valid UTF-8 are kept (see :func:`fs_to_text`). An unreadable root is a
    ``PermissionError`` (a usage error, not a bad file).
    """
    root_path = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    if not root_path.exists():
        raise FileNotFoundError(f"image folder not found: {root_path}")
    if not root_path.is_dir():
        raise NotADirectoryError(f"not a folder: {root_path} (give the folder that holds the images)")
    try:
        with os.scandir(root_path):
            pass
    except OSError as exc:
        raise PermissionError(f"cannot read the image folder {root_path}: {exc.strerror or exc}") from None
    root_stat = root_path.stat()
    refs = list(_walk(root_path, (), {(root_stat.st_dev, root_stat.st_ino)}))
    refs.sort(key=lambda ref: ref.relpath)
    return refs


def _walk(directory: Path, parts: tuple[str, ...], ancestors: set[tuple[int, int]]) -> Iterator[ImageRef]:
    """Yield ImageRefs below ``directory``; ``ancestors`` holds (dev, inode) of the current chain."""
    texts = tuple(fs_to_text(p) for p in parts)
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        log.warning("unreadable folder %s: %s", fs_to_text(str(directory)), exc.strerror or exc)
        try:
            st = directory.stat()
            size, mtime_ns = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime_ns = 0, 0
        yield ImageRef(path=directory, relpath="/".join(texts) + "/", label=texts[0] if texts else None,
                       size=size, mtime_ns=mtime_ns)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError:
                is_dir = False  # vanished or unstat-able: listed below if named like an image
            else:
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    log.warning("skipping symlink cycle at %s", fs_to_text(entry.path))
                    continue
                yield from _walk(Path(entry.path), (*parts, entry.name), ancestors | {key})
                continue
        if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        try:
            st = entry.stat(follow_symlinks=True)
            size, mtime_ns = st.st_size, st.st_mtime_ns  # a FIFO too: decoding says "not a file"
        except OSError:
            # Broken symlink (or a target we may not stat): keep it so loading reports why.
            size, mtime_ns = 0, 0
        yield ImageRef(
            path=directory / entry.name,
            relpath="/".join((*texts, fs_to_text(entry.name))),
            label=texts[0] if texts else None,
            size=size,
            mtime_ns=mtime_ns,
        )
