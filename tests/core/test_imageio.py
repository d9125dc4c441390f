"""Every odd image becomes RGB uint8 or a clear error naming the file."""
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from core.errors import ImageLoadError
from core.imageio import check_image_array, iter_image_paths, load_image


def test_grayscale_png_becomes_three_equal_channels(tmp_path):
    p = tmp_path / "g.png"
    cv2.imwrite(str(p), np.full((20, 30), 77, np.uint8))
    img = load_image(p)
    assert img.shape == (20, 30, 3) and img.dtype == np.uint8 and (img == 77).all()


def test_colour_order_is_rgb(tmp_path):
    p = tmp_path / "red.png"
    bgr = np.zeros((10, 10, 3), np.uint8)
    bgr[..., 2] = 255
    cv2.imwrite(str(p), bgr)
    assert tuple(load_image(p)[0, 0]) == (255, 0, 0)


def test_16_bit_tiff_is_scaled_to_8_bit(tmp_path):
    p = tmp_path / "deep.tif"
    cv2.imwrite(str(p), np.full((16, 16), 65535 // 2, np.uint16))
    assert abs(int(load_image(p)[0, 0, 0]) - 127) <= 1


def test_float_tiff_is_scaled_by_its_range(tmp_path):
    p = tmp_path / "f.tif"
    arr = np.linspace(0, 1000, 16 * 16, dtype=np.float32).reshape(16, 16)
    cv2.imwrite(str(p), arr)
    img = load_image(p)
    assert img[0, 0, 0] == 0 and img[-1, -1, 0] == 255


def test_rgba_is_composited_on_black(tmp_path):
    p = tmp_path / "a.png"
    Image.fromarray(np.dstack([np.full((12, 12, 3), 200, np.uint8), np.full((12, 12), 0, np.uint8)]), "RGBA").save(p)
    assert (load_image(p) == 0).all()


def test_palette_png(tmp_path):
    p = tmp_path / "pal.png"
    Image.fromarray(np.arange(144, dtype=np.uint8).reshape(12, 12)).convert("P").save(p)
    assert load_image(p).shape == (12, 12, 3)


def test_exif_rotated_jpeg_comes_out_upright(tmp_path):
    p = tmp_path / "rot.jpg"
    im = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    im.save(p, exif=exif)
    assert load_image(p).shape[:2] == (40, 20)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty"), (b"this is text, not a picture", "not a readable image")],
)
def test_empty_and_text_files_named_png(tmp_path, content, reason):
    p = tmp_path / "fake image.png"
    p.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as e:
        load_image(p)
    assert "fake image.png" in str(e.value)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".tif"])
def test_truncated_files_are_refused(tmp_path, ext):
    full = tmp_path / f"full{ext}"
    cv2.imwrite(str(full), np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(full.read_bytes()[:60])
    with pytest.raises(ImageLoadError, match="cut"):
        load_image(cut)


def test_tiny_and_huge_images_are_refused_before_decoding(tmp_path):
    small = tmp_path / "s.png"
    cv2.imwrite(str(small), np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageLoadError, match="at least 8x8"):
        load_image(small)
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, "PNG")  # compresses to ~400 kB
    huge = tmp_path / "huge.png"
    huge.write_bytes(buf.getvalue())
    with pytest.raises(ImageLoadError, match="pixel limit"):
        load_image(huge)


def test_eight_by_eight_is_accepted(tmp_path):
    p = tmp_path / "e.png"
    cv2.imwrite(str(p), np.zeros((8, 8), np.uint8))
    assert load_image(p).shape == (8, 8, 3)


def test_missing_and_non_ascii_paths(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.png")
    p = tmp_path / "Prüfteil 工件 1.png"
    cv2.imencode(".png", np.zeros((10, 10), np.uint8))[1].tofile(str(p))
    assert load_image(p).shape == (10, 10, 3)


def test_folders_expand_recursively_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.png", "1.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    got = [p.relative_to(tmp_path).as_posix() for p in iter_image_paths([tmp_path])]
    assert got == ["1.jpg", "b/2.png"]


def test_array_check_accepts_camera_frames_and_refuses_garbage():
    assert check_image_array(np.zeros((10, 10), np.uint16)).dtype == np.uint8
    with pytest.raises(ImageLoadError):
        check_image_array(np.zeros((0, 5)))
