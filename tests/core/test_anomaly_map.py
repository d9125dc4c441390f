"""From patch distances to anomaly maps and image scores (max, top-k, blob pooling)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.anomaly_map import PostProcess, blob_score


def test_maps_without_blur_are_the_bilinear_upsampling_of_the_patch_distances():
    d = torch.rand(3, 28, 28) * 10
    want = F.interpolate(d[:, None], size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    got = PostProcess(sigma=0).maps(d, 224)
    assert got.shape == (3, 224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_blur_keeps_a_flat_map_flat_and_spreads_a_spike_symmetrically():
    flat = PostProcess(sigma=4).maps(torch.full((1, 8, 8), 2.5), 64)
    np.testing.assert_allclose(flat, 2.5, rtol=1e-6)
    spike = torch.zeros(1, 8, 8)
    spike[0, 4, 4] = 1.0
    sharp = PostProcess(sigma=0).maps(spike, 64)[0]
    smooth = PostProcess(sigma=4).maps(spike, 64)[0]
    assert smooth.max() < sharp.max()
    peak = np.unravel_index(np.argmax(smooth), smooth.shape)
    assert peak == np.unravel_index(np.argmax(sharp), sharp.shape)
    np.testing.assert_allclose(smooth, smooth.T, atol=1e-6)  # isotropic
    assert smooth.sum() == pytest.approx(sharp.sum(), rel=1e-3)  # mass kept away from borders


def test_max_and_topk_pooling():
    maps = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    assert PostProcess(pooling="max").scores(maps).tolist() == pytest.approx(maps.reshape(2, -1).max(1))
    top = np.sort(maps.reshape(2, -1), axis=1)[:, -10:].mean(1)
    assert PostProcess(pooling="topk", topk=10).scores(maps) == pytest.approx(top)
    # k beyond the pixel count: the mean of all pixels
    assert PostProcess(pooling="topk", topk=10**6).scores(maps) == pytest.approx(maps.reshape(2, -1).mean(1))


def test_blob_pooling_ranks_a_large_faint_defect_above_a_single_hot_pixel():
    faint = np.zeros((64, 64), np.float32)
    faint[10:30, 10:30] = 2.0  # 400 px at 2.0
    hot = np.zeros((64, 64), np.float32)
    hot[5, 5] = 50.0
    assert blob_score(faint, level=1.0) == pytest.approx(800.0)
    assert blob_score(hot, level=1.0) == pytest.approx(50.0)
    post = PostProcess(pooling="blob", blob_level=1.0)
    s_faint, s_hot = post.scores(np.stack([faint, hot]))
    assert s_faint > s_hot and PostProcess(pooling="max").scores(np.stack([faint, hot])).argmax() == 1


def test_blob_pooling_without_a_region_scores_below_any_region_and_keeps_the_ranking():
    low, lower = np.full((8, 8), 0.5, np.float32), np.full((8, 8), 0.2, np.float32)
    region = np.zeros((8, 8), np.float32)
    region[0, 0] = 1.01
    s = PostProcess(pooling="blob", blob_level=1.0).scores(np.stack([low, lower, region]))
    assert s[2] > s[0] > s[1] > 0


def test_blob_pooling_before_calibration_falls_back_to_max():
    maps = np.random.default_rng(1).random((2, 8, 8)).astype(np.float32)
    got = PostProcess(pooling="blob").scores(maps, pixel_threshold=None)
    np.testing.assert_allclose(got, maps.reshape(2, -1).max(1))


@pytest.mark.parametrize("kwargs", [{"pooling": "mean"}, {"sigma": -1}, {"topk": 0}])
def test_invalid_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PostProcess(**kwargs)
