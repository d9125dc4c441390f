"""Frame sources for live inspection: camera, video file, watched folder. No Qt here.

A source is opened, polled with :meth:`read` (the newest frame, or ``None`` when nothing
new is available yet) and closed; :attr:`finished` says it will never deliver again (end of
a video file). :func:`live_job` turns a source and a detector getter into a cancellable
generator job, like the other jobs in :mod:`core.jobs`.

Example:
    >>> src = VideoSource("line.mp4")
    >>> for p in live_job(src, lambda: det, CancelToken()):
    ...     print(p.item.inspection.verdict)
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch

from .errors import ImageLoadError, OkngError
from .imageio import IMAGE_EXTENSIONS, check_image_array, load_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    name: str  # file name or "camera 0 #12"
    index: int


class SourceError(OkngError):
    """A camera, video or folder could not be opened or read."""


class FrameSource(Protocol):
    finished: bool

    def open(self) -> None: ...
    def read(self) -> Frame | ImageLoadError | None: ...
    def close(self) -> None: ...


class VideoSource:
    """An OpenCV capture: a camera by device index (int or digit string) or a video file."""

    def __init__(self, target: int | str) -> None:
        if isinstance(target, str) and target.strip().isdigit():
            target = int(target)
        self.target = target
        self.finished = False
        self._cap: cv2.VideoCapture | None = None
        self._n = 0

    @property
    def is_camera(self) -> bool:
        return isinstance(self.target, int)

    def open(self) -> None:
        if not self.is_camera and not Path(self.target).is_file():
            raise SourceError(f"video file not found: {self.target}")
        cap = cv2.VideoCapture(self.target)
        if not cap.isOpened():
            cap.release()
            if self.is_camera:
                raise SourceError(f"cannot open camera {self.target}: check that it is plugged in and not in use by "
                                  "another program, or try another device index (0, 1, …) or a video file")
            raise SourceError(f"cannot open video {self.target}: the file is not a video this station can decode "
                              "(try MP4/AVI, or convert it)")
        if self.is_camera:  # keep only the newest frame: stale frames are dropped, not queued
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        self._cap = cap
        self.finished = False

    def read(self) -> Frame | None:
        if self._cap is None or self.finished:
            return None
        ok, bgr = self._cap.read()
        if not ok or bgr is None:
            if self.is_camera:
                raise SourceError(f"camera {self.target} stopped delivering frames")
            self.finished = True
            return None
        self._n += 1
        rgb = check_image_array(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), self.target)
        label = f"camera {self.target}" if self.is_camera else Path(str(self.target)).name
        return Frame(rgb, f"{label} #{self._n}", self._n)

    def close(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


#: PNG's last chunk (IEND, empty, with its CRC): a PNG without it is still being written
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def looks_complete(path: Path, size: int) -> bool:
    """Whether a file of ``size`` bytes looks written to its end, from its last bytes: PNG
    ends with its IEND chunk, JPEG with its end-of-image marker (trailing zero padding
    allowed), BMP is as long as its header says. Other formats (TIFF, WebP, ...) have no end
    mark to look for: ``True``, and the size's stability alone decides. A JPEG cut short
    decodes without an error in OpenCV (the missing rows come out grey), so this check, not
    the decoder, is what keeps a JPEG still being written from being judged."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(b"\x89PNG"):
                f.seek(max(size - len(_PNG_END), 0))
                return f.read(len(_PNG_END)) == _PNG_END
            if head.startswith(b"\xff\xd8"):
                f.seek(max(size - 64, 0))
                return f.read(64).rstrip(b"\x00").endswith(b"\xff\xd9")
            if head.startswith(b"BM") and len(head) >= 6:
                return size >= int.from_bytes(head[2:6], "little")
    except OSError:
        return False
    return True


def jpeg_ends_after_its_scan(path: Path) -> bool:
    """A JPEG's end-of-image marker comes after its last scan (start-of-scan marker): true
    also with a vendor's trailer after the end, false for a file cut short even when an
    embedded thumbnail carries an end marker of its own (inside the scan's coded data a 0xFF
    byte is always stuffed, so neither marker appears there by chance). Reads the file."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    scan = data.rfind(b"\xff\xda")
    return scan >= 0 and data.find(b"\xff\xd9", scan) >= 0


class FolderWatchSource:
    """New image files appearing in a folder, in arrival order.

    A file is taken once its size is non-zero and unchanged over ``stable_polls`` successive
    polls and it looks written to its end (:func:`looks_complete`), so a file still being
    written is not read half-way. A file that fails to decode anyway (a writer that paused
    longer than the polls) is tried again once it changes, and reported unreadable only after
    it has stayed the same for ``settle_s`` seconds (found trying the station: a camera
    writing in chunks 150 ms apart lost the part as "damaged or cut short"). A file without
    its end mark is taken once it has stayed the same for ``settle_s``: a valid image with a
    vendor's trailer after its end marker is decoded as before, a JPEG cut short (no end
    marker after its image data) is reported unreadable, never judged with grey rows.

    ``first_seen`` keeps when each file was first listed, for a trigger's source to tell the
    files that appeared while it waited from those there before (:meth:`appeared_since`).
    """

    def __init__(self, folder: str | Path, include_existing: bool = False, stable_polls: int = 2,
                 bit_depth: int | None = None, settle_s: float = 1.0) -> None:
        # absolute: the results log and MQTT name images by this path (a relative --watch
        # logged "feed/part_0001.png" where the window logs absolute paths)
        self.folder = Path(folder).absolute()
        self.bit_depth = bit_depth  # how 16-bit files become 8-bit: the model's own rule
        self.include_existing = include_existing
        self.stable_polls = stable_polls
        self.settle_s = settle_s
        self.finished = False
        self._seen: set[str] = set()  # taken, skipped or there before opening: never listed again
        self._pending: dict[str, tuple[int, int, int]] = {}  # path -> (size, mtime ns, polls seen so)
        self._changed_at: dict[str, float] = {}  # path -> when its size or mtime last changed
        self._failed: dict[str, tuple[int, int]] = {}  # path -> (size, mtime ns) it failed to decode at
        self._unmarked: set[str] = set()  # taken once settled, without the end mark looked for
        self.first_seen: dict[str, float] = {}  # path -> when it was first listed (monotonic)
        self._queue: list[str] = []
        self._n = 0

    def open(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"folder not found: {self.folder}")
        if not self.include_existing:
            self._seen = {str(p) for p in self._list()}

    def _list(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())

    def poll(self) -> list[str]:
        """Paths that became ready since the last poll, in arrival order (first listed, then
        modification time: ``p10.png`` written after ``p9.png`` comes after it)."""
        ready = []
        now = time.monotonic()
        listed = set()
        for p in self._list():
            key = str(p)
            listed.add(key)
            if key in self._seen or key in self._queue:
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            self.first_seen.setdefault(key, now)
            size, mtime = st.st_size, st.st_mtime_ns
            prev_size, prev_mtime, count = self._pending.get(key, (-1, -1, 0))
            same = size == prev_size and mtime == prev_mtime
            if not same:
                self._changed_at[key] = now
            count = count + 1 if same and size > 0 else 1
            self._pending[key] = (size, mtime, count)
            if count < self.stable_polls or size == 0:
                continue
            settled = now - self._changed_at.get(key, now) >= self.settle_s
            if self._failed.get(key) == (size, mtime) and not settled:
                continue  # failed to decode as it is: wait until it changes, or has settled
            # a file with no end mark yet waits, but only until it has settled: a valid image with
            # bytes after its end marker (a vendor's trailer) is then decoded as before
            if looks_complete(p, size):
                ready.append(key)
            elif settled:
                ready.append(key)
                self._unmarked.add(key)
        for key in [k for k in self._pending if k not in listed]:  # deleted or renamed before it was taken
            self._forget(key)
        self._seen &= listed  # a file gone from the folder is no longer remembered (a month of parts)
        ready.sort(key=lambda k: (self.first_seen[k], self._pending[k][1], k))
        for key in ready:
            del self._pending[key]
        return ready

    def waiting(self) -> list[str]:
        """Files listed but not taken yet: ready in the queue, or still being written."""
        return [*self._queue, *(k for k in self._pending if k not in self._queue)]

    def note_present(self) -> None:
        """List the folder now, so that every file already there counts as there before this
        moment (:meth:`appeared_since`); nothing is taken."""
        self._queue += self.poll()

    def appeared_since(self, moment: float) -> list[str]:
        """Files not taken yet that were first listed at or after ``moment`` (monotonic)."""
        return [k for k in self.waiting() if self.first_seen.get(k, -1.0) >= moment]

    def skip(self, keys: list[str]) -> None:
        """Never take these files."""
        for key in keys:
            self._forget(key)

    def _forget(self, key: str) -> None:
        self._seen.add(key)
        for d in (self._pending, self._changed_at, self._failed, self.first_seen):
            d.pop(key, None)
        self._unmarked.discard(key)
        if key in self._queue:
            self._queue.remove(key)

    def read(self) -> Frame | ImageLoadError | None:
        if not self._queue:
            self._queue = self.poll()
        if not self._queue:
            return None
        path = self._queue.pop(0)
        st = None
        try:
            st = Path(path).stat()
            if path in self._unmarked and Path(path).suffix.lower() in (".jpg", ".jpeg") \
                    and not jpeg_ends_after_its_scan(Path(path)):
                # OpenCV would decode it with grey rows for the missing part, and judge that
                raise ImageLoadError(path, "not a readable image (cut short: the JPEG ends inside its image data)")
            frame = Frame(load_image(path, self.bit_depth), path, self._n + 1)
        except (ImageLoadError, OSError) as exc:
            changed = self._changed_at.get(path)
            if st is not None and changed is not None and time.monotonic() - changed < self.settle_s:
                self._failed[path] = (st.st_size, st.st_mtime_ns)  # tried again once it changes or settles
                self._pending[path] = (st.st_size, st.st_mtime_ns, self.stable_polls)
                return None
            self._forget(path)
            return exc if isinstance(exc, ImageLoadError) else ImageLoadError(path, f"cannot read file ({exc})")
        self._forget(path)
        self._n += 1
        return frame

    def close(self) -> None:
        pass


def live_job(
    source: FrameSource,
    get_detector: Callable[[], object],
    token,
    idle_seconds: float = 0.05,
    max_frames: int | None = None,
    keep_embeddings: bool = False,
) -> Generator:
    """Read the newest frame, score it with the current detector snapshot, yield the result.

    ``get_detector()`` is called per frame, so a refit takes effect on the next frame. Each
    yield is a :class:`~core.jobs.Progress` whose ``item`` is a ScoredImage or Skipped.
    Returns the number of frames inspected.

    The next frame is read (decoded, converted, hashed) on a helper thread while the current
    one is scored, so the pipeline stays full: a video frame's decode no longer adds to each
    inspection (OpenCV and hashlib release the GIL). A frame is read ahead only when it will
    be scored (not past ``max_frames``).
    """
    from .jobs import Progress, ScoredImage, Skipped

    source.open()
    n = 0
    reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="okng-live-read")
    try:
        pending = reader.submit(_read_hashed, source)
        while max_frames is None or n < max_frames:
            token.raise_if_cancelled()
            frame, sha = pending.result()
            pending = None
            if frame is None:
                if source.finished:
                    break
                time.sleep(idle_seconds)  # nothing new yet; cancellation latency <= idle_seconds
                pending = reader.submit(_read_hashed, source)
                continue
            n += 1
            if max_frames is None or n < max_frames:
                pending = reader.submit(_read_hashed, source)  # decoded while this one is scored
            if isinstance(frame, ImageLoadError):
                yield Progress(n, 0, str(frame.path), Skipped(str(frame.path), frame.reason))
                continue
            det = get_detector()
            t = time.perf_counter()
            # tile by tile, no single embedding to keep (core.tiled_jobs); ``get_detector`` may
            # give anything with embed/inspect_embeddings, so the tiling is looked up, not assumed
            if getattr(getattr(det, "config", None), "tiled", False):
                from .tiling import TilingError

                try:
                    inspection, kept = det.inspect_tiled(frame.image, token.raise_if_cancelled), None
                except TilingError as exc:  # a frame smaller than a tile: skipped, the run goes on
                    yield Progress(n, 0, frame.name, Skipped(frame.name, str(exc)))
                    continue
            else:
                emb = det.embed([frame.image])
                inspection = det.inspect_embeddings(emb)[0]
                kept = half_precision(emb) if keep_embeddings else None
            yield Progress(n, 0, frame.name,
                           ScoredImage(frame.name, inspection, frame.image, time.perf_counter() - t, kept, sha))
    finally:
        reader.shutdown(wait=True, cancel_futures=True)  # the reader is done before the source closes
        source.close()
        from .allocator import release_free_memory

        release_free_memory()  # as every long job ends: a live run of large (tiled) frames frees much
    return n


def half_precision(emb: torch.Tensor) -> torch.Tensor:
    """A float16 copy of an embedding, made by numpy: a torch operation here would wake
    PyTorch's OpenMP threads, which then spin on the cores the runtime needs for the next
    frame (2-4 ms per frame measured in live inspection)."""
    return torch.from_numpy(np.asarray(emb, dtype=np.float16))


def _read_hashed(source: FrameSource) -> tuple[Frame | ImageLoadError | None, str]:
    """The source's next frame and the SHA-256 of its pixels (the result's identity)."""
    from .labels import array_sha256

    frame = source.read()
    return frame, (array_sha256(frame.image) if isinstance(frame, Frame) else "")


@dataclass(frozen=True)
class CapturedFrame:
    """One frame grabbed by :func:`capture_job` and saved as a PNG file."""

    path: str
    index: int


def capture_job(
    source: FrameSource,
    folder: str | Path,
    count: int,
    token,
    prefix: str = "ok",
    idle_seconds: float = 0.05,
) -> Generator:
    """Grab ``count`` frames from ``source`` and save each as ``<folder>/<prefix>_<timestamp>.png``.

    Files are written atomically (temporary file + rename), so a cancelled or killed capture
    never leaves a half-written image. Each saved frame is yielded as a Progress whose
    ``item`` is a :class:`CapturedFrame`; returns the list of saved paths (fewer than
    ``count`` if a video file ends first).
    """
    from datetime import datetime

    from .atomic import write_bytes_atomic
    from .jobs import Progress

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SourceError(f"cannot create the capture folder {folder}: {exc.strerror or exc}") from exc
    saved: list[str] = []
    yield Progress(0, count, "opening the camera")
    source.open()
    try:
        while len(saved) < count:
            token.raise_if_cancelled()
            frame = source.read()
            if frame is None:
                if source.finished:
                    break
                time.sleep(idle_seconds)
                continue
            if isinstance(frame, ImageLoadError):
                continue
            ok, buf = cv2.imencode(".png", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
            if not ok:
                raise SourceError(f"cannot encode frame {frame.name} as PNG")
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
            target = folder / f"{prefix}_{stamp}_{len(saved) + 1:03d}.png"
            write_bytes_atomic(target, buf.tobytes())
            saved.append(str(target))
            yield Progress(len(saved), count, f"captured {target.name}", CapturedFrame(str(target), len(saved)))
    finally:
        source.close()
    return saved
