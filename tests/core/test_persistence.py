"""Model files round-trip exactly and refuse anything that is not a sound model of ours."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from core import CancelToken, ModelFileError, fit_job, load_detector, run_job, save_detector
from core.persistence import read_model_file, write_model_file


@pytest.fixture
def fitted(tiny_config, part_images):
    ok, ng = part_images
    return run_job(fit_job(ok, tiny_config, CancelToken())).detector, ng


def test_round_trip_gives_identical_scores_and_thresholds(fitted, tmp_path):
    det, ng = fitted
    path = save_detector(det, tmp_path / "m.okng")
    back = load_detector(path)
    img = [np.full((70, 50, 3), 30, np.uint8)]
    # the fit prepared the fastest runtime; a loaded model embeds with PyTorch until asked:
    # the same runtime on both sides gives the same scores bit for bit
    assert back.use_runtime(det.runtime_name) == det.runtime_name
    assert back.inspect(img)[0].score == det.inspect(img)[0].score
    ref = det.copy()
    assert back.use_runtime("torch") == ref.use_runtime("torch") == "torch"
    assert back.inspect(img)[0].score == ref.inspect(img)[0].score
    np.testing.assert_array_equal(back.embedder.channel_idx, det.embedder.channel_idx)
    assert back.thresholds.image == det.thresholds.image
    np.testing.assert_array_equal(back.thresholds.calibration_scores, det.thresholds.calibration_scores)
    torch.testing.assert_close(back.calibration_embeddings, det.calibration_embeddings, rtol=0, atol=0)
    assert back.config == det.config


def _rewrite(path, meta_change=None, tensor_change=None):
    meta, _ = read_model_file(path)
    tensors = load_file(str(path))
    if meta_change:
        meta_change(meta)
    if tensor_change:
        tensor_change(tensors)
    write_model_file(path, tensors, meta)  # with a valid checksum: the check under test is reached


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format_version=99), "newer OK/NG Station"),
        (lambda m: m["model"].update(grid="big"), "grid invalid"),
        (lambda m: m["config"].update(image_size="224"), "invalid settings"),
        (lambda m: m["backbone"].update(weights="other-weights"), "fitted with backbone weights"),
        (lambda m: m.update(thresholds={"image": "x"}), "thresholds invalid"),
        (lambda m: m["model"].update(kind="pickle"), "invalid settings"),
    ],
)
def test_tampered_metadata_is_refused_with_a_clear_message(fitted, tmp_path, change, message):
    det, _ = fitted
    path = save_detector(det, tmp_path / "m.okng")
    _rewrite(path, meta_change=change)
    with pytest.raises(ModelFileError, match=message):
        load_detector(path)


def test_wrong_shapes_and_non_finite_values_are_refused(fitted, tmp_path):
    det, _ = fitted
    path = save_detector(det, tmp_path / "m.okng")
    _rewrite(path, tensor_change=lambda t: t.update({"model.mean": t["model.mean"][:, :3].contiguous()}))
    with pytest.raises(ModelFileError, match="shape"):
        load_detector(path)
    path = save_detector(det, tmp_path / "n.okng")

    def poison(t):
        t["model.scatter"][0, 0, 0] = float("nan")

    _rewrite(path, tensor_change=poison)
    with pytest.raises(ModelFileError, match="NaN"):
        load_detector(path)


@pytest.mark.parametrize("content, says", [
    (b"", "the file is empty or cut short: restore it from a backup or fit the model again"),
    (b"\x00" * 64, "not an OK/NG model file .it does not start like one"),
    (b"\xff\xff\xff\xff\xff\xff\xff\x7f{}", "the file is cut short .* restore it from a backup or fit the model again"),
    (b"PK\x03\x04 pickle", "not an OK/NG model file .it does not start like one"),
])
def test_files_that_are_not_models_are_refused_in_words_that_say_what_to_do(tmp_path, content, says):
    p = tmp_path / "x.okng"
    p.write_bytes(content)
    with pytest.raises(ModelFileError, match=says):
        load_detector(p)


def test_a_plain_safetensors_file_is_not_taken_for_a_model(tmp_path):
    p = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(ModelFileError, match="not an OK/NG Station model"):
        load_detector(p)


def test_a_failed_save_leaves_the_previous_file_intact(fitted, tmp_path, monkeypatch):
    from core.atomic import SaveError

    det, _ = fitted
    path = save_detector(det, tmp_path / "m.okng")
    before = path.read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("core.atomic.os.fsync", disk_full)
    with pytest.raises(SaveError, match="disk is full"):
        save_detector(det, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_finiteness_check_finds_nan_and_both_infinities_anywhere(dtype, bad):
    from core.model_file import all_finite

    assert all_finite(torch.zeros(0, dtype=dtype).numpy()) and all_finite(torch.full((3, 4), -7.5, dtype=dtype).numpy())
    for where in [(0, 0), (1, 2), (2, 3)]:
        t = torch.randn(3, 4).to(dtype)
        t[where] = bad
        assert not all_finite(t.numpy())


def test_padim_neighbourhood_round_trips_and_older_files_load_as_the_papers_padim(tiny_config, part_images, tmp_path):
    ok, _ = part_images
    det = run_job(fit_job(ok, tiny_config.with_(model_params={"neighbourhood": 3}), CancelToken())).detector
    path = save_detector(det, tmp_path / "m.okng")
    back = load_detector(path)
    assert back.model.neighbourhood == 3 and back.config == det.config
    emb = det.embed([np.full((70, 50, 3), 30, np.uint8)])
    torch.testing.assert_close(back.model.score(emb), det.model.score(emb), rtol=0, atol=0)
    # a file written before the parameter existed: its statistics are of plain patches
    _rewrite(path, lambda m: (m["model"]["params"].pop("neighbourhood"), m["config"].update(model_params={})))
    assert load_detector(path).model.neighbourhood == 1
