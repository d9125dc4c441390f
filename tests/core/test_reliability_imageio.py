"""Issue 6: the loader never crashes and never hangs, whatever bytes a file holds.

``load_image`` must return a contiguous (H, W, 3) uint8 array or raise ImageLoadError:
fuzzed with random bytes and with bit flips / truncations / insertions of real PNG, JPEG,
TIFF (and a few Pillow-only formats) bytes. Deterministic (``derandomize=True``), bounded
examples and a per-example deadline, so it runs in seconds and the same way in CI.
"""
from __future__ import annotations

import faulthandler
import io
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core.errors import ImageLoadError
from core.imageio import iter_image_paths, load_image

FUZZ = settings(
    max_examples=300,
    deadline=3000,  # ms per example; a real decode of these small files takes ~1 ms
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _seed_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = (rng.random((24, 32, 3)) * 255).astype(np.uint8)
    out = {}
    for name, ext, arr in [
        ("png", ".png", rgb),
        ("png-gray16", ".png", rgb[:, :, 0].astype(np.uint16) * 257),
        ("png-rgba", ".png", np.dstack([rgb, rgb[:, :, :1]])),
        ("jpeg", ".jpg", rgb),
        ("tiff", ".tif", rgb),
        ("tiff-float", ".tif", rgb.astype(np.float32) / 7.0),
        ("bmp", ".bmp", rgb),
    ]:
        ok, buf = cv2.imencode(ext, arr)
        assert ok
        out[name] = buf.tobytes()
    # formats OpenCV cannot read, so the Pillow fallback decodes them
    for name, fmt, mode in [("gif", "GIF", "P"), ("tga", "TGA", "RGB"), ("dds", "DDS", "RGBA"),
                            ("ico", "ICO", "RGBA"), ("tiff-cmyk", "TIFF", "CMYK")]:
        b = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(b, fmt)
        out[name] = b.getvalue()
    return out


SEEDS = _seed_files()

# damaged files make Pillow warn (corrupt EXIF, tag larger than file...): expected noise here
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "part 0001.png"


@pytest.fixture(autouse=True)
def _watchdog():
    """A decoder stuck in C code cannot be interrupted: dump stacks and exit instead of hanging CI."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _assert_image_or_load_error(path: Path) -> None:
    try:
        img = load_image(path)
    except ImageLoadError as exc:
        assert str(path) in str(exc) and exc.reason
        return
    assert isinstance(img, np.ndarray)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.flags.c_contiguous
    assert img.shape[0] >= 8 and img.shape[1] >= 8


@FUZZ
@given(data=st.binary(min_size=0, max_size=2048),
       prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\x00", b"MM\x00*",
                               b"BM", b"GIF89a", b"P6\n", b"PF\n", b"#?RADIANCE\n", b"DDS ", b"8BPS",
                               b"%!PS-Adobe-3.0 EPSF-3.0\n"]))
def test_random_bytes_never_crash_the_loader(fuzz_file, data, prefix):
    fuzz_file.write_bytes(prefix + data)
    _assert_image_or_load_error(fuzz_file)


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.sampled_from([0, 0x7F, 0x80, 0xFF])),
)


def _mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op, pos, arg in ops:
        if not buf:
            break
        i = pos % len(buf)
        if op == "flip":
            buf[i] ^= 1 << arg
        elif op == "truncate":
            del buf[i:]
        elif op == "insert":
            buf[i:i] = arg
        else:
            buf[i] = arg
    return bytes(buf)


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), ops=st.lists(_mutation, min_size=1, max_size=6))
def test_mutated_real_images_never_crash_the_loader(fuzz_file, seed, ops):
    fuzz_file.write_bytes(_mutate(SEEDS[seed], ops))
    _assert_image_or_load_error(fuzz_file)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_the_unmutated_seeds_load(tmp_path, name):
    p = tmp_path / f"seed.{name}"
    p.write_bytes(SEEDS[name])
    img = load_image(p)
    expected = (18, 24, 3) if name == "ico" else (24, 32, 3)  # Pillow's ICO writer picks a size
    assert img.shape == expected and img.dtype == np.uint8


def test_eps_is_refused_without_running_ghostscript(tmp_path, monkeypatch):
    """Found by the fuzzer: Pillow renders EPS by running Ghostscript on the file (an external
    program on untrusted input; a damaged EPS crashed with CalledProcessError)."""
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a))
    b = io.BytesIO()
    Image.new("RGB", (32, 24), (90, 90, 90)).save(b, "EPS")
    p = tmp_path / "drawing.png"
    p.write_bytes(b.getvalue())
    with pytest.raises(ImageLoadError, match="not a readable image"):
        load_image(p)
    assert calls == []


@pytest.mark.parametrize("header", [
    b"PF\n12000 12000\n-1.0\n",                                        # float PFM
    b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 12000 +X 12000\n",      # Radiance HDR
    b"P7\nWIDTH 12000\nHEIGHT 12000\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n",
])
def test_huge_headers_of_formats_pillow_cannot_peek_are_refused(tmp_path, header):
    """144 M pixels: above our limit; OpenCV's own limit (2**30) would have let it allocate."""
    p = tmp_path / "bomb.png"
    p.write_bytes(header + b"\x00" * 64)
    with pytest.raises(ImageLoadError):
        load_image(p)


def test_permission_denied_is_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "locked.png"
    cv2.imwrite(str(p), np.zeros((10, 10, 3), np.uint8))

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ImageLoadError, match="permission denied") as info:
        load_image(p)
    assert str(p) in str(info.value)


def test_unreadable_file_on_disk(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions; covered by the monkeypatched test")
    p = tmp_path / "locked.png"
    cv2.imwrite(str(p), np.zeros((10, 10, 3), np.uint8))
    p.chmod(0)
    try:
        with pytest.raises(ImageLoadError, match="permission denied"):
            load_image(p)
    finally:
        p.chmod(0o644)


def test_other_os_errors_are_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "stale.png"
    p.write_bytes(b"x")

    def eio(self):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(Path, "read_bytes", eio)
    with pytest.raises(ImageLoadError, match="Input/output error"):
        load_image(p)


def test_paths_with_spaces_and_non_ascii_in_folder_and_name(tmp_path):
    folder = tmp_path / "Linie 3 – Prüfung" / "日本 語"
    folder.mkdir(parents=True)
    names = ["teil 1.png", "Ölwanne ä.JPG", "ступень 2.tif", "  leading space.bmp"]
    for n in names:
        ok, buf = cv2.imencode(Path(n).suffix.lower(), np.full((12, 9, 3), 77, np.uint8))
        (folder / n).write_bytes(buf.tobytes())
    found = list(iter_image_paths([tmp_path]))
    assert sorted(p.name for p in found) == sorted(names)
    for p in found:
        assert load_image(p).shape == (12, 9, 3)
        assert load_image(str(p)).shape == (12, 9, 3)


def test_a_folder_named_like_an_image(tmp_path):
    (tmp_path / "trap.png").mkdir()
    (tmp_path / "trap.png" / "inner.png").write_bytes(cv2.imencode(".png", np.zeros((9, 9), np.uint8))[1].tobytes())
    cv2.imwrite(str(tmp_path / "real.png"), np.zeros((9, 9), np.uint8))
    # folder expansion skips the directory itself but finds the image inside it
    got = [p.relative_to(tmp_path).as_posix() for p in iter_image_paths([tmp_path])]
    assert got == ["real.png", "trap.png/inner.png"]
    # given explicitly as a file, it is a clear error, not a crash
    with pytest.raises(ImageLoadError, match="is a folder"):
        load_image(tmp_path / "trap.png")


def test_a_dangling_symlink_and_a_fifo_named_like_images(tmp_path):
    import os

    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "gone.png")
    assert list(iter_image_paths([tmp_path])) == []  # neither is a file: not listed
    os.mkfifo(tmp_path / "pipe.png")
    assert list(iter_image_paths([tmp_path])) == []


def test_a_fifo_or_device_given_explicitly_does_not_hang(tmp_path):
    """Found while writing these tests: read_bytes on a FIFO blocks forever, and /dev/zero
    never ends. Only regular files are read now."""
    import os

    fifo = tmp_path / "camera.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(fifo)
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image("/dev/zero")


# -- 16-bit images: the bit-depth rule (issue 13) ---------------------------------------------
def _twelve_bit_png(path, top=2016):
    ramp = np.linspace(0, top, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    cv2.imwrite(str(path), ramp)
    return ramp


def test_twelve_bit_data_in_a_16_bit_file_keeps_its_grey_levels(tmp_path):
    """Values 0..2016 came out as 0..7 (a right shift by 8): now scaled by the image's range
    by default, as the docstring always said."""
    from core.imageio import load_image

    p = tmp_path / "cam12.png"
    _twelve_bit_png(p)
    img = load_image(p)
    assert img.min() == 0 and img.max() == 255
    assert len(np.unique(img[:, :, 0])) > 200


def test_a_fixed_bit_depth_keeps_absolute_brightness(tmp_path):
    from core.imageio import load_image

    p = tmp_path / "cam12.png"
    ramp = _twelve_bit_png(p)
    img = load_image(p, bit_depth=12)[:, :, 0]
    np.testing.assert_array_equal(img, np.clip(ramp * (255 / 4095) + 0.5, 0, 255).astype(np.uint8))
    assert img.max() == 126 and len(np.unique(img)) == 127  # 2016 of 4095: half brightness, 127 levels
    dark = tmp_path / "dark.png"
    cv2.imwrite(str(dark), (ramp // 4).astype(np.uint16))
    assert load_image(dark, bit_depth=12).max() == 31  # a darker part stays darker
    assert load_image(dark).max() == 255  # per-image range: stretched like the others
    assert load_image(p, bit_depth=16).max() == round(2016 * 255 / 65535)
    assert load_image(p, bit_depth=8).max() == 255  # clipped above the depth's maximum


@pytest.mark.parametrize("bad", [11, 0, 32, "12", True, 12.0])
def test_an_unknown_bit_depth_is_refused(tmp_path, bad):
    from core.detector import DetectorConfig
    from core.imageio import load_image

    p = tmp_path / "x.png"
    _twelve_bit_png(p)
    with pytest.raises(ValueError, match="bit_depth"):
        load_image(p, bit_depth=bad)
    with pytest.raises(ValueError, match="bit_depth"):
        DetectorConfig(bit_depth=bad)


def test_the_cli_stores_the_bit_depth_in_the_model(tmp_path):
    from core.cli import main
    from core.persistence import load_detector

    paths = []
    for i in range(3):
        p = tmp_path / f"c{i}.png"
        _twelve_bit_png(p, top=2016 + i)
        paths.append(str(p))
    out = tmp_path / "m.okng"
    assert main(["fit", *paths, "--out", str(out), "--weights", "random", "--image-size", "64",
                 "--channels", "24", "--bit-depth", "12"]) == 0
    assert load_detector(out).config.bit_depth == 12


# -- EXIF orientation for every pixel format (issue 13) ----------------------------------------
def _exif(orientation: int) -> bytes:
    from PIL import Image

    ex = Image.Exif()
    ex[0x0112] = orientation
    raw = ex.tobytes()
    return raw[6:] if raw.startswith(b"Exif\x00\x00") else raw


def _png_with_exif(png: bytes, orientation: int) -> bytes:
    """Insert an eXIf chunk right after IHDR (before the pixel data, where readers look)."""
    import struct
    import zlib

    data = _exif(orientation)
    chunk = struct.pack(">I", len(data)) + b"eXIf" + data
    chunk += struct.pack(">I", zlib.crc32(chunk[4:]) & 0xFFFFFFFF)
    end_ihdr = 8 + 8 + 13 + 4
    return png[:end_ihdr] + chunk + png[end_ihdr:]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_the_same_part_saved_in_any_pixel_format_is_read_in_one_orientation(tmp_path, orientation):
    """OpenCV applied EXIF orientation to RGB PNG, JPEG and TIFF but not to RGBA or 16-bit
    PNG: the same part came out rotated in some formats only."""
    from PIL import Image

    from core.imageio import apply_orientation, load_image

    rng = np.random.default_rng(orientation)
    rgb = np.zeros((40, 64, 3), np.uint8)
    rgb[:, :, 0] = np.linspace(0, 250, 64, dtype=np.uint8)[None, :]
    rgb[:, :, 1] = np.linspace(0, 250, 40, dtype=np.uint8)[:, None]
    rgb[5:12, 3:20] = (255, 255, 255)  # a marker near the top-left corner
    rgb[:, :, 2] = rng.integers(0, 50, (40, 64))
    expected = apply_orientation(rgb, orientation)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    files = {
        "rgb.png": _png_with_exif(cv2.imencode(".png", bgr)[1].tobytes(), orientation),
        "rgba.png": _png_with_exif(cv2.imencode(".png", np.dstack([bgr, np.full((40, 64), 255, np.uint8)]))[1]
                                   .tobytes(), orientation),
        "rgb16.png": _png_with_exif(cv2.imencode(".png", bgr.astype(np.uint16) * 257)[1].tobytes(), orientation),
        "gray16.png": _png_with_exif(cv2.imencode(".png", rgb[:, :, 0].astype(np.uint16) * 257)[1].tobytes(),
                                     orientation),
    }
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    pil = Image.fromarray(rgb)
    pil.save(tmp_path / "rgb.jpg", exif=_jpeg_exif(orientation), quality=98)
    pil.save(tmp_path / "rgb.tif", tiffinfo={0x0112: orientation})
    for name in [*files, "rgb.jpg", "rgb.tif"]:
        got = load_image(tmp_path / name, bit_depth=16)
        assert got.shape == expected.shape, f"{name} read in another orientation"
        if name.startswith("gray"):
            ref = np.repeat(expected[:, :, :1], 3, axis=2)
        else:
            ref = expected
        tol = 12 if name.endswith(".jpg") else 0
        assert np.abs(got.astype(int) - ref.astype(int)).mean() <= tol, name


def _jpeg_exif(orientation: int) -> bytes:
    return b"Exif\x00\x00" + _exif(orientation)
