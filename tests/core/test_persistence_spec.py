"""Model files, specified where mutation testing found them unspecified (issue 18): what a
refusal says, the backbone's normalisation on record, the applied labels of a file that has
none or damaged ones."""
from __future__ import annotations

import json

import pytest

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
