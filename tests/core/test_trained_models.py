"""Trained normality models (RIAD, FAVAE, KDAD in the embedding space): what they learn, how
their training is driven (epochs with progress, cancel, early stopping, time budget, never
NaN) and that they save, load and take feedback like every other model."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from core import CancelToken, fit_job, load_detector, run_job, save_detector
from core.detector import Detector, DetectorConfig
from core.errors import Cancelled
from core.models import TRAINED_KINDS, model_class
from core.models import trained as trained_module
from core.models.trained import TrainingDiverged

GRID = (8, 8)
STAGE = [0] * 6 + [1] * 6  # six channels of an earlier stage, six of the last one
ANOMALY = (3, 5)


def related_embeddings(n: int, seed: int) -> torch.Tensor:
    """(n, 12, 8, 8): smooth random fields in the first stage, the last stage a fixed mix of
    them plus a little noise - the kind of structure OK parts have between stages."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 6, 3, 3, generator=g)
    first = torch.nn.functional.interpolate(coarse, size=GRID, mode="bilinear", align_corners=True)
    mix = torch.randn(6, 6, generator=torch.Generator().manual_seed(99)) / math.sqrt(6)
    last = torch.einsum("ij,bjhw->bihw", mix, first) + 0.05 * torch.randn(n, 6, *GRID, generator=g)
    return torch.cat([first, last], dim=1)


def with_anomaly(emb: torch.Tensor) -> torch.Tensor:
    """The same parts with one patch whose last stage no longer follows the first."""
    bad = emb.clone()
    bad[:, 6:, ANOMALY[0], ANOMALY[1]] += torch.tensor([4.5, -4.5, 4.5, -4.5, 4.5, -4.5])
    return bad


def make(kind: str, **params):
    extra = {"channel_stage": STAGE} if kind == "kdad" else {}
    defaults = {"width": 16, "epochs": 40, "patience": 5, "batch": 8, "lr": 3e-3}
    return model_class(kind)(GRID, 12, **{**defaults, **extra, **params})


def trained(kind: str, **params):
    model = make(kind, **params)
    model.partial_fit(related_embeddings(48, seed=1))
    for _ in model.train(related_embeddings(12, seed=2)):
        pass
    return model


@pytest.mark.parametrize("kind", TRAINED_KINDS)
def test_a_trained_model_finds_the_patch_that_breaks_what_it_learnt(kind):
    model = trained(kind)
    ok = related_embeddings(6, seed=3)
    ok_maps, bad_maps = model.score(ok), model.score(with_anomaly(ok))
    assert torch.isfinite(ok_maps).all() and (ok_maps >= 0).all()
    for m in bad_maps:  # the hottest patch of every changed part is the changed one
        assert divmod(int(m.argmax()), GRID[1]) == ANOMALY
    at = bad_maps[:, ANOMALY[0], ANOMALY[1]]
    assert float(at.min()) > 1.5 * float(ok_maps.amax(dim=(1, 2)).max())  # NG at any threshold above the OK parts


@pytest.mark.parametrize("kind", TRAINED_KINDS)
def test_scores_do_not_depend_on_the_batch_or_on_a_second_training(kind):
    first, second = trained(kind), trained(kind)
    parts = related_embeddings(4, seed=4)
    together = first.score(parts)
    torch.testing.assert_close(first.score(parts[2:3]), together[2:3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second.score(parts), together)


def test_training_reports_each_epoch_with_its_losses():
    model = make("favae", epochs=3, patience=100)
    model.partial_fit(related_embeddings(16, seed=1))
    steps = list(model.train(related_embeddings(8, seed=2)))
    assert [(p.done, p.total) for p in steps] == [(1, 3), (2, 3), (3, 3)]
    assert steps[0].message.startswith("training favae: epoch 1/3, held-out loss ")
    assert "(training " in steps[0].message
    assert [h[0] for h in model.history] == [1, 2, 3] and model.stop_reason == "epochs"


class CancelAfter:
    """A cancel token that turns cancelled at its ``n + 1``-th look."""

    def __init__(self, n: int) -> None:
        self.looks, self.n = 0, n

    @property
    def cancelled(self) -> bool:
        self.looks += 1
        return self.looks > self.n


def test_cancel_stops_training_before_the_next_batch():
    model = make("kdad", batch=4)
    model.partial_fit(related_embeddings(40, seed=1))  # 10 batches an epoch
    batches = []
    real_loss = model.loss
    model.loss = lambda x, w, g: batches.append(1) or real_loss(x, w, g)
    with pytest.raises(Cancelled):
        for _ in model.train(None, CancelAfter(3)):
            pass
    assert len(batches) == 3


def test_training_stops_at_the_time_budget_and_keeps_what_it_learnt(monkeypatch):
    now = [0.0]

    def clock():
        now[0] += 0.25  # every look at the clock: a quarter second later
        return now[0]

    monkeypatch.setattr(trained_module, "_clock", clock)
    model = make("kdad", budget=2.0, epochs=1000, batch=4)
    model.partial_fit(related_embeddings(40, seed=1))
    for _ in model.train(related_embeddings(8, seed=2)):
        pass
    assert model.stop_reason == "time budget"
    assert len(model.history) == 1  # the first epoch was cut short, still evaluated
    assert torch.isfinite(model.score(related_embeddings(2, seed=5))).all()


def test_training_does_not_start_an_epoch_the_budget_cannot_hold(monkeypatch):
    now = [0.0]

    def clock():
        now[0] += 0.25
        return now[0]

    monkeypatch.setattr(trained_module, "_clock", clock)
    model = make("kdad", budget=4.0, epochs=1000, batch=4)
    model.partial_fit(related_embeddings(40, seed=1))  # ten batches: about 2.5 s of this clock an epoch
    for _ in model.train(related_embeddings(8, seed=2)):
        pass
    assert model.stop_reason == "time budget"
    assert len(model.history) == 1  # a second epoch would end past 4 s: it is not begun


def test_early_stopping_keeps_the_epoch_that_did_best_on_the_held_out_parts():
    model = make("favae", epochs=500, patience=3)
    held = related_embeddings(8, seed=2)
    model.partial_fit(related_embeddings(48, seed=1))
    for _ in model.train(held):
        pass
    assert model.stop_reason == "early stop"
    held_losses = [h[2] for h in model.history]
    best = int(np.argmin(held_losses))
    assert len(held_losses) - 1 - best == 3  # stopped after `patience` epochs without improvement
    assert model.held_out_loss(held) == pytest.approx(held_losses[best], rel=1e-5)


def test_a_loss_that_turns_nan_lowers_the_rate_and_three_in_a_row_end_the_fit_clearly():
    model = make("riad", epochs=2)
    model.partial_fit(related_embeddings(16, seed=1))
    real_loss, calls = model.loss, []

    def once_nan(x, w, g):
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) == 1 else real_loss(x, w, g)

    model.loss = once_nan
    for _ in model.train():
        pass
    assert torch.isfinite(model.score(related_embeddings(2, seed=5))).all()
    assert model.learning_rate == pytest.approx(model.lr / 2)

    broken = make("riad", epochs=2)
    broken.partial_fit(related_embeddings(16, seed=1))
    tries = []
    broken.loss = lambda x, w, g: tries.append(1) or torch.tensor(float("nan"))
    with pytest.raises(TrainingDiverged, match="lower lr"):
        for _ in broken.train():
            pass
    assert len(tries) == 3  # three in a row: at the learning rate, at half and at a quarter of it


def test_an_ok_region_marked_after_training_is_learnt_by_fine_tuning_without_forgetting_the_rest():
    model = trained("favae", finetune_steps=60)
    ok = related_embeddings(12, seed=9)
    ok_before = float(model.error_distance(ok).mean())
    part = with_anomaly(related_embeddings(1, seed=6))
    before = float(model.score(part)[0, ANOMALY[0], ANOMALY[1]])
    region = torch.zeros((1, *GRID), dtype=torch.bool)
    region[0, ANOMALY[0] - 1 : ANOMALY[0] + 2, ANOMALY[1] - 1 : ANOMALY[1] + 2] = True
    model.partial_fit(part, region)
    model.finalize()
    assert float(model.score(part)[0, ANOMALY[0], ANOMALY[1]]) < 0.5 * before
    assert model.n_samples == 49
    # replayed training parts keep the OK parts' error where it was (on the region alone: +80 %)
    assert float(model.error_distance(ok).mean()) < 1.25 * ok_before


def test_a_score_is_the_error_in_ok_spreads_at_its_position_and_channel_weights_are_refused():
    model = trained("kdad")
    part = with_anomaly(related_embeddings(1, seed=7))
    with torch.inference_mode():
        errors = model.errors(model.standardise(part))[0]  # the last stage's six channels
    distance = errors.sum(0).sqrt()
    torch.testing.assert_close(model.error_distance(part)[0], distance)
    z = ((distance - model.position_mean) / model.position_std).clamp_min(0.0)
    torch.testing.assert_close(model.score(part)[0], z)
    with pytest.raises(ValueError, match="does not learn channel weights"):
        model.set_channel_weights(torch.ones(12))
    # each position's spread is blended with the median one: none is less than half of it
    spread = model.position_std**2
    assert float(spread.min()) >= 0.5 * float(spread.median()) * (1 - 1e-5)


def test_the_network_sees_each_channel_standardised_on_the_ok_parts():
    model = make("favae", epochs=1)
    data = related_embeddings(48, seed=1) * torch.linspace(0.5, 20.0, 12).view(1, -1, 1, 1) + 3.0
    model.partial_fit(data)
    for _ in model.train():
        pass
    torch.testing.assert_close(model.mean, data.to(torch.float16).float().mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.std, data.to(torch.float16).float().std((0, 2, 3), correction=0),
                               rtol=1e-3, atol=1e-4)


def test_a_position_where_ok_parts_are_always_rough_does_not_outshine_a_real_anomaly():
    def rough_corner(emb):
        g = torch.Generator().manual_seed(int(emb.shape[0]))
        emb[:, 6:, 0, 0] += 4.0 * torch.randn(emb.shape[0], 6, generator=g)  # unpredictable on every OK part
        return emb

    model = make("kdad")
    model.partial_fit(rough_corner(related_embeddings(48, seed=1)))
    for _ in model.train(rough_corner(related_embeddings(12, seed=2))):
        pass
    parts = with_anomaly(rough_corner(related_embeddings(6, seed=3)))
    raw, scored = model.error_distance(parts), model.score(parts)
    corner, anomaly = (0, 0), ANOMALY
    assert any(divmod(int(m.argmax()), GRID[1]) == corner for m in raw)  # the raw error alone is fooled
    for m in scored:  # in OK spreads per position, the real anomaly is the hottest patch
        assert divmod(int(m.argmax()), GRID[1]) == anomaly


def test_kdad_needs_two_stages_and_trained_models_refuse_tiles():
    with pytest.raises(ValueError, match="at least two backbone stages"):
        model_class("kdad")(GRID, 4, channel_stage=[1, 1, 1, 1])
    with pytest.raises(ValueError, match="use padim for high-resolution parts"):
        DetectorConfig(model="riad", tile=512)


@pytest.mark.parametrize("kind", TRAINED_KINDS)
def test_a_fit_trains_with_progress_and_the_saved_model_scores_the_same(kind, part_images, tmp_path, cache):
    ok, ng = part_images
    cfg = DetectorConfig.for_model(kind, weights="random", image_size=64, n_channels=24, batch_size=4,
                                   model_params={"epochs": 2, "width": 8})
    messages = []
    result = run_job(fit_job(ok, cfg, CancelToken()), lambda p: messages.append(p.message))
    assert f"training {kind}: epoch 2/2" in " ".join(messages)
    det = result.detector
    assert det.thresholds is not None and math.isfinite(det.thresholds.image)
    path = save_detector(det, tmp_path / f"{kind}.okng")
    again = load_detector(path, det.extractor)
    assert isinstance(again, Detector) and again.config.model == kind
    from core.imageio import load_image

    images = [load_image(p) for p in ng]
    assert [r.score for r in again.inspect(images)] == pytest.approx([r.score for r in det.inspect(images)],
                                                                       rel=1e-5)


@pytest.mark.parametrize("generalise", [True, False], ids=["feedback memory", "fine-tuned network"])
def test_a_false_alarm_click_lowers_a_trained_models_score_there(generalise, part_images, cache):
    from core.feedback import FeedbackLearner
    from core.imageio import load_image

    ok, ng = part_images
    cfg = DetectorConfig.for_model("favae", weights="random", image_size=64, n_channels=24, batch_size=4,
                                   model_params={"epochs": 8, "width": 8, "finetune_steps": 80})
    det = run_job(fit_job(ok, cfg, CancelToken())).detector
    img = load_image(ng[0])
    score = det.inspect([img])[0].score
    det.thresholds = replace(det.thresholds, image=0.9 * score, pixel=0.9 * score)  # the part is NG
    before = det.inspect([img])[0]
    assert before.verdict == "NG"
    learner = FeedbackLearner(det, reweight=True, generalise=generalise)
    rec = learner.mark_false_alarm(img, before.anomaly_map > 0.5 * before.peak)
    assert rec.score_after < 0.9 * score  # judged OK now
    assert learner.detector.inspect([img])[0].verdict == "OK"
    assert det.inspect([img])[0].score == before.score  # the fitted detector is a snapshot, untouched


def test_the_station_says_a_trained_model_learns_no_channel_weights(part_images, tmp_path, cache):
    from core.jobs import InlineExecutor
    from core.session import InspectionSession

    ok, _ = part_images
    s = InspectionSession(InlineExecutor(), labels_dir=tmp_path / "labels", captures_dir=tmp_path / "captures")
    errors, shown = [], []
    s.error.connect(errors.append)
    s.new_recipe("parts", DetectorConfig.for_model("kdad", weights="random", image_size=64, n_channels=24,
                                                   batch_size=4, model_params={"epochs": 2, "width": 8}), ok)
    s.start_fit()
    assert s.detector is not None and s.detector.config.model == "kdad"
    s.labels.reweight_changed.connect(shown.append)
    s.labels.set_reweight(True)
    assert not s.labels.reweight and shown == [False]
    assert "does not learn channel weights" in errors[-1]
