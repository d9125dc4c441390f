"""Model files, specified where mutation testing found them unspecified (issue 18): what a
refusal says, the backbone's normalisation on record, the applied labels of a file that has
none or damaged ones; (round 6) a feedback memory's bad channel groups and off-grid positions,
calibration embeddings of the wrong shape, the damaged list of applied labels named exactly."""
from __future__ import annotations

import json

import pytest
import torch

from core import load_detector
from tests.core.test_reliability_persistence import _edit_meta, _refused, _split


@pytest.fixture
def path(saved_tiny_model, tmp_path):
    p = tmp_path / "m.okng"
    p.write_bytes(saved_tiny_model[0].read_bytes())
    return p


def _meta(path) -> dict:
    header, _ = _split(path.read_bytes())
    return json.loads(header["__metadata__"]["okng"])


def test_the_file_records_the_backbones_input_normalisation(path):
    ex = load_detector(path).extractor
    assert _meta(path)["backbone"]["norm_mean"] == list(ex.norm_mean)
    assert _meta(path)["backbone"]["norm_std"] == list(ex.norm_std)


def test_damaged_thresholds_are_refused_as_such(path):
    _edit_meta(path, lambda m: m["thresholds"].update(image="high"))
    assert _refused(path) == f"{path}: thresholds invalid"


def test_a_setting_of_the_wrong_type_is_named_with_the_type_found(path):
    _edit_meta(path, lambda m: m["config"].update(n_channels="24"))
    message = _refused(path)
    assert "'n_channels' has the wrong type (str)" in message


@pytest.mark.parametrize("change", [lambda m: m.pop("feedback"), lambda m: m["feedback"].pop("applied_labels")],
                         ids=["no-feedback-entry", "no-applied-labels"])
def test_a_file_without_applied_labels_loads_with_none(path, change):
    _edit_meta(path, change)
    assert load_detector(path).applied_labels == ()


def test_applied_label_ids_are_integers_not_booleans(path):
    _edit_meta(path, lambda m: m["feedback"].update(applied_labels=[3, 7]))
    assert load_detector(path).applied_labels == (3, 7)
    _edit_meta(path, lambda m: m["feedback"].update(applied_labels=[3, True]))
    _refused(path, "applied labels is damaged")


def test_damaged_feedback_memory_settings_are_refused_as_such(path):
    _edit_meta(path, lambda m: m.update(feedback_memory=[1, 2]))
    assert _refused(path) == f"{path}: feedback memory settings invalid"



def test_a_feedback_memory_with_bad_channel_groups_or_positions_off_the_grid_is_refused_as_such(tmp_path):
    import numpy as np

    from core import ModelFileError
    from core.detector import Detector, DetectorConfig
    from core.feedback import FeedbackLearner
    from core.persistence import read_model_file, save_detector, write_model_file
    from tests.core.test_feedback_memory import C, SIZE, _background, _pattern, _region, _with

    det = Detector.create(DetectorConfig(weights="random", image_size=SIZE, n_channels=C))  # as the memory's tests
    rng = np.random.default_rng(0)
    det.model.partial_fit(_background(rng, 200))
    det.finalize()
    det.calibrate_on(_background(rng, 40))
    learner = FeedbackLearner(det)
    learner.mark_false_alarm(_with(_background(rng, 1), _pattern(rng), 2, 2, rng), _region(2, 2))
    saved = save_detector(learner.detector, tmp_path / "m.okng")

    def refusal(change):
        meta, tensors = read_model_file(saved)
        change(meta, tensors)
        p = tmp_path / "damaged.okng"
        write_model_file(p, tensors, meta)
        with pytest.raises(ModelFileError) as info:
            load_detector(p, extractor=det.extractor)
        return str(info.value).replace(str(p), "<file>")

    def groups(meta, tensors):
        meta["feedback_memory"]["channel_groups"] = [0, 64]

    def off_grid(meta, tensors):
        pos = tensors["feedback_memory.pos"].clone()
        pos[0, 0] = det.model.grid[0]
        tensors["feedback_memory.pos"] = pos

    def click_numbers(value, n_clicks=None):
        def change(meta, tensors):
            click = tensors["feedback_memory.click"].clone()
            click[0] = value
            tensors["feedback_memory.click"] = click
            if n_clicks is not None:
                tensors["feedback_memory.n_clicks"] = torch.tensor([n_clicks], dtype=torch.int64)
        return change

    assert refusal(groups) == "<file>: feedback memory channel groups invalid"
    assert refusal(off_grid) == "<file>: feedback memory positions lie off the grid"
    # a click number outside 0 .. n_clicks - 1 (outlines group blocks by click: a negative one
    # made every matching image fail, a huge one a huge allocation)
    for change in (click_numbers(-1), click_numbers(1), click_numbers(10**12), click_numbers(0, n_clicks=-1)):
        assert refusal(change) == "<file>: feedback memory click numbers invalid"


def test_calibration_embeddings_of_the_wrong_shape_are_refused_whatever_their_type(path):
    from core.persistence import read_model_file, write_model_file

    meta, tensors = read_model_file(path)
    emb = tensors["calibration.embeddings"]
    assert emb.dtype == torch.float16 and emb.dim() == 4
    tensors["calibration.embeddings"] = emb[:, :-1].contiguous()  # a channel short, still float16
    write_model_file(path, tensors, meta)
    assert _refused(path) == f"{path}: calibration embeddings have the wrong shape"


def test_damaged_applied_labels_are_refused_in_so_many_words(path):
    _edit_meta(path, lambda m: m["feedback"].update(applied_labels=[3, "7"]))
    assert _refused(path) == f"{path}: the list of applied labels is damaged"
