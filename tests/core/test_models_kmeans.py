"""Per-patch k-means mixture against a numpy reference (np.linalg.inv per component)."""
import numpy as np
import pytest
import torch

from core import CancelToken, fit_job, load_detector, run_job, save_detector
from core.models.base import local_features
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


@pytest.mark.parametrize("params", [{}, {"tied": 1, "neighbourhood": 3}])
def test_save_load_round_trip_gives_identical_scores(tiny_config, part_images, tmp_path, params):
    ok, ng = part_images
    det = run_job(fit_job(ok, tiny_config.with_(model="padim-kmeans", model_params=params), CancelToken())).detector
    back = load_detector(save_detector(det, tmp_path / "m.okng"))
    assert back.model.params() == det.model.params() and back.model.tied == params.get("tied", 0)
    from core.imageio import load_image
    imgs = [load_image(p) for p in ng + ok[:2]]
    emb = det.embed(imgs)
    torch.testing.assert_close(back.model.score(emb), det.model.score(emb), rtol=0, atol=0)
    assert [r.score for r in back.inspect(imgs)] == [r.score for r in det.inspect(imgs)]
    with pytest.raises(ValueError):
        KMeansPadimModel((2, 2), 3, components=0)


@pytest.mark.parametrize("tied", [0, 1])
def test_feedback_refreshes_only_touched_components_and_equals_a_fresh_derivation(tied):
    """A feedback sample joins one component; its own precision is recomputed, or with
    ``tied=1`` the shared precision of every component at that position."""
    rng = np.random.default_rng(5)
    train, _ = clustered(rng)
    model = KMeansPadimModel((2, 3), 4, tied=tied)
    model.partial_fit(torch.from_numpy(train))
    model.finalize()
    untouched = model._precisions.clone()
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    mask[0, 0, 1] = True
    model.partial_fit(torch.from_numpy(train[7:8] + 0.3), mask)
    probe = torch.from_numpy(train[:3] + 0.7)
    got = model.score(probe)
    changed = (model._precisions != untouched).any(-1)  # (components, patches)
    # patch (0, 1) is patch 1: one component of it, or all three when tied
    assert int(changed.sum()) == (3 if tied else 1) and int(changed[:, 1].sum()) == (3 if tied else 1)
    fresh = KMeansPadimModel((2, 3), 4, tied=tied)
    fresh.load_tensors(model.tensors())
    torch.testing.assert_close(fresh.score(probe), got)
    clone = model.copy()
    torch.testing.assert_close(clone.score(probe), got)


def tied_reference(train, labels, test, eps=EPS):
    """Min over true clusters of the Mahalanobis distance under one covariance per patch:
    every sample's offset from its own cluster's mean, pooled, over N - (clusters used)."""
    n, c, h, w = train.shape
    out = np.full((test.shape[0], h, w), np.inf)
    for i in range(h):
        for j in range(w):
            x, lab = train[:, :, i, j].astype(np.float64), labels[:, i, j]
            means = {k: x[lab == k].mean(0) for k in np.unique(lab)}
            resid = x - np.stack([means[k] for k in lab])
            inv = np.linalg.inv(resid.T @ resid / (n - len(means)) + eps * np.eye(c))
            for b in range(test.shape[0]):
                out[b, i, j] = min(np.sqrt((test[b, :, i, j] - mu) @ inv @ (test[b, :, i, j] - mu))
                                   for mu in means.values())
    return out


def test_tied_components_share_one_covariance_pooled_over_all_samples():
    """With fewer samples per component than channels each component's own covariance is
    mostly epsilon; ``tied=1`` estimates one per position from every sample (a mixture with
    tied covariance)."""
    rng = np.random.default_rng(6)
    train, labels = clustered(rng)
    test = train[:6] + rng.normal(0, 2, train[:6].shape).astype(np.float32)
    model = KMeansPadimModel((2, 3), 4, components=3, epsilon=EPS, tied=1)
    model.partial_fit(torch.from_numpy(train))
    got = model.score(torch.from_numpy(test)).numpy()
    np.testing.assert_allclose(got, tied_reference(train, labels, test), rtol=1e-3)
    assert not np.allclose(got, reference(train, labels, test), rtol=1e-2)
    assert torch.equal(model._precisions[0], model._precisions[2])


def test_neighbourhood_averages_patches_first_as_padim_does():
    rng = np.random.default_rng(8)
    train = torch.from_numpy(rng.normal(0, 1, (30, 5, 4, 4)).astype(np.float32))
    probe = torch.from_numpy(rng.normal(0, 1, (3, 5, 4, 4)).astype(np.float32))
    for tied in (0, 1):
        mix = KMeansPadimModel((4, 4), 5, components=1, neighbourhood=3, tied=tied)
        mix.partial_fit(train)
        padim = PadimModel((4, 4), 5, neighbourhood=3)
        padim.partial_fit(train)
        torch.testing.assert_close(mix.score(probe), padim.score(probe), rtol=1e-4, atol=1e-4)
    # with several components too: the plain mixture on averaged features, fit and feedback
    three = KMeansPadimModel((4, 4), 5, components=3, neighbourhood=3, tied=1)
    on_means = KMeansPadimModel((4, 4), 5, components=3, tied=1)
    for model, data in ((three, train), (on_means, local_features(train, 3))):
        model.partial_fit(data[:25])
        model.finalize()
        model.partial_fit(data[25:], torch.rand(5, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5)
    torch.testing.assert_close(three.score(probe), on_means.score(local_features(probe, 3)))
    plain = KMeansPadimModel((4, 4), 5, components=1)
    plain.partial_fit(train)
    assert not torch.allclose(plain.score(probe), mix.score(probe), rtol=1e-2)
    for bad in ({"tied": 2}, {"neighbourhood": 2}):
        with pytest.raises(ValueError):
            KMeansPadimModel((4, 4), 5, **bad)

