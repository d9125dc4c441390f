"""The derived-state cache beside a model file (core/derived_cache.py): PaDiM's precisions are
not recomputed on load, are exactly the derived ones, and any doubt means deriving them again."""
import json
import os

import pytest
import torch

from core import CancelToken, fit_job, load_detector, run_job, save_detector
from core import derived_cache
from core.persistence import _read_checked


@pytest.fixture
def fitted(tiny_config, part_images):
    ok, _ = part_images
    return run_job(fit_job(ok, tiny_config, CancelToken())).detector


def _caches(folder):
    return sorted(p.name for p in folder.iterdir() if ".derived-" in p.name)


def _derived_again(det):
    """The precisions derived from the loaded statistics, as a load without the cache does."""
    model = det.model.copy()
    model._precision = model._mean = model._dirty = None
    model.finalize()
    return model._mean, model._precision


def _no_derivation(monkeypatch):
    def refuse(cov):
        raise AssertionError("the precisions were derived, not taken from the cache")

    monkeypatch.setattr("core.models.padim.precision_from_covariance", refuse)


def test_save_caches_the_precisions_and_load_takes_them_without_deriving(fitted, tmp_path, monkeypatch):
    path = save_detector(fitted, tmp_path / "m.okng")
    assert len(_caches(tmp_path)) == 1 and _caches(tmp_path)[0].startswith("m.okng.derived-")
    _no_derivation(monkeypatch)
    back = load_detector(path, runtime="torch")
    monkeypatch.undo()
    mean, prec = _derived_again(back)
    # stored = derived, bit for bit; and the fitted detector's own values
    assert torch.equal(back.model._precision, prec) and torch.equal(back.model._mean, mean)
    assert torch.equal(back.model._precision, fitted.model._precision)
    # views of the cache file's bytes, writable: feedback updates them in place
    assert back.model._precision.numpy().flags.writeable and back.model._mean.numpy().flags.writeable
    ref = fitted.copy()
    ref.use_runtime("torch")
    probe = [(torch.rand(70, 50, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8).numpy()]
    assert back.inspect(probe)[0].score == ref.inspect(probe)[0].score


def test_a_model_saved_before_the_cache_existed_gets_it_at_first_load(fitted, tmp_path, monkeypatch):
    path = save_detector(fitted, tmp_path / "m.okng")
    for name in _caches(tmp_path):
        (tmp_path / name).unlink()
    first = load_detector(path, runtime="torch")  # derives, then caches
    assert len(_caches(tmp_path)) == 1
    _no_derivation(monkeypatch)
    second = load_detector(path, runtime="torch")
    assert torch.equal(second.model._precision, first.model._precision)


def _damage_data(cache, offset_from_end=100):
    raw = bytearray(cache.read_bytes())
    raw[-offset_from_end] ^= 0x01
    cache.write_bytes(bytes(raw))


def test_a_damaged_cache_is_ignored_and_replaced(fitted, tmp_path, caplog):
    path = save_detector(fitted, tmp_path / "m.okng")
    cache = tmp_path / _caches(tmp_path)[0]
    _damage_data(cache)
    with caplog.at_level("WARNING"):
        back = load_detector(path, runtime="torch")
    assert "damaged" in caplog.text
    assert torch.equal(back.model._precision, _derived_again(back)[1])
    assert torch.equal(back.model._precision, fitted.model._precision)
    # written again, intact: the next load takes it
    digest = _read_checked(path)[2]
    probe = back.model.copy()
    probe._precision = probe._mean = None
    assert derived_cache.restore(probe, path, digest) and torch.equal(probe._precision, back.model._precision)


def test_a_cache_from_another_model_or_torch_is_not_used(fitted, tmp_path, monkeypatch):
    path = save_detector(fitted, tmp_path / "m.okng")
    cache = tmp_path / _caches(tmp_path)[0]
    other = save_detector(fitted, tmp_path / "other.okng")  # same content, same digest: swap in
    monkeypatch.setattr(torch, "__version__", "0.0.0-another")
    assert not derived_cache.restore(fitted.model.copy(), path, "0" * 64)  # another model's key
    probe = fitted.model.copy()
    probe._precision = probe._mean = None
    digest = _read_checked(path)[2]
    assert not derived_cache.restore(probe, path, digest)  # written by another torch
    assert probe._precision is None
    assert other.is_file() and cache.is_file()


def test_resaving_a_changed_model_replaces_the_stale_cache(fitted, tmp_path):
    path = save_detector(fitted, tmp_path / "m.okng")
    before = _caches(tmp_path)
    fitted.thresholds = type(fitted.thresholds)(fitted.thresholds.image + 1.0, fitted.thresholds.pixel,
                                                fitted.thresholds.calibration_scores,
                                                fitted.thresholds.calibration_peaks,
                                                fitted.thresholds.target_false_alarm_rate)
    save_detector(fitted, path)
    after = _caches(tmp_path)
    assert len(after) == 1 and after != before


def test_a_format_1_file_is_never_cached(fitted, tmp_path):
    """No checksum, nothing that ties a cache to the file's bytes: derived on every load."""
    import struct

    path = save_detector(fitted, tmp_path / "m.okng")
    for name in _caches(tmp_path):
        (tmp_path / name).unlink()
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    del header["__metadata__"]["okng_sha256"]
    meta = json.loads(header["__metadata__"]["okng"])
    meta["format_version"] = 1
    header["__metadata__"]["okng"] = json.dumps(meta)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])
    back = load_detector(path, runtime="torch")
    assert _caches(tmp_path) == []
    assert torch.equal(back.model._precision, fitted.model._precision)


def test_a_read_only_model_folder_uses_the_user_cache(fitted, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = save_detector(fitted, folder / "m.okng")
    for name in _caches(folder):
        (folder / name).unlink()
    monkeypatch.setenv("OKNG_CACHE_DIR", str(tmp_path / "cache"))
    real = derived_cache._write_replace

    def read_only_folder(target, data):  # as root a chmod would not stop the write
        if os.path.dirname(target) == str(folder):
            raise PermissionError(13, "Permission denied")
        return real(target, data)

    monkeypatch.setattr(derived_cache, "_write_replace", read_only_folder)
    load_detector(path, runtime="torch")
    assert _caches(folder) == [] and len(list((tmp_path / "cache").glob("derived-*.safetensors"))) == 1
    _no_derivation(monkeypatch)
    load_detector(path, runtime="torch")


def test_an_unwritable_place_only_costs_the_derivation(fitted, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    path = save_detector(fitted, tmp_path / "m.okng")
    for name in _caches(tmp_path):
        (tmp_path / name).unlink()
    monkeypatch.setattr(derived_cache, "_write_replace", full)
    back = load_detector(path, runtime="torch")
    assert torch.equal(back.model._precision, fitted.model._precision)
    assert _caches(tmp_path) == []
