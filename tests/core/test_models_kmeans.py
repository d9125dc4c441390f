"""Per-patch k-means mixture against a numpy reference (np.linalg.inv per component)."""
import numpy as np
import pytest
import torch

from core import CancelToken, fit_job, load_detector, run_job, save_detector
from core.models.mixture import KMeansPadimModel
from core.models.padim import PadimModel

EPS = 0.01


def clustered(rng, n_per=15, c=4, grid=(2, 3)):
    """Three well separated OK modes per patch; returns (samples (N, C, h, w), labels (N, h, w))."""
    h, w = grid
    centres = rng.normal(0, 20, (3, c, h, w))
    labels = rng.integers(0, 3, (3 * n_per, h, w))
    labels[:3] = np.arange(3)[:, None, None]  # every mode present at every patch
    x = np.take_along_axis(centres[None], labels[:, None, None], axis=1)[:, 0] + rng.normal(0, 1, (3 * n_per, c, h, w))
    return x.astype(np.float32), labels


def reference(train, labels, test, eps=EPS):
    """Min over true clusters of the Mahalanobis distance, explicit loops and np.linalg.inv."""
    n, c, h, w = train.shape
    out = np.full((test.shape[0], h, w), np.inf)
    for i in range(h):
        for j in range(w):
            for k in range(3):
                x = train[labels[:, i, j] == k, :, i, j].astype(np.float64)
                mu = x.mean(0)
                cov = (np.cov(x.T) if len(x) > 1 else np.zeros((c, c))) + eps * np.eye(c)
                inv = np.linalg.inv(cov)
                for b in range(test.shape[0]):
                    d = test[b, :, i, j] - mu
                    out[b, i, j] = min(out[b, i, j], np.sqrt(d @ inv @ d))
    return out


def test_scores_match_reference_on_well_separated_modes():
    rng = np.random.default_rng(0)
    train, labels = clustered(rng)
    test = train[:6] + rng.normal(0, 2, train[:6].shape).astype(np.float32)
    model = KMeansPadimModel((2, 3), 4, components=3, epsilon=EPS)
    model.partial_fit(torch.from_numpy(train[:20]))
    model.partial_fit(torch.from_numpy(train[20:]))
    assert model.n_samples == len(train)
    model.finalize()
    assert model.n_samples == len(train)
    got = model.score(torch.from_numpy(test)).numpy()
    np.testing.assert_allclose(got, reference(train, labels, test), rtol=1e-3)
    # a single Gaussian is much wider: the mixture scores a point between two modes far higher
    padim = PadimModel((2, 3), 4, EPS)
    padim.partial_fit(torch.from_numpy(train))
    between = torch.from_numpy(train[:2].mean(0, keepdims=True))
    assert (model.score(between) > 3 * padim.score(between)).all()


def test_one_component_is_padim():
    rng = np.random.default_rng(1)
    train = torch.from_numpy(rng.normal(0, 1, (25, 5, 2, 2)).astype(np.float32))
    probe = torch.from_numpy(rng.normal(0, 1, (3, 5, 2, 2)).astype(np.float32))
    mix = KMeansPadimModel((2, 2), 5, components=1)
    mix.partial_fit(train)
    padim = PadimModel((2, 2), 5)
    padim.partial_fit(train)
    torch.testing.assert_close(mix.score(probe), padim.score(probe), rtol=1e-4, atol=1e-4)


def test_feedback_after_finalize_joins_the_nearest_component_only_where_marked():
    rng = np.random.default_rng(2)
    train, labels = clustered(rng)
    model = KMeansPadimModel((2, 3), 4, components=3, epsilon=EPS)
    model.partial_fit(torch.from_numpy(train))
    model.finalize()
    new = train[5:6] + rng.normal(0, 1, train[5:6].shape).astype(np.float32)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, 1, 2] = True
    model.partial_fit(torch.from_numpy(new), mask)
    model.finalize()
    probe = train[:4] + 0.5
    got = model.score(torch.from_numpy(probe)).numpy()
    # reference: the new sample added to its true mode at patch (1, 2) only
    train2 = np.concatenate([train, new])
    labels2 = np.concatenate([labels, labels[5:6]])
    ref_all = reference(train2, labels2, probe)
    ref_old = reference(train, labels, probe)
    np.testing.assert_allclose(got[:, 1, 2], ref_all[:, 1, 2], rtol=1e-3)
    np.testing.assert_allclose(got[:, :1], ref_old[:, :1], rtol=1e-3)
    assert not np.allclose(ref_all[:, 1, 2], ref_old[:, 1, 2])
    counts = model.stats.count.view(2, 3, 3).sum(2)
    assert counts[1, 2] == len(train) + 1 and counts[0, 0] == len(train)


def test_fewer_samples_than_components_still_scores():
    rng = np.random.default_rng(3)
    model = KMeansPadimModel((2, 2), 3, components=4)
    model.partial_fit(torch.from_numpy(rng.normal(0, 1, (2, 3, 2, 2)).astype(np.float32)))
    d = model.score(torch.zeros(1, 3, 2, 2))
    assert torch.isfinite(d).all() and (d >= 0).all()
    assert int(model._valids.sum(1).max()) <= 2


def test_channel_weights_of_one_change_nothing():
    rng = np.random.default_rng(4)
    train, _ = clustered(rng)
    model = KMeansPadimModel((2, 3), 4)
    model.partial_fit(torch.from_numpy(train))
    probe = torch.from_numpy(train[:3] + 1.0)
    base = model.score(probe)
    model.set_channel_weights(torch.ones(4))
    torch.testing.assert_close(model.score(probe), base)


def test_save_load_round_trip_gives_identical_scores(tiny_config, part_images, tmp_path):
    ok, ng = part_images
    det = run_job(fit_job(ok, tiny_config.with_(model="padim-kmeans"), CancelToken())).detector
    back = load_detector(save_detector(det, tmp_path / "m.okng"))
    from core.imageio import load_image
    imgs = [load_image(p) for p in ng + ok[:2]]
    emb = det.embed(imgs)
    torch.testing.assert_close(back.model.score(emb), det.model.score(emb), rtol=0, atol=0)
    assert [r.score for r in back.inspect(imgs)] == [r.score for r in det.inspect(imgs)]
    with pytest.raises(ValueError):
        KMeansPadimModel((2, 2), 3, components=0)


def test_feedback_refreshes_only_touched_components_and_equals_a_fresh_derivation():
    rng = np.random.default_rng(5)
    train, _ = clustered(rng)
    model = KMeansPadimModel((2, 3), 4)
    model.partial_fit(torch.from_numpy(train))
    model.finalize()
    untouched = model._precisions.clone()
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, 0, 1] = True
    model.partial_fit(torch.from_numpy(train[7:8] + 0.3), mask)
    probe = torch.from_numpy(train[:3] + 0.7)
    got = model.score(probe)
    changed = (model._precisions != untouched).any(-1)  # (components, patches)
    assert int(changed.sum()) == 1 and bool(changed[:, 1].any())  # patch (0, 1) is patch 1
    fresh = KMeansPadimModel((2, 3), 4)
    fresh.load_tensors(model.tensors())
    torch.testing.assert_close(fresh.score(probe), got)
    clone = model.copy()
    torch.testing.assert_close(clone.score(probe), got)
