"""Qt-free core.sources and core.recipes used by the station."""
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.errors import ImageLoadError
from core.jobs import CancelToken, ScoredImage, run_job
from core.recipes import Recipe, RecipeError, load_recipe, save_recipe
from core.sources import FolderWatchSource, SourceError, VideoSource, live_job


def _video(path, n=5):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    assert w.isOpened()
    for i in range(n):
        w.write(np.full((48, 64, 3), 20 * i, np.uint8))
    w.release()
    return path


def test_video_file_source_reads_all_frames(tmp_path):
    src = VideoSource(str(_video(tmp_path / "v.avi")))
    src.open()
    frames = []
    while (f := src.read()) is not None:
        frames.append(f)
    src.close()
    assert src.finished and len(frames) == 5
    assert frames[0].image.shape == (48, 64, 3) and frames[0].image.dtype == np.uint8


def test_missing_camera_and_video_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        VideoSource(str(tmp_path / "nope.avi")).open()
    with pytest.raises(SourceError, match="camera 57"):
        VideoSource("57").open()


def test_folder_watch_waits_for_stable_size(tmp_path):
    (tmp_path / "old.png").write_bytes(b"x")
    src = FolderWatchSource(tmp_path)
    src.open()
    assert src.read() is None  # existing files are not re-inspected
    img = np.full((32, 32, 3), 100, np.uint8)
    ok, data = cv2.imencode(".png", img)
    partial = tmp_path / "new.png"
    partial.write_bytes(data.tobytes()[:20])
    assert src.read() is None  # first sight
    partial.write_bytes(data.tobytes())  # still growing
    assert src.read() is None
    frame = src.read()  # size unchanged since last poll: ready
    assert frame is not None and frame.image.shape == (32, 32, 3)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    src.settle_s = 0.1
    assert src.read() is None and src.read() is None  # first sight; stable, fails: maybe still written
    time.sleep(0.15)  # unchanged for settle_s: unreadable for good
    assert isinstance(src.read(), ImageLoadError)


def _png(value: int = 100) -> bytes:
    ok, data = cv2.imencode(".png", np.full((64, 64, 3), value, np.uint8))
    return data.tobytes()


def test_a_file_written_in_chunks_with_pauses_is_read_once_whole(tmp_path):
    """Found trying the station: a camera writing 8 KB chunks 150 ms apart had its file read
    after two unchanged polls (10 ms) and the part lost as "damaged or cut short"."""
    src = FolderWatchSource(tmp_path, settle_s=5.0)
    src.open()
    data, part = _png(), tmp_path / "part.png"
    with open(part, "wb") as f:
        for start in range(0, len(data) - 30, 40):
            f.write(data[start:start + 40])
            f.flush()
            for _ in range(4):  # a pause of several polls: the size stays the same meanwhile
                assert src.read() is None
    part.write_bytes(data)  # the last bytes: PNG's end chunk
    frame = next(f for f in iter(src.read, "never") if f is not None)
    assert not isinstance(frame, ImageLoadError) and frame.image.shape == (64, 64, 3)


def test_a_jpeg_cut_short_is_not_judged_half_grey(tmp_path):
    """OpenCV decodes a JPEG cut short without an error (the missing rows grey): the watched
    folder waits for its end marker, and one that never comes is reported, not judged."""
    ok, jpg = cv2.imencode(".jpg", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    data = jpg.tobytes()
    src = FolderWatchSource(tmp_path, settle_s=0.1)
    src.open()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert [src.read() for _ in range(5)] == [None] * 5  # stable, but not written to its end
    time.sleep(0.15)
    out = src.read()
    assert isinstance(out, ImageLoadError) and "cut short: the JPEG ends inside its image data" in str(out)


def test_a_jpeg_with_a_vendors_trailer_after_its_end_is_read_once_settled(tmp_path):
    ok, jpg = cv2.imencode(".jpg", np.full((64, 64, 3), 90, np.uint8))
    src = FolderWatchSource(tmp_path, settle_s=0.1)
    src.open()
    (tmp_path / "trailer.jpg").write_bytes(jpg.tobytes() + b"VENDOR-TRAILER-0042" * 8)
    assert [src.read() for _ in range(3)] == [None] * 3  # no end marker at the very end: it waits
    time.sleep(0.15)
    frame = src.read()
    assert not isinstance(frame, ImageLoadError) and frame.image.shape == (64, 64, 3)


def test_a_name_used_again_after_its_file_was_removed_is_a_new_image(tmp_path):
    """A camera whose counter starts again after the folder was emptied."""
    src = FolderWatchSource(tmp_path, stable_polls=1)
    src.open()
    (tmp_path / "img_0001.png").write_bytes(_png(10))
    assert int(next(f for f in iter(src.read, "never") if f is not None).image[0, 0, 0]) == 10
    (tmp_path / "img_0001.png").unlink()
    assert src.read() is None  # the folder is listed without it: forgotten
    (tmp_path / "img_0001.png").write_bytes(_png(20))
    assert int(next(f for f in iter(src.read, "never") if f is not None).image[0, 0, 0]) == 20


def test_files_that_appeared_since_a_moment_are_told_apart_and_can_be_skipped(tmp_path):
    src = FolderWatchSource(tmp_path)
    src.open()
    (tmp_path / "before.png").write_bytes(_png())
    src.note_present()  # listed now: there before the moment
    moment = time.monotonic()
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "b.png").write_bytes(_png()[:30])  # still being written
    assert Path(src.read().name).name == "before.png"  # this poll also lists a.png and b.png first
    assert sorted(Path(p).name for p in src.appeared_since(moment)) == ["a.png", "b.png"]
    src.skip(src.appeared_since(moment))
    (tmp_path / "b.png").write_bytes(_png())  # b completes: still skipped
    assert [src.read() for _ in range(4)] == [None] * 4


def test_files_that_land_in_one_poll_come_in_the_order_they_were_written(tmp_path):
    src = FolderWatchSource(tmp_path, stable_polls=1)
    src.open()
    for name in ("p9.png", "p10.png"):  # by name p10 would come first
        (tmp_path / name).write_bytes(_png())
        time.sleep(0.02)
    names = [Path(f.name).name for f in (src.read() for _ in range(3)) if f is not None]
    assert names == ["p9.png", "p10.png"]


def test_live_job_scores_every_video_frame(tmp_path):
    class FakeDetector:
        def embed(self, images):
            import torch
            return torch.full((1, 2, 2, 2), float(images[0].mean()))

        def inspect_embeddings(self, emb):
            from core.detector import Inspection
            m = np.zeros((8, 8), np.float32)
            return [Inspection(float(emb.mean()), "OK", m, 1.0, 1.0)]

    src = VideoSource(str(_video(tmp_path / "v.avi")))
    items = []
    n = run_job(live_job(src, FakeDetector, CancelToken()), lambda p: items.append(p.item))
    assert n == 5 and all(isinstance(i, ScoredImage) for i in items)
    assert items[-1].inspection.score > items[0].inspection.score


def test_recipe_round_trip_and_errors(tmp_path):
    r = Recipe("cells", ["/a.png", "/b.png"], {"image_size": 64}, str(tmp_path / "cells.okng"), 3.5, 2.0)
    path = save_recipe(r, tmp_path / "cells.okrecipe")
    r2 = load_recipe(path)
    assert r2 == r
    r.ok_paths = ["/c.png"]
    save_recipe(r, path)  # overwrite
    assert load_recipe(path).ok_paths == ["/c.png"]
    (tmp_path / "junk.okrecipe").write_bytes(b"garbage" * 100)
    with pytest.raises(RecipeError):
        load_recipe(tmp_path / "junk.okrecipe")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.okrecipe")


def test_a_watched_folder_reads_16_bit_files_with_the_models_bit_depth(tmp_path):
    """A 12-bit camera's files must read the same live as in the fit (issue 13 item 6)."""
    from core.sources import FolderWatchSource

    img = np.full((32, 32), 2000, np.uint16)  # 12-bit data: 2000 of 4095
    src = FolderWatchSource(tmp_path, stable_polls=1, bit_depth=12)
    src.open()
    cv2.imwrite(str(tmp_path / "part.png"), img)
    frame = None
    for _ in range(5):
        frame = src.read()
        if frame is not None:
            break
    src.close()
    assert frame is not None and int(frame.image[0, 0, 0]) == round(2000 / 4095 * 255)


class _SlowDetector:
    """Scores in ``seconds``; records when each frame's scoring started and ended."""

    def __init__(self, seconds: float, log: list) -> None:
        self.seconds, self.log = seconds, log

    def embed(self, images):
        import time

        import torch
        self.log.append(("score", int(images[0].mean()), time.perf_counter()))
        time.sleep(self.seconds)
        return torch.full((1, 2, 2, 2), float(images[0].mean()))

    def inspect_embeddings(self, emb):
        from core.inspection import Inspection
        return [Inspection(float(emb.mean()), "OK", np.zeros((8, 8), np.float32), 1.0, 1.0)]


class _TimedSource:
    """Frames of rising brightness; records when each read started and ended."""

    def __init__(self, n: int, seconds: float, log: list) -> None:
        self.n, self.seconds, self.log, self.finished, self.i = n, seconds, log, False, 0

    def open(self) -> None:
        pass

    def read(self):
        import time

        from core.sources import Frame
        if self.i >= self.n:
            self.finished = True
            return None
        start = time.perf_counter()
        time.sleep(self.seconds)
        self.i += 1
        self.log.append(("read", self.i, start))
        return Frame(np.full((16, 16, 3), self.i, np.uint8), f"f{self.i}", self.i)

    def close(self) -> None:
        pass


def test_live_job_decodes_the_next_frame_while_the_current_one_is_scored():
    log: list = []
    det = _SlowDetector(0.05, log)
    items = []
    n = run_job(live_job(_TimedSource(6, 0.05, log), lambda: det, CancelToken()), lambda p: items.append(p.item))
    assert n == 6 and [i.inspection.score for i in items] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # in order, all
    reads = {k: t for kind, k, t in log if kind == "read"}
    scored = {k: t for kind, k, t in log if kind == "score"}
    # frame k + 1 was being read while frame k was scored: its read began before frame k's scoring ended
    for k in range(1, 6):
        assert reads[k + 1] < scored[k] + 0.05, k


def test_live_job_reads_no_frame_past_max_frames(tmp_path):
    """A watched folder's file read ahead and never scored would be lost: none is."""
    log: list = []
    src = _TimedSource(10, 0.0, log)
    n = run_job(live_job(src, lambda: _SlowDetector(0.0, []), CancelToken(), max_frames=3))
    assert n == 3 and src.i == 3
