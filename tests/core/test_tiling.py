"""High-resolution tiling: where tiles lie, how their maps are stitched, and that a tiled model
is fitted, saved and scored the way it says (core/tiling.py, core/tiled_jobs.py)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.cli import main
from core.detector import DetectorConfig, preprocess
from core.jobs import CancelToken, ScoredImage, Skipped, fit_job, inspect_job, inspect_paths, run_job
from core.persistence import load_detector, read_model_file, save_detector, write_model_file
from core.tiling import TileStitcher, TilingError, plan_tiles, tile_batches, topk_mean

H, W = 160, 224  # not square, not a whole number of tiles: edges and uneven overlaps are exercised
TILED = dict(weights="random", image_size=64, n_channels=24, batch_size=4, tile=64, tile_overlap=16)


def texture(rng: np.random.Generator, h: int = H, w: int = W) -> np.ndarray:
    """A fine grey texture, the same statistics everywhere (any tile looks like any other)."""
    img = 128 + 12 * np.sin(np.arange(w)[None, :] / 3.0) + rng.normal(0, 5, (h, w))
    return np.clip(np.repeat(img[..., None], 3, axis=2), 0, 255).astype(np.uint8)


def with_defect(img: np.ndarray, y: int, x: int, side: int = 6) -> np.ndarray:
    out = img.copy()
    out[y : y + side, x : x + side] = 255
    return out


@pytest.fixture(scope="module")
def ok_paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiled-ok")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        p = d / f"ok_{i}.png"
        cv2.imwrite(str(p), texture(rng))
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def tiled_fit(ok_paths):
    return run_job(fit_job(ok_paths, DetectorConfig(**TILED), CancelToken()))


# -- where tiles lie --------------------------------------------------------------------------
@pytest.mark.parametrize("length, tile, overlap", [(160, 64, 16), (224, 64, 16), (64, 64, 0), (1000, 224, 28),
                                                   (231, 64, 0), (2048, 224, 28)])
def test_tiles_cover_the_image_edge_to_edge_with_at_least_the_overlap(length, tile, overlap):
    ys = plan_tiles(length, length, tile, overlap).ys
    assert ys[0] == 0 and ys[-1] + tile == length  # no padding: every tile is real image
    assert all(b - a <= tile - overlap for a, b in zip(ys, ys[1:]))  # neighbours overlap by >= overlap
    assert len(ys) == 1 or len(ys) == -(-(length - tile) // (tile - overlap)) + 1  # the fewest such tiles


def test_a_tile_larger_than_the_image_is_refused_with_the_sizes():
    with pytest.raises(TilingError, match=r"image is 300x100 pixels, smaller than the model's 224-pixel tiles"):
        plan_tiles(100, 300, 224, 28)


@pytest.mark.parametrize("settings, message", [
    (dict(tile=64, tile_overlap=64), r"tile_overlap \(--overlap\) must be smaller than the tile \(64 pixels\)"),
    (dict(tile=64, tile_overlap=100), r"must be smaller than the tile"),
    (dict(tile="auto", tile_overlap=224), r"smaller than the automatic tile \(224 pixels"),
    (dict(tile=16), r"tile \(--tile\) must be a whole number of pixels from 32"),
    (dict(tile="big"), r"tile \(--tile\) must be"),
    (dict(tile=64, tile_overlap=-1), r"0 or more"),
    (dict(tile_overlap=8), r"tiling is off"),
])
def test_bad_tiling_settings_are_refused_up_front_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        DetectorConfig(**settings)


def test_tiles_go_to_the_network_exactly_as_the_same_pixels_given_as_an_image():
    img = texture(np.random.default_rng(1))
    for tile in (64, 96):  # native, and scaled down to the network
        grid = plan_tiles(H, W, tile, 16)
        seen = [(o, b) for origins, batch in tile_batches(img, grid, 64, 4) for o, b in zip(origins, batch)]
        assert [o for o, _ in seen] == grid.origins()
        for (y, x), t in seen:
            assert torch.equal(t, preprocess([img[y : y + tile, x : x + tile].copy()], 64)[0])


# -- stitching ---------------------------------------------------------------------------------
def brightness_distances(batch: torch.Tensor) -> torch.Tensor:
    """A stand-in model: each 8 x 8 patch's distance is its mean brightness (64 px -> 8 x 8 grid)."""
    return F.avg_pool2d(batch.mean(1, keepdim=True), 8)[:, 0]


def stitched(img: np.ndarray, tile: int = 64, overlap: int = 16, sigma: float = 0.0) -> np.ndarray:
    grid = plan_tiles(img.shape[0], img.shape[1], tile, overlap)
    st = TileStitcher(grid, (8, 8), 64)
    for origins, batch in tile_batches(img, grid, 64, 4):
        st.add(origins, brightness_distances(batch))
    return st.anomaly_map(sigma)


@pytest.mark.parametrize("y, x", [(4, 4), (70, 100), (40, 40), (150, 214), (90, 170)])
def test_a_bright_spot_in_one_tile_lights_up_the_stitched_map_exactly_there(y, x):
    img = np.zeros((H, W, 3), np.uint8)
    img[y : y + 6, x : x + 6] = 255  # (40, 40), (90, 170): in overlaps of two and four tiles
    m = stitched(img, sigma=4.0)
    assert m.shape == (H, W)
    py, px = np.unravel_index(np.argmax(m), m.shape)
    assert abs(py - (y + 3)) <= 8 and abs(px - (x + 3)) <= 8  # within a patch (8 px) of the spot
    far = np.ones_like(m, bool)
    far[max(0, y - 24) : y + 30, max(0, x - 24) : x + 30] = False
    assert m[far].max() < 0.05 * m.max()  # and nowhere else


def test_overlaps_keep_the_most_anomalous_tile_view():
    grid = plan_tiles(64, 112, 64, 16)  # two tiles side by side: x 0..63 and 48..111
    assert grid.xs == (0, 48)
    st = TileStitcher(grid, (8, 8), 64)
    st.add(grid.origins(), torch.stack([torch.full((8, 8), 1.0), torch.full((8, 8), 3.0)]))
    m = st.anomaly_map(0.0)
    assert m.shape == (64, 112)
    assert np.allclose(m[:, :44], 1.0) and np.allclose(m[:, 52:], 3.0)  # one tile: its own value
    assert np.allclose(m[:, 52:60], 3.0)  # overlap (48..63): the higher view, not an average


def test_the_map_is_not_made_before_every_tile_is_stitched():
    grid = plan_tiles(64, 112, 64, 16)
    st = TileStitcher(grid, (8, 8), 64)
    st.add(grid.origins()[:1], torch.zeros(1, 8, 8))
    with pytest.raises(RuntimeError, match="only 1 of 2 tiles"):
        st.anomaly_map(4.0)


def test_topk_mean_by_rows_equals_the_whole_map_partition():
    m = np.random.default_rng(3).random((700, 300), dtype=np.float32)
    for k in (1, 100, 5000):
        whole = np.partition(m.ravel(), m.size - k)[-k:].mean()
        assert topk_mean(m, k, rows=64) == pytest.approx(float(whole), rel=1e-6)


# -- a tiled detector: fit, inspect, save ------------------------------------------------------
def test_tiled_inspection_maps_have_the_images_own_resolution(tiled_fit):
    det = tiled_fit.detector
    img = texture(np.random.default_rng(5), 150, 230)
    ins = det.inspect([img])[0]
    assert ins.anomaly_map.shape == (150, 230) and ins.anomaly_map.dtype == np.float32
    assert ins.score == pytest.approx(float(ins.anomaly_map.max()))  # max pooling of the stitched map


def test_a_defect_in_one_tile_lights_up_there_and_nowhere_else(tiled_fit):
    det = tiled_fit.detector
    rng = np.random.default_rng(7)
    ok = det.inspect([texture(rng)])[0]
    m = det.inspect([with_defect(texture(rng), 100, 150, side=8)])[0].anomaly_map
    assert m[100:108, 150:158].max() >= 0.9 * m.max() > 2 * ok.score  # the defect is (near) the hottest spot
    # The deep stage sees a whole tile, so the tiles holding the defect glow around it; every
    # pixel more than a tile away stays at the level of an OK part.
    far = np.ones_like(m, bool)
    far[100 - 64 : 108 + 64, 150 - 64 : 158 + 64] = False
    assert m[far].max() <= 1.2 * ok.anomaly_map.max()


def test_fit_records_the_resolved_tiling_and_calibrates_on_stitched_held_out_maps(tiled_fit, ok_paths):
    det = tiled_fit.detector
    assert (det.config.tile, det.config.tile_overlap) == (64, 16)
    assert det.calibration_embeddings is None  # no tile features kept: memory constant in the image size
    cal = inspect_paths(tiled_fit.calibration, det)
    # equal up to float rounding: the backbone may group the tiles into other batches
    np.testing.assert_allclose(det.thresholds.calibration_scores, [r.inspection.score for r in cal], rtol=1e-5)
    assert det.model.n_samples == len(tiled_fit.fitted) * plan_tiles(H, W, 64, 16).n_tiles  # every tile a sample
    assert det.calibration_paths == tuple(tiled_fit.calibration)  # a refit holds them out again


def test_tiling_round_trips_through_the_model_file_and_scores_identically(tiled_fit, tmp_path):
    det = tiled_fit.detector
    path = save_detector(det, tmp_path / "tiled.okng")
    meta, _ = read_model_file(path)
    assert (meta["config"]["tile"], meta["config"]["tile_overlap"]) == (64, 16)
    back = load_detector(path, runtime="torch")
    assert (back.config.tile, back.config.tile_overlap) == (64, 16)
    img = with_defect(texture(np.random.default_rng(9)), 30, 60)
    a, b = det.inspect([img])[0], back.inspect([img])[0]
    assert a.score == pytest.approx(b.score, rel=1e-5) and a.anomaly_map.shape == b.anomaly_map.shape == (H, W)
    assert b.image_threshold == a.image_threshold


def test_a_model_file_written_before_tiling_loads_as_a_whole_image_model(saved_tiny_model, tmp_path):
    meta, tensors = read_model_file(saved_tiny_model[0])
    for key in ("tile", "tile_overlap"):
        meta["config"].pop(key, None)
    old = write_model_file(tmp_path / "old.okng", tensors, meta)
    det = load_detector(old, runtime="torch")
    assert det.config.tile is None and not det.config.tiled
    assert det.inspect([saved_tiny_model[1]])[0].anomaly_map.shape == (64, 64)


def test_a_model_file_with_unresolved_auto_tiling_is_refused(saved_tiny_model, tmp_path):
    from core.errors import ModelFileError

    meta, tensors = read_model_file(saved_tiny_model[0])
    meta["config"]["tile"] = "auto"
    forged = write_model_file(tmp_path / "auto.okng", tensors, meta)
    with pytest.raises(ModelFileError, match="tiling is not a fitted one"):
        load_detector(forged, runtime="torch")


def test_auto_tiles_at_the_network_size_only_when_the_images_are_twice_as_large():
    cfg = DetectorConfig(image_size=64, tile="auto")
    assert cfg.resolve_tiling(160, 224).tile == 64 and cfg.resolve_tiling(160, 224).tile_overlap == 8
    assert cfg.resolve_tiling(100, 224).tile is None  # shorter side under 2 x 64: whole image
    assert DetectorConfig(image_size=64, tile=96).resolve_tiling(160, 224).tile_overlap == 12


def test_a_fit_whose_tiles_are_larger_than_the_images_is_refused_before_the_backbone(ok_paths):
    cfg = DetectorConfig(**{**TILED, "tile": 200})
    gen = fit_job(ok_paths, cfg, CancelToken())
    with pytest.raises(TilingError, match="smaller than the model's 200-pixel tiles"):
        next(gen)


def test_inspection_skips_an_image_smaller_than_a_tile_and_goes_on(tiled_fit, tmp_path):
    small, big = tmp_path / "small.png", tmp_path / "big.png"
    cv2.imwrite(str(small), texture(np.random.default_rng(1), 40, 40))
    cv2.imwrite(str(big), texture(np.random.default_rng(2)))
    items = inspect_paths([str(small), str(big)], tiled_fit.detector)
    assert isinstance(items[0], Skipped) and "smaller than the model's 64-pixel tiles" in items[0].reason
    assert isinstance(items[1], ScoredImage) and items[1].inspection.anomaly_map.shape == (H, W)


# -- memory: features for one batch of tiles at a time ----------------------------------------
def test_fit_and_inspection_never_hold_features_of_more_than_one_batch_of_tiles(ok_paths, tiled_fit, monkeypatch):
    from core.detector import Detector

    sizes = []
    for name in ("embed", "embed_torch"):
        original = getattr(Detector, name)

        def spy(self, images, _original=original):
            out = _original(self, images)
            sizes.append(out.shape[0])
            return out

        monkeypatch.setattr(Detector, name, spy)
    fit = run_job(fit_job(ok_paths[:5], DetectorConfig(**TILED), CancelToken()))
    list(inspect_job(ok_paths[5:], fit.detector, CancelToken()))
    per_image = plan_tiles(H, W, 64, 16).n_tiles
    assert sum(sizes) == 6 * per_image  # every tile of every image went through the backbone...
    assert max(sizes) <= TILED["batch_size"]  # ...never more than one batch of them at once


def test_a_tiled_fit_cancels_within_one_batch_of_tiles(ok_paths):
    token = CancelToken()
    gen = fit_job(ok_paths, DetectorConfig(**TILED), token)
    next(gen)  # loading the backbone
    token.cancel()
    from core.errors import Cancelled

    with pytest.raises(Cancelled):
        next(gen)


# -- the command line ---------------------------------------------------------------------------
def test_okng_fit_tiles_and_score_refuses_another_tiling(ok_paths, tmp_path, capsys):
    out = tmp_path / "t.okng"
    assert main(["fit", *ok_paths, "--out", str(out), "--weights", "random", "--image-size", "64",
                 "--channels", "24", "--tile", "64", "--overlap", "16"]) == 0
    assert load_detector(out, runtime="torch").config.tile == 64
    capsys.readouterr()
    assert main(["score", "--model", str(out), "--runtime", "torch", "--tile", "64", "--overlap", "16",
                 ok_paths[0]]) == 0
    assert main(["score", "--model", str(out), "--runtime", "torch", "--tile", "auto", ok_paths[0]]) == 0
    assert main(["score", "--model", str(out), "--runtime", "torch", "--tile", "128", ok_paths[0]]) == 2
    assert "fitted on tiles of 64 pixels overlapping by 16 and is always scored that way" in capsys.readouterr().err


def test_live_frames_are_inspected_tile_by_tile_too(tiled_fit):
    from core.sources import Frame, live_job

    class TwoFrames:
        finished = False

        def __init__(self):
            self.frames = [Frame(texture(np.random.default_rng(i)), f"camera 0 #{i}", i) for i in range(2)]

        def open(self):
            pass

        def read(self):
            if not self.frames:
                self.finished = True
                return None
            return self.frames.pop(0)

        def close(self):
            pass

    source = TwoFrames()
    source.frames.insert(1, Frame(texture(np.random.default_rng(9))[:40, :40], "camera 0 #thumb", 9))
    items = [p.item for p in live_job(source, lambda: tiled_fit.detector, CancelToken(), keep_embeddings=True)]
    skipped = items.pop(1)  # a frame smaller than a tile is skipped with the reason; the run goes on
    assert skipped.path == "camera 0 #thumb" and "tile" in skipped.reason
    assert [i.inspection.anomaly_map.shape for i in items] == [(H, W), (H, W)]
    assert all(i.embedding is None for i in items)  # no single embedding of a tiled frame


def test_the_job_lets_each_full_resolution_map_go_before_making_the_next(tiled_fit, ok_paths, monkeypatch):
    import gc
    import weakref

    det = tiled_fit.detector
    previous: list[weakref.ref] = []
    alive_at_next_image = []
    original = type(det).stitch

    def stitch(self, image, check_cancel=None):
        gc.collect()
        alive_at_next_image.append([ref() is not None for ref in previous])
        return original(self, image, check_cancel)

    monkeypatch.setattr(type(det), "stitch", stitch)
    gen = inspect_job(ok_paths[:3], det, CancelToken())
    while True:  # a consumer like okng score's: takes what it needs from each item, then lets it go
        try:
            p = next(gen)
        except StopIteration:
            break
        previous.append(weakref.ref(p.item.inspection.anomaly_map))
        p = None
    assert alive_at_next_image == [[], [False], [False, False]]
