"""Where a triggered inspection takes its image.

The PLC's Trigger means "the part is in place": the station takes the next image of its
source at that moment. A :class:`Playlist` gives image files in order (a folder of images
played in order, the demo stream; it starts over at the end), :class:`LiveGrab` the next
frame of a camera, a video file or a watched folder (:mod:`core.sources`), waiting up to
``timeout`` seconds for it. No image in time, or an unreadable one, is the cycle's result
with ErrorCode NO_IMAGE, never a hang.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import ImageLoadError
from ..imageio import load_image
from ..labels import array_sha256, file_sha256
from .handshake import LineError
from .signals import ErrorCode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Grabbed:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    name: str  # the file path, or "camera 0 #12"
    sha256: str


class TriggerSource(Protocol):
    """What the service takes images from; ``set_bit_depth(bits)`` is optional (files only)."""

    def grab(self) -> Grabbed: ...
    def close(self) -> None: ...


class Playlist:
    """Image files in a fixed order, from the first again after the last."""

    def __init__(self, paths: list[str], bit_depth: int | None = None) -> None:
        if not paths:
            raise ValueError("a playlist needs at least one image")
        self.paths = [str(p) for p in paths]
        self.bit_depth = bit_depth
        self.position = 0

    def grab(self) -> Grabbed:
        path = self.paths[self.position % len(self.paths)]
        self.position += 1
        try:
            image = load_image(path, self.bit_depth)
            return Grabbed(image, path, file_sha256(path))
        except (ImageLoadError, OSError) as exc:
            # the reason first, the file by its name: a PLC string (64 characters on Modbus)
            # keeps what went wrong even when a long name is cut
            reason = exc.reason if isinstance(exc, ImageLoadError) else (exc.strerror or str(exc))
            raise LineError(ErrorCode.NO_IMAGE, f"image unreadable ({reason}): {Path(path).name}",
                            image_path=path) from None

    def set_bit_depth(self, bits: int | None) -> None:
        self.bit_depth = bits

    def close(self) -> None:
        pass


class LiveGrab:
    """The next frame of a :class:`core.sources.FrameSource` (opened on first use).

    A watched folder gives its files in arrival order, one per trigger. A file that *appeared
    while a trigger waited* and was not that trigger's image (a second frame written together
    with the first, a file still being written when its part timed out) belongs to that trigger: it is
    skipped with a warning at the next trigger, never judged as the next part. Found trying
    the station: either of those was judged as the next part's image, and every later part
    was judged on its predecessor's. Files that arrived *between* triggers are taken in order
    (a camera quicker than the PLC's trigger, a station running behind). What timing cannot
    tell apart: a file that lands between triggers (a second frame written later, a file
    written entirely after its part timed out) is taken as the next part's image; a trigger
    that finds more than one image waiting says so (``out_of_step``, a warning), it cannot
    know which image is whose."""

    def __init__(self, source, timeout: float = 5.0, poll: float = 0.005) -> None:
        self.source, self.timeout, self.poll = source, timeout, poll
        self._open = False
        self._theirs: list[str] = []  # files that appeared while the previous trigger waited
        self.skipped: list[str] = []  # files skipped so, oldest first (the last 100)
        self.skipped_total = 0
        self.out_of_step = 0  # triggers that found more than one image waiting

    def set_bit_depth(self, bits: int | None) -> None:
        """Read 16-bit files by the model's rule (the active recipe's; see ``--bit-depth``)."""
        if hasattr(self.source, "bit_depth"):
            self.source.bit_depth = bits

    def open(self) -> None:
        """Open the source now (the service does, when it starts serving). Opened at the first
        trigger instead, a watched folder took the files already there as old: a camera that
        wrote the first part's image before the station saw that trigger lost the part (no
        image within the timeout). Also reports a missing folder or camera at once."""
        if not self._open:
            self.source.open()
            self._open = True

    def grab(self) -> Grabbed:
        self.open()
        src = self.source
        if self._theirs:
            src.skip(self._theirs)
            log.warning("skipped %s: appeared while the previous part waited for its image (a second frame "
                        "for one trigger, or an image still being written when its part timed out)",
                        ", ".join(Path(p).name for p in self._theirs))
            self.skipped = (self.skipped + self._theirs)[-100:]
            self.skipped_total += len(self._theirs)
            self._theirs = []
        watched = hasattr(src, "appeared_since")
        if watched:
            src.note_present()  # what is there now arrived before this trigger: taken in order
            waiting = src.waiting()
            if len(waiting) > 1:  # more than one image per trigger: behind, or out of step (said, not guessed)
                self.out_of_step += 1
                log.warning("%d images wait at one trigger (%s, ...): the station is running behind the camera, or "
                            "the camera wrote more images than there were triggers; each trigger takes the oldest",
                            len(waiting), Path(waiting[0]).name)
        start = time.monotonic()
        try:
            return self._grab()
        finally:
            if watched:
                self._theirs = src.appeared_since(start)

    def _grab(self) -> Grabbed:
        deadline = time.monotonic() + self.timeout
        while True:
            frame = self.source.read()
            if isinstance(frame, ImageLoadError):
                raise LineError(ErrorCode.NO_IMAGE, f"image unreadable ({frame.reason}): {Path(frame.path).name}",
                                image_path=str(frame.path))
            if frame is not None:
                sha = file_sha256(frame.name) if Path(frame.name).is_file() else array_sha256(frame.image)
                return Grabbed(frame.image, frame.name, sha)
            if self.source.finished or time.monotonic() > deadline:
                waiting = getattr(self.source, "waiting", lambda: [])()
                still = f" ({Path(waiting[0]).name} was still being written)" if waiting else ""
                raise LineError(ErrorCode.NO_IMAGE, f"no image from the source within {self.timeout:g} s{still}",
                                image_path=waiting[0] if waiting else "")
            time.sleep(self.poll)  # a camera or folder has no event to wait on: polled

    def close(self) -> None:
        if self._open:
            self.source.close()
