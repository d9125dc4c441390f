"""Robust image loading: any file a production line may produce becomes RGB uint8, or a clear error.

Every reader failure becomes :class:`~core.errors.ImageLoadError` naming the file and the
reason, so a batch can report the file and go on. Handles 16-bit and float images (scaled by
their own range), grayscale, RGBA (composited on black), palette images and EXIF rotation.

Example:
    >>> from core.imageio import load_image
    >>> rgb = load_image("part_0001.png")   # (H, W, 3) uint8
"""
from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

# OpenCV's own decoder limit (default 2**30 pixels) applies to formats Pillow cannot peek
# at (PFM, HDR, PAM...): lower it to ours so a forged header cannot make it allocate GBs.
# Read once, at the first decode; setdefault keeps an operator's explicit setting.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "100000000")

import cv2
import numpy as np

from .errors import ImageLoadError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm"}
)
#: Larger images are refused before decoding: 20000 x 20000 RGB is 1.2 GB of pixels.
MAX_PIXELS = 100_000_000
MIN_SIDE = 8
#: Pillow formats the fallback decoder may use: plain raster formats decoded in-process.
#: Anything else is refused; notably EPS, which Pillow renders by running Ghostscript on
#: the file (an external program on untrusted input; it also crashed with CalledProcessError).
PILLOW_FORMATS = (
    "BMP", "DIB", "DDS", "GIF", "ICO", "CUR", "JPEG", "JPEG2000", "PCX", "PNG", "PPM", "PSD",
    "QOI", "SGI", "SUN", "TGA", "TIFF", "WEBP", "XBM", "XPM",
)


def _decode(data: np.ndarray, path: object) -> np.ndarray:
    """Decode with OpenCV (applies EXIF orientation); fall back to Pillow for odd formats."""
    flags = cv2.IMREAD_UNCHANGED  # keeps 16-bit and alpha; EXIF applied below
    img = cv2.imdecode(data, flags)
    if img is not None and img.ndim >= 2:
        # IMREAD_UNCHANGED ignores EXIF orientation; IMREAD_COLOR honours it. Re-decode the
        # plain 8-bit 3-channel case so rotated phone/camera JPEGs come out upright.
        if img.dtype == np.uint8 and (img.ndim == 2 or img.shape[2] == 3):
            oriented = cv2.imdecode(data, cv2.IMREAD_COLOR)
            if oriented is not None:
                return cv2.cvtColor(oriented, cv2.COLOR_BGR2RGB)
        return _to_rgb_from_bgr(img)
    return _decode_with_pillow(data, path)


def _decode_with_pillow(data: np.ndarray, path: object) -> np.ndarray:
    import io

    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(io.BytesIO(data.tobytes()), formats=PILLOW_FORMATS) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "1", "L", "RGB"):
                im = im.convert("RGBA" if "A" in im.mode or im.mode == "P" else "RGB")
            arr = np.asarray(im)
    except Image.DecompressionBombError:
        raise ImageLoadError(path, "image is too large to inspect") from None
    except Exception as exc:  # noqa: BLE001 - Pillow plugins raise anything on damaged data
        # (UnidentifiedImageError, OSError, SyntaxError, but also NotImplementedError from DDS,
        # struct.error, IndexError...): a damaged file is a skipped file, never a crash.
        raise ImageLoadError(path, f"not a readable image ({exc.__class__.__name__})") from None
    if arr.ndim == 3 and arr.shape[2] == 4:
        return _normalise(arr, path, channel_order="rgba")
    return _normalise(arr, path, channel_order="rgb")


def _to_rgb_from_bgr(img: np.ndarray) -> np.ndarray:
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, [2, 1, 0, 3]]
        return _normalise(img, None, channel_order="rgba")
    if img.ndim == 3 and img.shape[2] == 3:
        img = img[:, :, ::-1]
    return _normalise(img, None, channel_order="rgb")


def _scale_to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img >> 8).astype(np.uint8)
    work = img.astype(np.float32)
    finite = np.isfinite(work)
    if not finite.any():
        return np.zeros(img.shape, np.uint8)
    lo, hi = float(work[finite].min()), float(work[finite].max())
    if np.issubdtype(img.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0  # float images in [0, 1]: keep their absolute brightness
    span = hi - lo if hi > lo else 1.0
    work = np.where(finite, (work - lo) / span, 0.0)
    return np.clip(work * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _normalise(img: np.ndarray, path: object, channel_order: str) -> np.ndarray:
    """Any decoded array -> contiguous (H, W, 3) uint8 RGB."""
    img = _scale_to_uint8(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 2:  # gray + alpha
        alpha = img[:, :, 1:2].astype(np.float32) / 255.0
        img = np.repeat((img[:, :, :1] * alpha).astype(np.uint8), 3, axis=2)
    elif img.ndim == 3 and img.shape[2] == 4 and channel_order == "rgba":
        alpha = img[:, :, 3:4].astype(np.float32) / 255.0
        img = (img[:, :, :3].astype(np.float32) * alpha + 0.5).astype(np.uint8)
    elif not (img.ndim == 3 and img.shape[2] == 3):
        raise ImageLoadError(path, f"unsupported pixel layout {img.shape}")
    return np.ascontiguousarray(img)


def check_image_array(img: np.ndarray, path: object = "<array>") -> np.ndarray:
    """Validate and convert an in-memory image (from a camera or a caller) to RGB uint8."""
    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or img.size == 0:
        raise ImageLoadError(path, "not an image array")
    out = _normalise(img, path, channel_order="rgba" if img.ndim == 3 and img.shape[2] == 4 else "rgb")
    _check_size(out.shape[0], out.shape[1], path)
    return out


def _check_size(h: int, w: int, path: object) -> None:
    if h < MIN_SIDE or w < MIN_SIDE:
        raise ImageLoadError(path, f"image is {w}x{h} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    if h * w > MAX_PIXELS:
        raise ImageLoadError(path, f"image is {w}x{h} pixels, above the {MAX_PIXELS:,} pixel limit")


def _peek_size(data: np.ndarray) -> tuple[int, int] | None:
    """Read width/height from the header without decoding (to refuse decompression bombs)."""
    import io

    from PIL import Image

    try:
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(io.BytesIO(data.tobytes())) as im:
            return im.size
    except Exception:  # noqa: BLE001 - unknown header: let the decoder decide
        return None


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB.

    Raises:
        ImageLoadError: the file is missing, unreadable, empty, not an image, truncated,
            too small or too large. The message names the file and the reason.
    """
    p = Path(path)
    try:
        # A FIFO or device named like an image would block read_bytes forever (or, like
        # /dev/zero, never end): only regular files are read.
        if not stat.S_ISREG(p.stat().st_mode) and not p.is_dir():
            raise ImageLoadError(p, "not a regular file (a pipe, socket or device)")
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ImageLoadError(p, "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(p, "is a folder, not an image") from None
    except PermissionError:
        raise ImageLoadError(p, "permission denied") from None
    except OSError as exc:
        raise ImageLoadError(p, f"cannot read file ({exc.strerror or exc})") from None
    if not raw:
        raise ImageLoadError(p, "file is empty (0 bytes)")
    data = np.frombuffer(raw, np.uint8)
    size = _peek_size(data)
    if size is not None:
        _check_size(size[1], size[0], p)
    try:
        img = _decode(data, p)
    except ImageLoadError as exc:
        raise ImageLoadError(p, exc.reason) from None
    except (cv2.error, ValueError, MemoryError) as exc:
        raise ImageLoadError(p, f"cannot decode image ({exc.__class__.__name__})") from None
    _check_size(img.shape[0], img.shape[1], p)
    return img


def iter_image_paths(inputs: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Expand files and folders (recursively, sorted) into image paths, keeping input order.

    A file given explicitly is yielded whatever its extension (the loader will say if it is
    not an image); inside folders only known image extensions are taken.
    """
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
            )
            if not found:
                log.warning("%s: no images found in this folder", p)
            yield from found
        else:
            yield p
