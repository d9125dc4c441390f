"""Issue 6: tampered or damaged model files are refused with ModelFileError, never another
exception, never a silent load, and never after allocating what a forged header declares."""
from __future__ import annotations

import json
import struct

import pytest
from safetensors.torch import load_file

from core import ModelFileError, load_detector
from core.models.padim import PadimModel
from core.persistence import read_model_file, seal_model_bytes, write_model_file


@pytest.fixture(scope="module")
def model_file(saved_tiny_model):
    return saved_tiny_model[0].read_bytes()


@pytest.fixture
def path(model_file, tmp_path):
    p = tmp_path / "m.okng"
    p.write_bytes(model_file)
    return p


def _split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    """Rebuild the container; its checksum is recomputed (when it has one) so that the
    check under test is reached, not the checksum's."""
    h = json.dumps(header).encode()
    raw = struct.pack("<Q", len(h)) + h + body
    try:
        return b"".join(bytes(p) for p in seal_model_bytes(raw))
    except (ValueError, struct.error):
        return raw


def _edit_meta(path, change):
    header, body = _split(path.read_bytes())
    meta = json.loads(header["__metadata__"]["okng"])
    change(meta)
    header["__metadata__"]["okng"] = json.dumps(meta)
    path.write_bytes(_join(header, body))


def _refused(path, match=None):
    with pytest.raises(ModelFileError, match=match) as info:
        load_detector(path)
    assert str(path) in str(info.value)
    return str(info.value)


def test_the_untampered_file_loads(path):
    assert load_detector(path).model.n_samples > 0


# -- the safetensors container -------------------------------------------------------------
def test_declared_header_larger_than_the_file(path):
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 1000) + raw[8:])
    _refused(path, "the file is cut short")
    path.write_bytes(struct.pack("<Q", 2**63 - 1) + raw[8:])
    _refused(path, "the file is cut short")


def test_a_model_file_cut_in_half_says_so(path):
    """Found trying the station: the parser's 'incomplete metadata, file not fully covered'."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    assert "the file is cut short" in _refused(path, "restore it from a backup or fit the model again")


def test_header_that_is_not_json(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(raw[:8] + b"\xff" * n + raw[8 + n :])
    _refused(path, "not an OK/NG model file")


@pytest.mark.parametrize("tamper", [
    lambda t: t.update(dtype="F32"),                                              # half the bytes
    lambda t: t.update(dtype="I64"),                                              # wrong kind, same size
    lambda t: t.update(shape=[t["shape"][0] * 2, *t["shape"][1:]]),               # more than stored
    lambda t: t.update(data_offsets=[t["data_offsets"][0], t["data_offsets"][1] + 10**9]),  # past the end
    lambda t: t.update(data_offsets=[t["data_offsets"][1], t["data_offsets"][0]]),          # reversed
    lambda t: t.update(dtype="pickle"),
    lambda t: t.update(shape=[-1]),
])
def test_a_tensor_with_inconsistent_dtype_shape_or_offsets(path, tamper):
    header, body = _split(path.read_bytes())
    tamper(header["model.scatter"])
    path.write_bytes(_join(header, body))
    _refused(path)


def test_a_changed_dtype_with_consistent_offsets_is_caught_by_the_shape_check(path):
    """F64 -> F32 with the shape doubled is a valid container; the model check refuses it."""
    tensors = load_file(str(path))
    meta, _ = read_model_file(path)
    tensors["model.scatter"] = tensors["model.scatter"].float()
    tensors["model.mean"] = tensors["model.mean"].to(dtype=tensors["model.mean"].dtype).repeat(2, 1)
    write_model_file(path, tensors, meta)
    _refused(path, "shape")


def test_truncated_body(path):
    raw = path.read_bytes()
    for cut in (len(raw) - 1, len(raw) // 2, 9):
        path.write_bytes(raw[:cut])
        _refused(path)


# -- the JSON description ------------------------------------------------------------------
@pytest.mark.parametrize("version", [True, False, 1.0, "1", None, [1], {"v": 1}, -1, 0])
def test_format_version_must_be_a_known_integer(path, version):
    _edit_meta(path, lambda m: m.update(format_version=version))
    _refused(path, "format")


@pytest.mark.parametrize("field", ["format", "okng_version", "config", "backbone", "model", "thresholds"])
@pytest.mark.parametrize("value", [None, 7, 1.5, True, "text", [], [1, 2]])
def test_each_top_level_field_of_the_wrong_type(path, field, value):
    if field == "thresholds" and value is None:
        pytest.skip("thresholds: null is valid (an uncalibrated model)")
    if field == "okng_version" and isinstance(value, str):
        pytest.skip("any text is a valid version string")
    _edit_meta(path, lambda m: m.update({field: value}))
    _refused(path)


def test_the_description_must_be_an_object(path):
    header, body = _split(path.read_bytes())
    for desc in ("[]", "1", '"okng-model"', "null", "{"):
        header["__metadata__"]["okng"] = desc
        path.write_bytes(_join(header, body))
        _refused(path)


@pytest.mark.parametrize("key, value", [
    ("image_size", 64.0), ("image_size", True), ("n_channels", "24"), ("seed", None), ("stages", "2,3"),
    ("stages", [2.0]), ("sigma", "4"), ("sigma", float("nan")), ("pooling", 1), ("topk", 1.5),
    ("batch_size", 1.5), ("batch_size", True), ("weights", 5), ("model_params", []), ("model", None),
    ("false_alarm_rate", "0.01"), ("calibration_fraction", None), ("backbone", ["x"]), ("unknown_key", 1),
])
def test_config_settings_of_the_wrong_type_are_refused(path, key, value):
    _edit_meta(path, lambda m: m["config"].update({key: value}))
    _refused(path, "invalid settings")


@pytest.mark.parametrize("change", [
    lambda m: m["model"].update(params=[]),
    lambda m: m["model"].update(params={"epsilon": "x"}),
    lambda m: m["model"].update(params={"epsilon": -1}),
    lambda m: m["model"].update(params={"rm -rf": 1}),
    lambda m: m["model"].update(kind=None),
    lambda m: m["model"].update(n_channels=24.0),
    lambda m: m["model"].update(n_channels=True),
    lambda m: m["model"].update(grid=[8, 8.0]),
    lambda m: m["model"].update(grid=[8]),
    lambda m: m["backbone"].update(weights=["x"]),
    lambda m: m["thresholds"].update(image=True),
    lambda m: m["thresholds"].update(pixel=float("inf")),
])
def test_model_and_threshold_fields_of_the_wrong_type(path, change):
    _edit_meta(path, change)
    _refused(path)


# -- sizes that would allocate gigabytes -----------------------------------------------------
@pytest.fixture
def no_huge_model(monkeypatch):
    """Fail loudly if a model is ever constructed with sizes the file does not back."""
    real_init = PadimModel.__init__
    seen = []

    def init(self, grid, n_channels, *a, **k):
        import torch

        seen.append((tuple(grid), n_channels))
        on_meta = torch.empty(0).device.type == "meta"
        assert on_meta or grid[0] * grid[1] * n_channels * n_channels <= 10**7, "allocated a forged size"
        real_init(self, grid, n_channels, *a, **k)

    monkeypatch.setattr(PadimModel, "__init__", init)
    return seen


@pytest.mark.parametrize("change, message", [
    (lambda m: m["model"].update(grid=[4096, 4096]), "grid"),
    (lambda m: m["model"].update(grid=[4096, 4096], n_channels=24), "grid"),
    (lambda m: m["model"].update(n_channels=100_000), "channel"),
    (lambda m: m["model"].update(grid=[4096, 4096], n_channels=100_000), "channel"),
    (lambda m: m["model"].update(grid=[10**12, 10**12]), "grid"),
    (lambda m: m["config"].update(image_size=4096), "grid"),
])
def test_giant_declared_sizes_are_refused_before_allocating(path, no_huge_model, change, message):
    _edit_meta(path, change)
    _refused(path, message)


def test_channel_indices_that_back_a_giant_channel_count_are_refused(path, no_huge_model):
    """Duplicated indices could declare more channels than the backbone has."""
    import torch

    tensors = load_file(str(path))
    meta, _ = read_model_file(path)
    tensors["embedding.channel_idx"] = torch.zeros(5000, dtype=torch.int64)
    meta["model"]["n_channels"] = 5000
    write_model_file(path, tensors, meta)
    _refused(path, "channel indices invalid")


def test_a_model_tensor_of_the_wrong_shape_is_refused_before_the_model_is_built(path, no_huge_model):
    tensors = load_file(str(path))
    meta, _ = read_model_file(path)
    tensors["model.scatter"] = tensors["model.scatter"][:, :3, :3].contiguous()
    write_model_file(path, tensors, meta)
    _refused(path, "shape")
    assert no_huge_model and all(g == (8, 8) for g, _ in no_huge_model)


# -- integrity: a checksum over header and data (issue 13) -----------------------------------
FLIPS = 200


def test_random_single_bit_flips_anywhere_are_all_refused(saved_tiny_model, tmp_path):
    """200 single-bit flips (fixed seed) at random places of a saved model: each file is
    refused with ModelFileError (or, were a flip to change no content, loads identically).
    Before the checksum, 3 of 20 flips in tensor data silently changed scores and 2 crashed."""
    import random

    import numpy as np

    original, probe = saved_tiny_model
    raw = original.read_bytes()
    ref = load_detector(original)
    expected = ref.inspect([probe])[0].score
    n_header = 8 + struct.unpack("<Q", raw[:8])[0]
    rng = random.Random(13)
    # half anywhere, half in the header (small, but holds thresholds and settings)
    places = [rng.randrange(len(raw)) for _ in range(FLIPS // 2)] + [rng.randrange(n_header) for _ in range(FLIPS // 2)]
    refused = identical = 0
    p = tmp_path / "flipped.okng"
    for pos in places:
        bit = rng.randrange(8)
        b = bytearray(raw)
        b[pos] ^= 1 << bit
        p.write_bytes(bytes(b))
        try:
            det = load_detector(p, extractor=ref.extractor)
        except ModelFileError:
            refused += 1
            continue
        assert det.inspect([probe])[0].score == expected, f"flip at byte {pos} bit {bit} changed the score"
        assert det.thresholds.image == ref.thresholds.image
        np.testing.assert_array_equal(det.embedder.channel_idx, ref.embedder.channel_idx)
        identical += 1
    assert refused + identical == FLIPS
    assert refused == FLIPS  # every byte of the file is covered by the checksum


def test_a_changed_stored_threshold_is_refused_as_damaged(path):
    raw = bytearray(path.read_bytes())
    i = raw.index(b'\\"image\\": ') + len(b'\\"image\\": ')
    raw[i] ^= 0x01  # one digit of the image threshold: 1 <-> 0, 3 <-> 2 ...
    path.write_bytes(bytes(raw))
    msg = _refused(path, "damaged")
    assert "checksum" in msg


def test_a_format_2_file_without_its_checksum_is_refused(path):
    header, body = _split(path.read_bytes())
    del header["__metadata__"]["okng_sha256"]
    path.write_bytes(_join(header, body))
    _refused(path, "checksum is missing")


def test_a_format_1_file_without_checksum_loads_with_a_warning(path, caplog):
    """Files written before the checksum existed keep working; the warning says why they
    cannot be verified. Saving again writes format 2 with a checksum."""
    from core import save_detector

    header, body = _split(path.read_bytes())
    del header["__metadata__"]["okng_sha256"]
    meta = json.loads(header["__metadata__"]["okng"])
    meta["format_version"] = 1
    header["__metadata__"]["okng"] = json.dumps(meta)
    path.write_bytes(_join(header, body))
    with caplog.at_level("WARNING"):
        det = load_detector(path)
    assert "integrity cannot be verified" in caplog.text
    resaved = save_detector(det, path.with_name("resaved.okng"))
    m, _ = read_model_file(resaved)
    assert m["format_version"] == 2 and b"okng_sha256" in resaved.read_bytes()[:4096]


# -- settings in a model file are validated like the CLI's (issue 13) -------------------------
@pytest.mark.parametrize("change, setting", [
    (lambda m: m["config"].update(sigma=1e308), "sigma"),      # OverflowError when scoring
    (lambda m: m["config"].update(sigma=1e5), "sigma"),        # 150 s for 4 images
    (lambda m: m["config"].update(topk=0), "topk"),
    (lambda m: m["config"].update(false_alarm_rate=7.0), "false_alarm_rate"),
    (lambda m: m["config"].update(model_params={"epsilon": 1e300}), "epsilon"),
    (lambda m: m["thresholds"].update(target_false_alarm_rate=-5), "target_false_alarm_rate"),
    (lambda m: m["thresholds"].update(target_false_alarm_rate=1.5), "target_false_alarm_rate"),
])
def test_out_of_range_settings_in_a_model_file_are_refused(path, change, setting):
    _edit_meta(path, change)
    msg = _refused(path)
    assert setting in msg
