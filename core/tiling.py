"""High-resolution inspection by tiles: a large image seen as overlapping tiles through the same model.

A line camera gives 2-12 MP while the network sees ``image_size`` (224) pixels: the whole image
scaled down to 224 loses a defect of a few pixels. With tiling (``DetectorConfig.tile``) the
image is cut into ``tile`` x ``tile`` pixel tiles overlapping by at least ``tile_overlap``
pixels; each tile goes through the backbone at ``image_size`` (at ``tile == image_size``: the
camera's own pixels), and the per-tile patch distances are stitched into one anomaly map at the
image's own resolution.

* **Layout** (:func:`plan_tiles`): per axis the fewest tiles that cover the image with at least
  the overlap, spread evenly from edge to edge (no padding: every tile is real image).
* **One model for every tile**: the normality model is fitted on the tiles of the OK images, one
  Gaussian (or memory) per patch position *inside a tile*, shared by all tile positions. See the
  README ("High-resolution parts: tiling") for why, on aligned parts too.
* **Overlaps blend by maximum** (:class:`TileStitcher`): a pixel is as anomalous as the most
  anomalous tile that saw it. A defect near one tile's edge is seen whole by its neighbour;
  the max keeps that view instead of averaging it with the partial one, and needs no weight
  canvas. Tile-edge effects of the backbone (zero padding) are the same in every tile, so the
  per-position model learns them from the OK tiles, and the threshold is calibrated on stitched
  maps of held-out OK images: whatever the max adds on OK parts is inside the threshold.
* **Memory constant in the image size**: tiles are views of the decoded image, copied
  ``batch_size`` at a time into one reused buffer; features exist for one batch of tiles only;
  the stitch canvas holds two cells per patch (a 4096 x 4096 image at 224-pixel tiles: 1024 x
  1024 float32, 4 MB). Only the decoded image and the full-resolution map itself grow with
  the image, and they are never held at once when the image is not kept.

Example:
    >>> grid = plan_tiles(2048, 2048, tile=224, overlap=28)
    >>> grid.n_tiles
    121
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from .errors import OkngError

if TYPE_CHECKING:
    import torch

#: ``tile="auto"``: tile when the image's shorter side is at least this many network inputs
AUTO_MIN_FACTOR = 2
AUTO = "auto"
#: largest tile side accepted (pixels): the largest image side the loader accepts
MAX_TILE = 20_000
#: stitch canvas cells per patch of the backbone's finest stage (tile placement error <= a quarter patch)
CELLS_PER_PATCH = 2


class TilingError(OkngError, ValueError):
    """A tiling setting that cannot work for an image (a tile larger than the image)."""


def default_overlap(tile: int) -> int:
    """The overlap when none is given: an eighth of the tile (28 px at 224), so a defect
    cut by one tile's edge lies well inside its neighbour."""
    return tile // 8


def check_tiling(tile: int | str | None, overlap: int | None, image_size: int) -> None:
    """Refuse, by name and up front, tiling settings that cannot work for any image."""
    if tile is None:
        if overlap is not None:
            raise ValueError(f"tile_overlap (--overlap) is {overlap} but tiling is off: give --tile N or --tile auto")
        return
    if tile != AUTO and (isinstance(tile, bool) or not isinstance(tile, int) or not 32 <= tile <= MAX_TILE):
        raise ValueError(f"tile (--tile) must be a whole number of pixels from 32 to {MAX_TILE}, or 'auto', "
                         f"got {tile!r}")
    if overlap is None:
        return
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"tile_overlap (--overlap) must be a whole number of pixels, 0 or more, got {overlap!r}")
    side = image_size if tile == AUTO else tile
    if overlap >= side:
        what = f"the tile ({side} pixels)" if tile != AUTO else f"the automatic tile ({side} pixels = --image-size)"
        raise ValueError(f"tile_overlap (--overlap) must be smaller than {what}, got {overlap}: "
                         "tiles that overlap by a whole tile never advance")


def resolve_tiling(tile: int | str | None, overlap: int | None, image_size: int,
                   height: int, width: int) -> tuple[int | None, int | None]:
    """The concrete (tile, overlap) for images of ``height`` x ``width``: ``auto`` becomes
    tiles of ``image_size`` (the camera's own pixels) when the shorter side is at least
    ``AUTO_MIN_FACTOR`` network inputs, else no tiling (scaling such an image down to the
    network loses less than half its resolution). A model file always records the result."""
    if tile == AUTO:
        tile = image_size if min(height, width) >= AUTO_MIN_FACTOR * image_size else None
    if tile is None:
        return None, None
    return tile, default_overlap(tile) if overlap is None else overlap


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one image lie: top-left corners ``ys`` x ``xs``, each ``tile`` square."""

    height: int
    width: int
    tile: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def n_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    def origins(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]


def _axis_origins(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    if length == tile:
        return (0,)
    n = math.ceil((length - tile) / (tile - overlap)) + 1
    # evenly spread from edge to edge: every overlap is at least ``overlap`` (n was chosen so)
    return tuple(round(i * (length - tile) / (n - 1)) for i in range(n))


def plan_tiles(height: int, width: int, tile: int, overlap: int) -> TileGrid:
    """The tiles of a ``height`` x ``width`` image; refuses an image smaller than a tile."""
    if tile > min(height, width):
        raise TilingError(f"the image is {width}x{height} pixels, smaller than the model's {tile}-pixel tiles: "
                          "fit with smaller tiles (--tile; in the window: the tiling chooser) or whole images "
                          "for images this size")
    if not 0 <= overlap < tile:
        raise TilingError(f"tile overlap {overlap} must be from 0 to {tile - 1} pixels (below the tile)")
    return TileGrid(height, width, tile, _axis_origins(height, tile, overlap), _axis_origins(width, tile, overlap))


def tiles_per_image(height: int, width: int, tile: int, overlap: int) -> int:
    return plan_tiles(height, width, tile, overlap).n_tiles


def tile_batches(image: np.ndarray, grid: TileGrid, size: int,
                 batch_size: int) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
    """(origins, (B, 3, size, size) float32 tensor) for at most ``batch_size`` tiles at a time.

    Tiles are slices (views) of ``image``, resized into one reused uint8 buffer exactly as
    :func:`core.detector.preprocess` resizes a whole image, so a tile scores as the same
    pixels given as an image would."""
    origins = grid.origins()
    buf = np.empty((min(batch_size, len(origins)), size, size, 3), np.uint8)
    t = grid.tile
    interp = cv2.INTER_AREA if t >= size else cv2.INTER_LINEAR
    for start in range(0, len(origins), batch_size):
        chunk = origins[start : start + batch_size]
        for i, (y, x) in enumerate(chunk):
            view = image[y : y + t, x : x + t]
            if t == size:
                buf[i] = view
            else:
                cv2.resize(view, (size, size), dst=buf[i], interpolation=interp)
        import torch  # here, not at the top: settings are checked without PyTorch (okng score's lean path)

        batch = torch.from_numpy(buf[: len(chunk)]).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
        yield chunk, batch


class TileStitcher:
    """Max-blends per-tile patch distances into one map of the whole image.

    The canvas has :data:`CELLS_PER_PATCH` cells per patch; each tile's (h, w) distances are
    resized (bilinear) onto its footprint there, cell edges at ``round(pixel * scale)`` so
    neighbouring footprints always meet. :meth:`anomaly_map` smooths the canvas with the
    detector's Gaussian (its sigma converted from network pixels to cells) and resizes it to
    the image's own resolution: the only full-resolution array, made once.
    """

    def __init__(self, grid: TileGrid, patch_grid: tuple[int, int], image_size: int) -> None:
        self.grid = grid
        self.image_size = image_size
        #: canvas cells per image pixel (the same on both axes: tiles and patch grids are square)
        self.scale = CELLS_PER_PATCH * patch_grid[0] / grid.tile
        self.canvas = np.full((max(1, self._cell(grid.height)), max(1, self._cell(grid.width))), -np.inf, np.float32)
        self.tiles_added = 0

    def _cell(self, pixel: int) -> int:
        return round(pixel * self.scale)

    def add(self, origins: list[tuple[int, int]], distances: torch.Tensor) -> None:
        """Blend a batch of tiles' (B, h, w) patch distances at their ``origins`` (pixels)."""
        d = distances.detach().float().cpu().numpy()
        t = self.grid.tile
        for (y, x), dist in zip(origins, d):
            r0, r1, c0, c1 = self._cell(y), self._cell(y + t), self._cell(x), self._cell(x + t)
            foot = cv2.resize(np.ascontiguousarray(dist), (c1 - c0, r1 - r0), interpolation=cv2.INTER_LINEAR)
            region = self.canvas[r0:r1, c0:c1]
            np.maximum(region, foot, out=region)
        self.tiles_added += len(origins)

    def anomaly_map(self, sigma: float) -> np.ndarray:
        """(height, width) float32 map; ``sigma`` in network-input pixels, as for a whole image."""
        if self.tiles_added < self.grid.n_tiles:
            raise RuntimeError(f"only {self.tiles_added} of {self.grid.n_tiles} tiles were stitched")
        canvas = self.canvas
        if sigma > 0:
            s = sigma * (self.grid.tile / self.image_size) * self.scale  # cells
            k = 2 * int(4.0 * s + 0.5) + 1
            canvas = cv2.GaussianBlur(canvas, (k, k), s, borderType=cv2.BORDER_REFLECT)
        return cv2.resize(canvas, (self.grid.width, self.grid.height), interpolation=cv2.INTER_LINEAR)


def stitch_tiles(image: np.ndarray, grid: TileGrid, size: int, batch_size: int, patch_grid: tuple[int, int],
                 distances: Callable[[torch.Tensor], torch.Tensor],
                 check_cancel: Callable[[], None] | None = None) -> TileStitcher:
    """Every tile of ``image`` through ``distances`` (a batch -> (B, h, w) patch distances),
    ``batch_size`` tiles at a time, stitched. ``check_cancel`` runs before each batch."""
    stitcher = TileStitcher(grid, patch_grid, size)
    for origins, batch in tile_batches(image, grid, size, batch_size):
        if check_cancel is not None:
            check_cancel()
        stitcher.add(origins, distances(batch))
    return stitcher


def topk_mean(anomaly_map: np.ndarray, k: int, rows: int = 256) -> float:
    """Mean of the ``k`` highest pixels, ``rows`` rows at a time (never a copy of the whole
    map: ``np.partition`` of a 4096 x 4096 map would copy 64 MB)."""
    best = np.empty(0, anomaly_map.dtype)
    for r in range(0, anomaly_map.shape[0], rows):
        pool = np.concatenate([best, anomaly_map[r : r + rows].ravel()])
        best = np.partition(pool, pool.size - k)[-k:] if pool.size > k else pool
    return float(best.mean())
