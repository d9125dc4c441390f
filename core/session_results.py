"""The results of an inspection session: kept, re-judged and shown without running the model.

Each inspected image becomes a :class:`ResultRecord` (score, verdict, anomaly map, and the
embedding that lets feedback re-judge it under a changed model). Threshold changes re-judge
stored scores; :func:`compose_display` builds what a view draws from a record and the
thresholds. Plain Python: the GUI shows these, the session owns them.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .regions import Region, find_regions
from .thresholds import verdict

#: results a session keeps (the results table); older ones drop out first
MAX_RESULTS = 500
#: decoded images kept for redisplay; older file results are re-read from disk
KEEP_IMAGES = 50
#: ...and at most this many bytes of them (a tiled model's parts are multi-megapixel: 50 decoded
#: 12 MP images would hold 1.8 GB)
KEEP_IMAGE_BYTES = 400_000_000
#: longest side of a kept anomaly map; a tiled model's full-resolution maps are reduced to it by
#: block maximum (every hot spot stays visible) for display: 500 kept maps at 2048 x 2048 would
#: hold 8 GB. Scores and verdicts come from the full map, before it is reduced.
MAX_MAP_SIDE = 1024
#: the heatmap's colour scale tops out at this multiple of the pixel threshold
HEAT_RANGE = 2.0
#: an NG with no region above the pixel threshold outlines the area above this share of its peak
HOTTEST_SHARE = 0.8


def heat_vmax(pixel_threshold: float | None) -> float | None:
    """Top of the heatmap colour scale for a pixel threshold (None: the view decides)."""
    return HEAT_RANGE * pixel_threshold if pixel_threshold else None


def judge(score: float, image_threshold: float | None) -> str:
    """'OK' / 'NG' against the threshold, '?' when there is none (never counted as OK)."""
    return "?" if image_threshold is None else verdict(score, image_threshold)


@dataclass
class ResultRecord:
    id: int
    name: str
    score: float
    verdict: str
    anomaly_map: np.ndarray  # (S, S) float32, read-only
    image: np.ndarray | None  # (H, W, 3) uint8 RGB, dropped for older file results
    path: str | None  # the image file, None for a live frame
    seconds: float
    thumbnail: np.ndarray | None = None
    embedding: torch.Tensor | None = None  # (1, C, h, w) float16, for re-judging after feedback
    #: the verdict before the last feedback changed it (the results table shows "NG → OK")
    changed_from: str | None = None
    sha256: str = ""  # of the image file or frame, computed off the UI thread
    #: what embedded it (core.runtime.graph_key): a model with another key cannot re-score it
    embedder_key: str = ""


@dataclass(frozen=True)
class Display:
    """Everything the inspection view needs for one result."""

    result_id: int
    name: str
    image: np.ndarray
    anomaly_map: np.ndarray
    contours: list
    verdict: str
    score: float
    image_threshold: float | None
    pixel_threshold: float | None
    vmax: float | None
    #: a line for the operator when the picture needs explaining (empty: nothing to say)
    note: str = ""


def display_map(anomaly_map: np.ndarray, max_side: int = MAX_MAP_SIDE) -> np.ndarray:
    """``anomaly_map`` itself if its longer side is at most ``max_side``, else reduced by an
    integer factor taking each block's maximum (block row by block row: no full-size copy)."""
    h, w = anomaly_map.shape
    f = -(-max(h, w) // max_side)
    if f <= 1:
        return anomaly_map
    # ceil: the last, partial block row and column are kept too (a hot spot on the edge stays)
    out = np.empty((-(-h // f), -(-w // f)), anomaly_map.dtype)
    full = w // f
    for i in range(out.shape[0]):
        band = anomaly_map[i * f : (i + 1) * f]
        out[i, :full] = band[:, : full * f].reshape(band.shape[0], full, f).max(axis=(0, 2))
        if full < out.shape[1]:
            out[i, full] = band[:, full * f :].max()
    out.flags.writeable = False
    return out


def thumbnail(img: np.ndarray, size: int = 48) -> np.ndarray:
    step = max(1, min(img.shape[:2]) // size)
    return np.ascontiguousarray(img[::step, ::step])


class SessionResults:
    """Ordered, bounded results with ids; re-judged in place when thresholds move."""

    def __init__(self) -> None:
        self._records: OrderedDict[int, ResultRecord] = OrderedDict()
        self._next_id = 1
        #: results that dropped out of the table (past MAX_RESULTS); the results log keeps them
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._records)

    @property
    def next_id(self) -> int:
        """The id the next result gets (ids only grow: results from here on are newer)."""
        return self._next_id

    def __iter__(self):
        return iter(self._records.values())

    def __contains__(self, result_id: object) -> bool:
        return result_id in self._records

    def get(self, result_id: int | None) -> ResultRecord | None:
        return self._records.get(result_id) if result_id is not None else None

    def add(self, name: str, score: float, anomaly_map: np.ndarray, image: np.ndarray | None,
            path: str | None, seconds: float, image_threshold: float | None,
            embedding: torch.Tensor | None = None, sha256: str = "", embedder_key: str = "") -> ResultRecord:
        rid = self._next_id
        self._next_id += 1
        rec = ResultRecord(rid, name, float(score), judge(score, image_threshold), display_map(anomaly_map), image,
                           path, seconds, thumbnail(image) if image is not None else None, embedding, sha256=sha256,
                           embedder_key=embedder_key)
        self._records[rid] = rec
        kept_bytes = 0
        for old in reversed(self._records.values()):  # newest first: drop decoded images past the limits
            if old.image is None:
                continue
            kept_bytes += old.image.nbytes
            # a file can be read again later, so its image goes past either limit; a live frame
            # exists only here, so it goes only past the byte budget (2-12 MP frames of a tiled
            # model would otherwise hold gigabytes); labelling a frame whose image is gone says so
            past_count = old.path is not None and old.id <= rid - KEEP_IMAGES
            if old.id != rid and (past_count or kept_bytes > KEEP_IMAGE_BYTES):
                old.image = None
        while len(self._records) > MAX_RESULTS:
            self._records.popitem(last=False)
            self.dropped += 1
        return rec

    def clear(self) -> None:
        self._records.clear()
        self.dropped = 0

    def remove(self, ids: set[int]) -> None:
        for rid in ids:
            self._records.pop(rid, None)

    def rejudge(self, image_threshold: float | None) -> None:
        """Every verdict against this threshold; the "changed by the last label" marks go (a
        label's re-judging sets them again for what it changed)."""
        for r in self._records.values():
            r.verdict = judge(r.score, image_threshold)
            r.changed_from = None

    def scores(self) -> np.ndarray:
        return np.array([r.score for r in self._records.values()], np.float64)

    def with_embeddings(self) -> list[tuple[int, torch.Tensor]]:
        return [(r.id, r.embedding) for r in self._records.values() if r.embedding is not None]


def outlined_regions(rec: ResultRecord, pixel_threshold: float | None) -> tuple[list[Region], bool]:
    """The regions outlined on ``rec`` (what a click can label), and whether they are the
    hottest area instead of regions above the pixel threshold: an NG by the image score with
    no pixel above the pixel threshold (usual with top-k pooling, whose calibrated pixel
    threshold lies above its image threshold) is never shown with nothing to look at, and
    what is outlined can be marked (found trying the station: the outline drawn was refused
    as "no highlighted region here")."""
    regions = [] if pixel_threshold is None else find_regions(rec.anomaly_map, pixel_threshold)
    if rec.verdict == "NG" and not regions:
        peak = float(rec.anomaly_map.max())
        return find_regions(rec.anomaly_map, HOTTEST_SHARE * peak)[:1], True
    return regions, False


def compose_display(rec: ResultRecord, image: np.ndarray | None, image_threshold: float | None,
                    pixel_threshold: float | None) -> Display:
    """What to draw for ``rec``: the image (black if it is gone), map, region outlines."""
    note = ""
    if image is None:
        image = np.zeros(rec.anomaly_map.shape + (3,), np.uint8)
        note = "The image is no longer available; the heat map is shown on black."
    regions, hottest = outlined_regions(rec, pixel_threshold)
    contours = [r.contour for r in regions]
    if hottest:
        note = ("NG by image score; no pixel is above the pixel threshold — the hottest area is outlined "
                "(click it to label it). Lower the pixel threshold to see the regions that count.")
    return Display(rec.id, rec.name, image, rec.anomaly_map, contours, rec.verdict, rec.score,
                   image_threshold, pixel_threshold, heat_vmax(pixel_threshold), note)


def display_name(path: str, from_file: bool, truth: dict[str, str]) -> str:
    name = Path(path).name if from_file else path
    return name + (f"  [truth {truth[path]}]" if path in truth else "")
