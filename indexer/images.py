"""The one image decoding path shared by training, export checks, indexing and queries.

Every consumer (``moco`` data loading, ``exports`` verification, the indexer and the app's
uploads) opens, orients, converts and resizes pictures through this module, so a model is
served on exactly the pixels it was trained and evaluated on. It depends on Pillow and numpy
only (no torch, FAISS or ONNX Runtime), so that the training side can import it cheaply.

Decoding is defensive because real photo folders contain empty files, half-copied JPEGs,
text files with image extensions, gigantic scans and broken links. :func:`load_rgb` turns each
of those into an :class:`ImageDecodeError` with a short ``reason`` that callers record
(e.g. in ``items.sqlite``) instead of crashing a long indexing or training run. No Pillow
global (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) is changed here:
other code in the same process may rely on them, and mutating them is not thread-safe.
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "ImageRef",
    "apply_resize",
    "is_image_path",
    "load_rgb",
    "load_rgb_bytes",
    "parse_resize_recipe",
    "resize_recipe",
    "THUMBNAIL_SIZE",
    "scan_images",
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
    reports): ``"missing"``, ``"broken symlink"``, ``"permission denied"``, ``"not a file"``,
    ``"read error"``, ``"empty file"``, ``"not an image"``, ``"truncated"``, ``"corrupt"``,
    ``"decompression bomb"``, ``"unsupported mode"``, ``"out of memory"``. ``str(error)`` is the
    readable message.
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


def load_rgb(
    path: str | os.PathLike[str],
    *,
    min_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode the image file at ``path`` into a fully loaded 8-bit RGB image.

    ``min_side``: when given, JPEGs are decoded at a reduced scale (libjpeg's DCT scaling via
    ``draft``) as long as the decoded short side stays >= ``min_side``; this makes decoding
    multi-megapixel photos for a 64-224 px model several times faster. Other formats decode
    at full size. ``max_pixels``: images whose header announces more pixels are refused before
    any pixel is decoded. Pillow's own guard still applies underneath (it warns above
    ``Image.MAX_IMAGE_PIXELS``, ~89 MP, and refuses above twice that); it is left untouched
    because it is process-wide, so a ``max_pixels`` above ~179 MP cannot raise the limit.

    EXIF orientation is applied, the first frame of animations is used and every mode is
    converted to RGB (alpha composited on white). Every failure raises
    :class:`ImageDecodeError`, never another exception type, so callers need one ``except``.
    """
    _check_limits(min_side, max_pixels)
    name = os.fspath(path)
    try:
        st = os.stat(name)  # follows symlinks, so a dangling link fails here
    except FileNotFoundError as exc:
        reason = "broken symlink" if os.path.islink(name) else "missing"
        raise ImageDecodeError(reason, "no such file", name) from exc
    except PermissionError as exc:
        raise ImageDecodeError("permission denied", str(exc.strerror or exc), name) from exc
    except OSError as exc:
        raise ImageDecodeError("read error", str(exc.strerror or exc), name) from exc
    if not stat.S_ISREG(st.st_mode):
        # Directories, FIFOs (which would block forever on read) and devices.
        raise ImageDecodeError("not a file", "not a regular file", name)
    if st.st_size == 0:
        raise ImageDecodeError("empty file", "0 bytes", name)
    try:
        fh = open(name, "rb")  # noqa: SIM115 - closed by the with block right below
    except PermissionError as exc:
        raise ImageDecodeError("permission denied", str(exc.strerror or exc), name) from exc
    except OSError as exc:
        raise ImageDecodeError("read error", str(exc.strerror or exc), name) from exc
    with fh:
        return _decode(fh, name=name, min_side=min_side, max_pixels=max_pixels)


def load_rgb_bytes(
    data: bytes,
    *,
    min_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode an image held in memory (an upload); same rules and errors as :func:`load_rgb`."""
    _check_limits(min_side, max_pixels)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"load_rgb_bytes expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("empty file", "0 bytes", "<bytes>")
    return _decode(io.BytesIO(bytes(data)), name="<bytes>", min_side=min_side, max_pixels=max_pixels)


def _check_limits(min_side: int | None, max_pixels: int) -> None:
    """Reject nonsensical arguments early: they are programming errors, not bad images."""
    if min_side is not None and min_side < 1:
        raise ValueError(f"min_side must be >= 1 or None, got {min_side}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")


def _decode(fp: IO[bytes], *, name: str, min_side: int | None, max_pixels: int) -> Image.Image:
    """Open, check size, optionally draft, load, orient and convert; map errors to reasons."""
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
        if min_side is not None:
            _draft(img, min_side)
        # load() decodes every pixel now, so a truncated file fails here and not later in a
        # resize or a DataLoader worker. LOAD_TRUNCATED_IMAGES is left at Pillow's False.
        img.load()
        _apply_exif_orientation(img)
        return _to_rgb(img, name)
    except ImageDecodeError:
        raise
    except Exception as exc:  # every decoder failure becomes a reason
        raise ImageDecodeError(_reason_for(exc), _describe(exc), name) from exc
    finally:
        img.close()


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


def apply_resize(img: Image.Image, recipe: str) -> Image.Image:
    """Resize the short side to ``short_side`` (bicubic, antialiased), then center crop S x S.

    Bicubic: Pillow's resampling filters widen their support when downscaling, so this is
    antialiased, unlike a plain interpolating resize. The long side is ``int(short_side *
    long / short)`` and the crop offset ``round((size - S) / 2)``, the same arithmetic as
    torchvision's ``Resize(int)`` + ``CenterCrop``. The output is always exactly S x S.
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
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = round((new_w - crop) / 2.0)
    top = round((new_h - crop) / 2.0)
    return img.crop((left, top, left + crop, top + crop))


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


@dataclass(frozen=True, slots=True)
class ImageRef:
    """One image file found under a root folder.

    ``path`` is absolute but not symlink-resolved (so a broken link can still be reported as
    such); ``relpath`` is the POSIX path relative to the root (the stable key used in indexes);
    ``label`` is the first-level sub-folder (ImageFolder rule) or None for files in the root;
    ``size``/``mtime_ns`` come from the link target (0 for broken links) and let an index
    update skip unchanged files without reading them.
    """

    path: Path
    relpath: str
    label: str | None
    size: int
    mtime_ns: int


def is_image_path(path: str | os.PathLike[str]) -> bool:
    """True if the file name has one of :data:`IMAGE_EXTENSIONS` (any case) and is not hidden."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def scan_images(root: str | os.PathLike[str]) -> list[ImageRef]:
    """List the image files under ``root`` recursively, sorted by ``relpath``.

    Hidden files and folders (name starting with '.') are skipped: they hold thumbnails,
    ``.git`` objects or macOS ``._`` resource forks, not pictures. Symlinks are followed
    (directory cycles are detected and cut); broken links are still listed, with size 0 and
    mtime 0, so the caller records them as "broken symlink" rather than losing them silently.
    Unreadable sub-folders are skipped with a logged warning.
    """
    root_path = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    if not root_path.exists():
        raise FileNotFoundError(f"image folder not found: {root_path}")
    if not root_path.is_dir():
        raise NotADirectoryError(f"not a folder: {root_path} (give the folder that holds the images)")
    root_stat = root_path.stat()
    refs = list(_walk(root_path, (), {(root_stat.st_dev, root_stat.st_ino)}))
    refs.sort(key=lambda ref: ref.relpath)
    return refs


def _walk(directory: Path, parts: tuple[str, ...], ancestors: set[tuple[int, int]]) -> Iterator[ImageRef]:
    """Yield ImageRefs below ``directory``; ``ancestors`` holds (dev, inode) of the current chain."""
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        log.warning("skipping unreadable folder %s: %s", directory, exc.strerror or exc)
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
            except OSError as exc:
                log.warning("skipping unreadable folder %s: %s", entry.path, exc.strerror or exc)
                continue
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                log.warning("skipping symlink cycle at %s", entry.path)
                continue
            yield from _walk(Path(entry.path), (*parts, entry.name), ancestors | {key})
            continue
        if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        try:
            st = entry.stat(follow_symlinks=True)
            if not stat.S_ISREG(st.st_mode):
                continue  # FIFOs, sockets, devices named like images
            size, mtime_ns = st.st_size, st.st_mtime_ns
        except OSError:
            # Broken symlink (or a target we may not stat): keep it so loading reports why.
            size, mtime_ns = 0, 0
        rel = (*parts, entry.name)
        yield ImageRef(
            path=directory / entry.name,
            relpath="/".join(rel),
            label=parts[0] if parts else None,
            size=size,
            mtime_ns=mtime_ns,
        )
