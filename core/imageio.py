"""Robust image loading: any file a production line may produce becomes RGB uint8, or a clear error.

Every reader failure becomes :class:`~core.errors.ImageLoadError` naming the file and the
reason, so a batch can report the file and go on. Handles 16-bit and float images, grayscale,
RGBA (composited on black), palette images and EXIF rotation.

16-bit images (``bit_depth``): the rule that maps them to 8 bits is a setting.

* ``None`` (default): scaled by their own range (minimum..maximum -> 0..255). 12-bit camera
  data stored in 16-bit files keeps its detail (the old right shift by 8 crushed 0..2016 to
  0..7). Trade-off: brightness becomes relative to each image, so a part that is darker or
  brighter overall is stretched to look like the others, and one very dark (or bright) spot
  sets the scale of the whole image: a dark defect can come out less dark than it is, a
  global exposure fault can vanish.
* ``8``, ``10``, ``12``, ``14`` or ``16``: a fixed depth, ``value * 255 / (2**bits - 1)``
  (values above the depth's maximum clip to 255). Same scale for every image: absolute
  brightness is kept. Prefer it when the camera's bit depth is known (12 for most
  industrial 12-bit cameras).

8-bit images are never rescaled; float images in [0, 1] keep their absolute brightness,
other float images are scaled by their own range.

EXIF orientation is applied the same way for every format and pixel type (RGB, RGBA, gray,
8 or 16 bits; PNG, JPEG, TIFF, WebP): the same part saved two ways is read the same way up.

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


#: accepted ``bit_depth`` values besides None (per-image range)
BIT_DEPTHS = (8, 10, 12, 14, 16)


def check_bit_depth(bit_depth: int | None) -> None:
    if bit_depth is not None and (type(bit_depth) is not int or bit_depth not in BIT_DEPTHS):
        raise ValueError(f"bit_depth (--bit-depth) must be one of {', '.join(map(str, BIT_DEPTHS))} or "
                         f"None (each image's own range), got {bit_depth!r}")


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: where Pillow finds a PNG's orientation: an eXIf chunk, ImageMagick's raw EXIF text, XMP
_PNG_ORIENTATION_SOURCES = (b"eXIf", b"Raw profile type exif", b"XML:com.adobe.xmp")


def exif_orientation(data: np.ndarray) -> int:
    """The EXIF orientation tag (1..8) of an encoded image, 1 when absent or unreadable."""
    import io

    from PIL import Image

    raw = data.tobytes()
    if raw.startswith(_PNG_SIGNATURE) and not any(tag in raw for tag in _PNG_ORIENTATION_SOURCES):
        # A PNG may carry EXIF after its pixels, so Pillow decodes the whole image to look
        # (64 MB and ~0.3 s at 4096 x 4096): a PNG without any of those chunks is upright.
        return 1
    try:
        Image.MAX_IMAGE_PIXELS = None  # header only; sizes are checked elsewhere
        with Image.open(io.BytesIO(raw)) as im:
            value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - no EXIF, odd format: upright
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a decoded (H, W[, C]) array upright (same result as Pillow's exif_transpose)."""
    if orientation == 2:
        img = img[:, ::-1]
    elif orientation == 3:
        img = img[::-1, ::-1]
    elif orientation == 4:
        img = img[::-1]
    elif orientation == 5:
        img = img.swapaxes(0, 1)
    elif orientation == 6:
        img = np.rot90(img, -1)
    elif orientation == 7:
        img = img[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        img = np.rot90(img, 1)
    return np.ascontiguousarray(img)


def _decode(data: np.ndarray, path: object, bit_depth: int | None = None) -> np.ndarray:
    """Decode with OpenCV, then apply the EXIF orientation ourselves (OpenCV applies it only
    for some pixel formats); fall back to Pillow for odd formats."""
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)  # keeps 16-bit and alpha
    if img is not None and img.ndim >= 2:
        # IMREAD_UNCHANGED ignores EXIF orientation for PNG, JPEG and WebP, but OpenCV's TIFF
        # decoder applies the TIFF Orientation tag itself, in every pixel format
        if bytes(data[:4]) not in (b"II*\x00", b"MM\x00*"):
            img = apply_orientation(img, exif_orientation(data))
        return _to_rgb_from_bgr(img, bit_depth)
    return _decode_with_pillow(data, path, bit_depth)


def _decode_with_pillow(data: np.ndarray, path: object, bit_depth: int | None = None) -> np.ndarray:
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
        unknown = exc.__class__.__name__ == "UnidentifiedImageError"  # no decoder knows the bytes
        raise ImageLoadError(path, "not a readable image (" + (
            "not a picture format the station reads" if unknown else "damaged or cut short") + ")") from None
    if arr.ndim == 3 and arr.shape[2] == 4:
        return _normalise(arr, path, channel_order="rgba", bit_depth=bit_depth)
    return _normalise(arr, path, channel_order="rgb", bit_depth=bit_depth)


def _to_rgb_from_bgr(img: np.ndarray, bit_depth: int | None = None) -> np.ndarray:
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, [2, 1, 0, 3]]
        return _normalise(img, None, channel_order="rgba", bit_depth=bit_depth)
    if img.ndim == 3 and img.shape[2] == 3:
        if img.dtype == np.uint8 and img.flags.c_contiguous and img.flags.writeable:
            # In place, a band of rows at a time: a reversed view made contiguous, or one
            # in-place cvtColor (OpenCV clones its source), would hold a second copy of the
            # image at once (48 MB more at the peak for a 4096 x 4096 part; see core.tiling).
            for r in range(0, img.shape[0], 256):
                band = img[r : r + 256]
                cv2.cvtColor(band, cv2.COLOR_BGR2RGB, dst=band)
            return img
        img = img[:, :, ::-1]
    return _normalise(img, None, channel_order="rgb", bit_depth=bit_depth)


def _scale_to_uint8(img: np.ndarray, bit_depth: int | None = None) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16 and bit_depth is not None:
        top = float(2**bit_depth - 1)
        return np.clip(img.astype(np.float32) * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
    work = img.astype(np.float32)
    finite = np.isfinite(work)
    if not finite.any():
        return np.zeros(img.shape, np.uint8)
    lo, hi = float(work[finite].min()), float(work[finite].max())
    if np.issubdtype(img.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0  # float images in [0, 1]: keep their absolute brightness
    elif hi == lo and np.issubdtype(img.dtype, np.integer):
        lo, hi = 0.0, float(np.iinfo(img.dtype).max)  # flat image: no range, absolute scale
    span = hi - lo if hi > lo else 1.0
    work = np.where(finite, (work - lo) / span, 0.0)
    return np.clip(work * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _normalise(img: np.ndarray, path: object, channel_order: str, bit_depth: int | None = None) -> np.ndarray:
    """Any decoded array -> contiguous (H, W, 3) uint8 RGB."""
    if img.ndim == 3 and img.shape[2] in (2, 4) and img.dtype == np.uint16:
        # colour by the bit-depth rule, alpha by its own full 16-bit scale
        alpha = (img[:, :, -1:].astype(np.float32) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
        img = np.concatenate([_scale_to_uint8(img[:, :, :-1], bit_depth), alpha], axis=2)
    img = _scale_to_uint8(img, bit_depth)
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


def check_image_array(img: np.ndarray, path: object = "<array>", bit_depth: int | None = None) -> np.ndarray:
    """Validate and convert an in-memory image (from a camera or a caller) to RGB uint8."""
    check_bit_depth(bit_depth)
    if not isinstance(img, np.ndarray) or img.ndim not in (2, 3) or img.size == 0:
        raise ImageLoadError(path, "not an image array")
    out = _normalise(img, path, channel_order="rgba" if img.ndim == 3 and img.shape[2] == 4 else "rgb",
                     bit_depth=bit_depth)
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


def load_image(path: str | os.PathLike[str], bit_depth: int | None = None) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB.

    ``bit_depth``: how 16-bit pixels become 8-bit (see the module docstring): None scales
    each image by its own range, 8/10/12/14/16 by that fixed depth.

    Raises:
        ImageLoadError: the file is missing, unreadable, empty, not an image, truncated,
            too small or too large. The message names the file and the reason.
    """
    check_bit_depth(bit_depth)
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
        img = _decode(data, p, bit_depth)
    except ImageLoadError as exc:
        raise ImageLoadError(p, exc.reason) from None
    except (cv2.error, ValueError, MemoryError) as exc:
        raise ImageLoadError(p, f"cannot decode image ({exc.__class__.__name__})") from None
    _check_size(img.shape[0], img.shape[1], p)
    return img


def read_image_size(path: str | os.PathLike[str], bit_depth: int | None = None) -> tuple[int, int]:
    """(height, width) of an image file, from its header when Pillow can read it (no decode),
    else by loading it. Raises :class:`ImageLoadError` like :func:`load_image`."""
    from PIL import Image

    try:
        Image.MAX_IMAGE_PIXELS = None  # header only; the size is checked below
        with Image.open(path) as im:
            w, h = im.size
        _check_size(h, w, path)
        return h, w
    except ImageLoadError:
        raise
    except Exception:  # noqa: BLE001 - an odd header: the loader decides (and says why)
        return load_image(path, bit_depth).shape[:2]


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


def _percentiles_u8(img: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile(img, qs)`` (its linear interpolation, the same values) for uint8 data,
    from a 256-bin histogram instead of a sort: on the inspection path ``network_input`` of
    300-px images to 224 px measured 1.9 ms per image with the stretch this way, 3.5 ms with
    ``np.percentile`` (1.4 ms without the stretch)."""
    cdf = np.cumsum(np.bincount(img.ravel(), minlength=256))
    out = []
    for q in qs:
        h = (int(cdf[-1]) - 1) * q / 100.0
        k = int(np.floor(h))
        below, above = np.searchsorted(cdf, [k, min(k + 1, int(cdf[-1]) - 1)], side="right")
        out.append(float(below + (h - k) * (above - below)))
    return out


def network_input(images: list[np.ndarray], size: int, contrast: str | None = None) -> np.ndarray:
    """RGB uint8 images of any size -> the network's input, (B, 3, size, size) float32 in
    [0, 1], C-contiguous: each image resized whole (``INTER_AREA`` when shrinking,
    ``INTER_LINEAR`` when enlarging). The one place this happens, for PyTorch
    (:func:`core.detector.preprocess` views it) and the exported graph alike.

    ``contrast="stretch"`` (the model's setting): each resized image's grey levels from its
    1st to its 99th percentile (over all its pixels and channels) are stretched to 0..1,
    clipped outside. A part imaged darker or brighter overall then looks like the others, and
    the network sees the part's structure rather than the exposure; a dark spot stays as dark
    relative to the rest of its part. An image of one level is left as it is.

    ``contrast="flatten"``: the image's shading is taken out first, then stretched. Shading is
    the slow change of brightness across a part (uneven light, a cell brighter at one end or in
    its middle than at its edges), different on every part; the Gaussians of a PaDiM otherwise
    spend their spread on it. It is each resized image's grey (the mean of its channels)
    shrunk to an eighth of its side, blurred with a Gaussian of sigma a quarter of that side
    and enlarged back (:func:`shading`): a blur across the whole part. It is subtracted from
    every channel (colours keep their balance; a subtraction, unlike a division, stays tame
    where a part's background is black), and what remains is stretched from the 1st to the
    99th percentile of the flattened grey to 0..1, clipped. Narrow marks, cracks and spots keep
    their contrast; a dark area half the part wide keeps nine tenths of it (a square 60 grey
    levels darker on a grey part: 0.55 against 0.59 with the stretch alone)."""
    batch = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        interp = cv2.INTER_AREA if min(img.shape[:2]) >= size else cv2.INTER_LINEAR
        batch[i] = cv2.resize(img, (size, size), interpolation=interp)
    out = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)
    out /= np.float32(255.0)  # bit for bit what torch's .float().div_(255.0) gave
    if contrast == "stretch":
        for i in range(len(out)):
            lo, hi = _percentiles_u8(batch[i], (1.0, 99.0))
            if hi - lo >= 1.0:  # at least one grey level apart
                x = out[i]
                x -= np.float32(lo / 255.0)
                x *= np.float32(255.0 / (hi - lo))
                np.clip(x, 0.0, 1.0, out=x)
    elif contrast == "flatten":
        for i in range(len(out)):
            _flatten_shading(out[i])
    elif contrast is not None:
        raise ValueError(f"unknown contrast rule {contrast!r}")
    return out


def shading(grey: np.ndarray) -> np.ndarray:
    """The slow brightness changes of an (H, W) float32 grey image (``network_input``'s
    ``"flatten"``): shrunk to n x n pixels, n = max(4, min(H, W) // 8), with ``INTER_AREA``;
    blurred by ``cv2.GaussianBlur`` with sigma n / 4 (its kernel for float images: round(8
    sigma + 1), odd; ``BORDER_REFLECT_101``, reflected again where the kernel reaches past
    the image); enlarged back with ``INTER_LINEAR``. The shrink makes a blur this wide cost
    0.1 ms instead of 4.5 ms at 224 px."""
    h, w = grey.shape
    n = max(4, min(h, w) // 8)
    bg = cv2.resize(grey, (n, n), interpolation=cv2.INTER_AREA)
    bg = cv2.GaussianBlur(bg, (0, 0), n / 4.0, borderType=cv2.BORDER_REFLECT_101)
    return cv2.resize(bg, (w, h), interpolation=cv2.INTER_LINEAR)


def _flatten_shading(x: np.ndarray) -> None:
    """In place on one (3, S, S) image in [0, 1]: minus its shading, stretched by the 1st and
    99th percentile of its flattened grey to [0, 1] (see :func:`network_input`). Left as it is
    when those lie less than one grey level apart (an image of one level)."""
    grey = x.mean(axis=0)
    bg = shading(grey)
    grey -= bg
    lo, hi = np.percentile(grey, (1.0, 99.0))
    if hi - lo < 1.0 / 255.0:
        return
    x -= bg
    x -= np.float32(lo)
    x *= np.float32(1.0 / (hi - lo))
    np.clip(x, 0.0, 1.0, out=x)
