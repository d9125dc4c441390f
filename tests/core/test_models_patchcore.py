"""PatchCore against brute-force loops: 3x3 pooling, k-center greedy, nearest neighbour."""
import numpy as np
import pytest
import torch

from core import CancelToken, fit_job, load_detector, run_job, save_detector
from core.models.patchcore import PatchcoreModel, kcenter_greedy


def pooled_reference(emb: np.ndarray) -> np.ndarray:
    """(B, C, h, w) -> (B*h*w, C): mean over the existing 3x3 neighbours, explicit loops."""
    b, c, h, w = emb.shape
    out = []
    for n in range(b):
        for i in range(h):
            for j in range(w):
                acc, k = np.zeros(c), 0
                for di in (-1, 0, 1):
                    for dj in (-1, 0, 1):
                        if 0 <= i + di < h and 0 <= j + dj < w:
                            acc += emb[n, :, i + di, j + dj]
                            k += 1
                out.append(acc / k)
    return np.array(out)


def nn_reference(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    out = np.empty(len(queries))
    for q in range(len(queries)):
        out[q] = min(np.sqrt(((queries[q] - m) ** 2).sum()) for m in bank)
    return out


def greedy_reference(x: np.ndarray, n_pick: int, start: int) -> list[int]:
    picked = [start]
    while len(picked) < n_pick:
        best, best_d = -1, -1.0
        for i in range(len(x)):
            d = min(((x[i] - x[p]) ** 2).sum() for p in picked)
            if d > best_d:
                best, best_d = i, d
        picked.append(best)
    return picked


def test_full_bank_scores_match_brute_force_pooling_and_nearest_neighbour():
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, (6, 5, 4, 3)).astype(np.float32)
    test = rng.normal(0, 1.5, (2, 5, 4, 3)).astype(np.float32)
    model = PatchcoreModel((4, 3), 5, coreset_ratio=1.0)
    model.partial_fit(torch.from_numpy(train[:4]))
    model.partial_fit(torch.from_numpy(train[4:]))
    model.finalize()
    got = model.score(torch.from_numpy(test)).numpy()
    ref = nn_reference(pooled_reference(test.astype(np.float64)), pooled_reference(train.astype(np.float64)))
    np.testing.assert_allclose(got.reshape(-1), ref, rtol=1e-4, atol=1e-5)
    assert model.bank.shape == (6 * 12, 5)


def test_kcenter_greedy_picks_the_same_rows_as_the_plain_algorithm():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(c, 1, (40, 6)) for c in (0, 5, -5)]).astype(np.float32)
    got = kcenter_greedy(torch.from_numpy(x), 25, seed=3).tolist()
    assert got == greedy_reference(x.astype(np.float64), 25, got[0])
    assert len(set(got)) == 25


def test_coreset_keeps_the_ratio_and_only_training_patches():
    rng = np.random.default_rng(2)
    train = torch.from_numpy(rng.normal(0, 1, (10, 4, 5, 5)).astype(np.float32))
    model = PatchcoreModel((5, 5), 4, coreset_ratio=0.2)
    model.partial_fit(train)
    model.finalize()
    assert model.bank.shape == (50, 4) and not model._pending
    full = torch.from_numpy(pooled_reference(train.numpy().astype(np.float64))).float()
    gap = (model.bank[:, None, :] - full[None]).norm(dim=2).min(1).values
    assert gap.max() < 1e-5


def test_projection_is_used_for_wide_embeddings_and_scores_stay_exact():
    rng = np.random.default_rng(3)
    train = torch.from_numpy(rng.normal(0, 1, (4, 12, 3, 3)).astype(np.float32))
    model = PatchcoreModel((3, 3), 12, coreset_ratio=0.5, projection_dim=4)
    model.partial_fit(train)
    probe = train[:1] + 0.0
    d = model.score(probe).numpy().reshape(-1)
    ref = nn_reference(pooled_reference(probe.numpy().astype(np.float64)), model.bank.numpy().astype(np.float64))
    np.testing.assert_allclose(d, ref, rtol=1e-4, atol=1e-5)


def test_feedback_after_finalize_appends_the_marked_patches_to_the_bank():
    rng = np.random.default_rng(4)
    model = PatchcoreModel((3, 3), 4, coreset_ratio=0.3)
    model.partial_fit(torch.from_numpy(rng.normal(0, 1, (8, 4, 3, 3)).astype(np.float32)))
    model.finalize()
    n0 = model.bank.shape[0]
    odd = torch.full((1, 4, 3, 3), 9.0)
    before = model.score(odd)
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, 1, 1] = True
    model.partial_fit(odd, mask)
    model.finalize()  # no re-subsampling
    assert model.bank.shape[0] == n0 + 1 and model.n_samples == 9
    after = model.score(odd)
    assert float(after[0, 1, 1]) < 1e-4 < float(before[0, 1, 1])


def test_channel_weights_of_one_change_nothing_and_zero_weights_remove_a_channel():
    rng = np.random.default_rng(5)
    model = PatchcoreModel((2, 2), 3, coreset_ratio=1.0)
    model.partial_fit(torch.from_numpy(rng.normal(0, 1, (5, 3, 2, 2)).astype(np.float32)))
    probe = torch.zeros(1, 3, 2, 2)
    probe[:, 2] = 50.0
    base = model.score(probe)
    model.set_channel_weights(torch.ones(3))
    torch.testing.assert_close(model.score(probe), base)
    model.set_channel_weights(torch.tensor([1.0, 1.0, 0.0]))
    assert float(model.score(probe).max()) < float(base.min()) / 10


def test_reweighted_image_score_is_finite_and_ranks_a_far_image_higher():
    rng = np.random.default_rng(6)
    model = PatchcoreModel((3, 3), 4, coreset_ratio=0.5)
    model.partial_fit(torch.from_numpy(rng.normal(0, 1, (6, 4, 3, 3)).astype(np.float32)))
    near = torch.from_numpy(rng.normal(0, 1, (1, 4, 3, 3)).astype(np.float32))
    s = model.image_scores(torch.cat([near, near + 8.0]), num_neighbors=3)
    assert s.shape == (2,) and torch.isfinite(s).all() and s[1] > s[0] >= 0


def test_save_load_round_trip_gives_identical_scores(tiny_config, part_images, tmp_path):
    ok, ng = part_images
    det = run_job(fit_job(ok, tiny_config.with_(model="patchcore"), CancelToken())).detector
    back = load_detector(save_detector(det, tmp_path / "m.okng"))
    from core.imageio import load_image
    imgs = [load_image(p) for p in ng + ok[:2]]
    emb = det.embed(imgs)
    torch.testing.assert_close(back.model.score(emb), det.model.score(emb), rtol=0, atol=0)
    assert [r.score for r in back.inspect(imgs)] == [r.score for r in det.inspect(imgs)]
    assert back.model.bank.shape == det.model.bank.shape and back.model.n_samples == det.model.n_samples
    with pytest.raises(ValueError):
        PatchcoreModel((2, 2), 3, coreset_ratio=0.0)


def test_each_stage_is_pooled_over_the_same_image_area():
    """A stage at twice the stride is pooled 5x5 on the fine grid (3x3 of its own cells)."""
    import torch

    from core.models.patchcore import PatchcoreModel, local_features

    emb = torch.randn(1, 4, 9, 9, generator=torch.Generator().manual_seed(0))
    model = PatchcoreModel((9, 9), 4, channel_stage=[0, 0, 1, 1], stage_strides=[1, 2])
    got = model._features(emb)
    torch.testing.assert_close(got[:, :2], local_features(emb[:, :2], 3))
    torch.testing.assert_close(got[:, 2:], local_features(emb[:, 2:], 5))
    assert model.params()["stage_strides"] == [1, 2]
