"""What false-alarm clicks buy: a recurring benign mark, and non-recurring textures (issue 11).

Two cases, both run through the same ``simulate_feedback_job`` as ``okng simulate-feedback``:

* **recurring mark** (mono cells, 1 % target false-alarm rate): a mark (``--mark ring``: an
  ink-stamped ring, ``text``: a printed label, ``stamp``: a framed cross) is drawn with cv2 at
  a random place on every good and defective cell of the click pool and of the evaluation sets,
  with random rotation, scale and intensity; the fitted (and calibration) cells carry none.
  The reference is the clean model's detection rate on the same defective cells *without*
  the mark, before any feedback.
* **non-recurring textures** (``--case poly``, poly cells, 5 % target rate): false alarms are
  each a different crystal texture; feedback must stay harmless.

Marked images are written to ``/tmp/okng-bench-feedback/<mark>/`` and backbone features are
cached (``features.pt`` next to them), so a rerun costs the simulation only.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_feedback.py --case mark --mark ring
    PYTHONPATH=. .venv/bin/python benchmarks/bench_feedback.py --case poly
    PYTHONPATH=. .venv/bin/python benchmarks/bench_feedback.py --case all --json out.json
    PYTHONPATH=. .venv/bin/python benchmarks/bench_feedback.py --timing --case none   # cost
    PYTHONPATH=. .venv/bin/python benchmarks/bench_feedback.py --session-clicks 200 --case none
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path("/tmp/okng-bench-feedback")
MARKS = ("ring", "text", "stamp", "label")


# -- the marks ---------------------------------------------------------------------------
def _mark_layer(kind: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, float]:
    """(size, size) float coverage in [0, 1] of one print of the mark, and its grey level."""
    canvas = np.zeros((size, size), np.uint8)
    c = size // 2
    if kind == "ring":  # an ink stamp: dark ring with a dot
        cv2.circle(canvas, (c, c), int(size * 0.36), 255, max(2, size // 14), cv2.LINE_AA)
        cv2.circle(canvas, (c, c), max(2, size // 12), 255, -1, cv2.LINE_AA)
        level = rng.uniform(10, 30)
    elif kind == "text":  # a printed label: bright text
        font, scale = cv2.FONT_HERSHEY_SIMPLEX, size / 70.0
        (tw, th), _ = cv2.getTextSize("QC7", font, scale, max(2, size // 16))
        cv2.putText(canvas, "QC7", (c - tw // 2, c + th // 2), font, scale, 255, max(2, size // 16), cv2.LINE_AA)
        level = rng.uniform(200, 250)
    elif kind == "stamp":  # a framed cross, mid-dark
        m = int(size * 0.18)
        cv2.rectangle(canvas, (m, m), (size - m, size - m), 255, max(2, size // 16), cv2.LINE_AA)
        cv2.line(canvas, (m, m), (size - m, size - m), 255, max(2, size // 18), cv2.LINE_AA)
        cv2.line(canvas, (m, size - m), (size - m, m), 255, max(2, size // 18), cv2.LINE_AA)
        level = rng.uniform(15, 35)
    elif kind == "label":  # a bright sticker with a dark bar code on it
        y0, y1, x0, x1 = int(size * 0.3), int(size * 0.7), int(size * 0.12), int(size * 0.88)
        canvas[y0:y1, x0:x1] = 255
        bars = np.random.default_rng(7).integers(1, 4, 12)  # the same code on every sticker
        x = x0 + size // 20
        for b in bars:
            bw = max(1, int(b * size / 90))
            if x + bw > x1 - size // 20:
                break
            canvas[y0 + size // 20 : y1 - size // 20, x : x + bw] = 60
            x += bw + max(1, size // 45)
        level = rng.uniform(215, 250)
    else:
        raise ValueError(f"unknown mark {kind!r}; choose from {MARKS}")
    return canvas.astype(np.float32) / 255.0, float(level)


def draw_mark(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """The mark at a random place of an RGB uint8 image, rotated +-12 deg, scaled 0.85-1.15,
    with its own grey level and opacity."""
    h, w = img.shape[:2]
    base = int(round(min(h, w) * 0.17 * rng.uniform(0.85, 1.15)))
    layer, level = _mark_layer(kind, rng, 2 * base)
    rot = cv2.getRotationMatrix2D((base, base), rng.uniform(-12, 12), 1.0)
    layer = cv2.warpAffine(layer, rot, (2 * base, 2 * base))
    alpha = layer * rng.uniform(0.75, 0.95)
    y = int(rng.integers(0, h - 2 * base))
    x = int(rng.integers(0, w - 2 * base))
    out = img.astype(np.float32).copy()
    roi = out[y : y + 2 * base, x : x + 2 * base]
    roi[:] = roi * (1 - alpha[..., None]) + level * alpha[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def write_marked(paths: list[str], kind: str, folder: Path, seed: int) -> list[str]:
    from core.imageio import load_image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, p in enumerate(paths):
        dst = folder / f"{i:04d}_{Path(p).stem}.png"
        if not dst.exists():
            rng = np.random.default_rng([seed, i])
            img = draw_mark(load_image(p), kind, rng)
            cv2.imwrite(str(dst), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        out.append(str(dst))
    return out


# -- backbone feature cache ----------------------------------------------------------------
class FeatureCache:
    """Caches the backbone's stage features per image (keyed by the preprocessed pixels), so
    reruns and every copy of the detector skip the CNN."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store: dict[str, list[torch.Tensor]] = torch.load(path) if path.exists() else {}
        self.dirty = False

    def install(self, extractor) -> None:
        forward = extractor.forward

        def cached(x: torch.Tensor) -> list[torch.Tensor]:
            keys = [hashlib.sha1(xi.numpy().tobytes()).hexdigest() for xi in x]
            missing = [i for i, k in enumerate(keys) if k not in self.store]
            if missing:
                feats = forward(x[missing])
                for j, i in enumerate(missing):
                    self.store[keys[i]] = [f[j].clone() for f in feats]
                self.dirty = True
            return [torch.stack([self.store[k][s] for k in keys]) for s in range(len(self.store[keys[0]]))]

        extractor.forward = cached

    def save(self) -> None:
        if self.dirty:
            torch.save(self.store, self.path)
            self.dirty = False


# -- the cases -----------------------------------------------------------------------------
#: model parameters for every fit (``--param key=value``, as ``okng fit`` takes them)
MODEL_PARAMS: dict = {}


def _fit(paths: list[str], far: float, model: str, extractor=None):
    from core import CancelToken, fit_job, run_job
    from core.detector import DetectorConfig

    cfg = DetectorConfig(model=model, false_alarm_rate=far, model_params=dict(MODEL_PARAMS))
    return run_job(fit_job(paths, cfg, CancelToken(), extractor=extractor)).detector


def _simulate(det, pool, ok, ng, clicks, reweight=False) -> dict:
    from core import CancelToken, run_job
    from core.simulate import simulate_feedback_job

    return run_job(simulate_feedback_job(det, pool, ok, ng, clicks, CancelToken(), reweight=reweight)).to_dict()


def _detection(det, paths: list[str]) -> float:
    from core.jobs import inspect_paths

    res = inspect_paths(paths, det)
    return float(np.mean([r.inspection.verdict == "NG" for r in res]))


def _extractor(cache: FeatureCache):
    from core.backbone import FeatureExtractor
    from core.detector import DetectorConfig

    ex = FeatureExtractor(DetectorConfig().backbone_spec())
    cache.install(ex)
    return ex


def run_mark(mark: str, clicks: list[int], model: str, n_pool: int, reweight: bool, cache: FeatureCache) -> dict:
    from core.demo import demo_split

    split = demo_split()  # mono cells: 200 OK to fit (40 of them held out to calibrate)
    rest_ok = [c.path for c in split.stream if c.is_ok] + split.eval_ok
    pool_src, ok_src = rest_ok[:n_pool], rest_ok[n_pool:]
    ng_src = split.eval_ng
    folder = ROOT / mark
    pool = write_marked(pool_src, mark, folder / "pool", 1)
    ok = write_marked(ok_src, mark, folder / "ok", 2)
    ng = write_marked(ng_src, mark, folder / "ng", 3)
    ex = _extractor(cache)
    det = _fit(split.ok_train, 0.01, model, ex)
    reference = _detection(det, ng_src)
    t = time.perf_counter()
    sim = _simulate(det, pool, ok, ng, clicks, reweight)
    cache.save()
    return {"case": f"mark:{mark}", "model": model, "reference_detection_unmarked": reference,
            "pool": len(pool), "eval_ok": len(ok), "eval_ng": len(ng), "seconds": time.perf_counter() - t,
            **sim}


def run_poly(clicks: list[int], model: str, n_pool: int, reweight: bool, cache: FeatureCache) -> dict:
    from core.demo import demo_split

    split = demo_split(kind="poly")
    rest_ok = [c.path for c in split.stream if c.is_ok] + split.eval_ok
    pool, ok = rest_ok[:n_pool], rest_ok[n_pool:]
    ng = split.eval_ng
    ex = _extractor(cache)
    det = _fit(split.ok_train, 0.05, model, ex)
    t = time.perf_counter()
    sim = _simulate(det, pool, ok, ng, clicks, reweight)
    cache.save()
    return {"case": "poly", "model": model, "reference_detection_unmarked": sim["checkpoints"][0]["detection_rate"],
            "pool": len(pool), "eval_ok": len(ok), "eval_ng": len(ng), "seconds": time.perf_counter() - t, **sim}


def run_timing(mark: str, model: str, cache: "FeatureCache", n_memory: int = 2000) -> dict:
    """Per-image scoring cost of a memory of ``n_memory`` accepted patches (batch 1), and
    the time of a click, on marked cells."""

    from core.demo import demo_split
    from core.feedback import FeedbackLearner
    from core.imageio import load_image
    from core.simulate import hottest_region_mask

    split = demo_split()
    rest_ok = [c.path for c in split.stream if c.is_ok] + split.eval_ok
    folder = ROOT / mark
    marked = write_marked(rest_ok[:180], mark, folder / "pool", 1)
    ex = _extractor(cache)
    det = _fit(split.ok_train, 0.01, model, ex)
    embs = [det.embed([load_image(p)]) for p in marked]
    plain = [det.embed([load_image(p)]) for p in rest_ok[200:260]]
    cache.save()
    learner = FeedbackLearner(det.copy())
    learner.detector.warm_up(feedback=True)  # as the station's fit and load do, before the first click
    clicks = []
    i = 0
    while learner.detector.memory is None or len(learner.detector.memory) < n_memory:
        e = embs[i % len(embs)]
        maps, _ = learner.detector.maps_and_scores(e)
        rec = learner.mark_false_alarm(e, hottest_region_mask(maps[0], learner.detector.thresholds.pixel))
        clicks.append(rec.seconds)
        i += 1
    mem_det = learner.detector
    no_mem = mem_det.copy()
    no_mem.memory = None

    def per_image(items, score=lambda d, x: d.maps_and_scores(x), reps: int = 5) -> tuple[float, float]:
        """ms per image without and with the memory: each image timed both ways in turn, its
        fastest of ``reps`` rounds kept (this shared machine's speed drifts by up to 2x over
        minutes; pairing and minima keep that out of the difference)."""
        for x in items[:5]:
            score(no_mem, x)
            score(mem_det, x)
        without, with_mem = np.full(len(items), np.inf), np.full(len(items), np.inf)
        for _ in range(reps):
            for j, x in enumerate(items):
                t = time.perf_counter()
                score(no_mem, x)
                without[j] = min(without[j], time.perf_counter() - t)
                t = time.perf_counter()
                score(mem_det, x)
                with_mem[j] = min(with_mem[j], time.perf_counter() - t)
        return float(without.mean()) * 1000, float(with_mem.mean()) * 1000

    out = {"memory_patches": len(mem_det.memory), "clicks": len(clicks),
           "click_ms_median": float(np.median(clicks)) * 1000, "click_ms_max": float(np.max(clicks)) * 1000}
    for name, items in (("plain_ok", plain), ("marked", embs[:60])):
        base, with_mem = per_image(items)
        out[f"{name}_ms_without"], out[f"{name}_ms_with"] = base, with_mem
        out[f"{name}_ms_added"] = with_mem - base
    # the station's own path at batch 1: the CNN (not the feature cache), then scoring
    cached_forward = vars(ex).pop("forward", None)
    try:
        images = [load_image(p) for p in marked[:30]]
        base, with_mem = per_image(images, lambda d, img: d.maps_and_scores(d.embed([img])), reps=3)
    finally:
        if cached_forward is not None:
            ex.forward = cached_forward
    out["marked_pipeline_ms_without"], out["marked_pipeline_ms_with"] = base, with_mem
    out["marked_pipeline_ms_added"] = with_mem - base
    out["marked_steps_ms"] = memory_steps(mem_det, embs[:60])
    return out


def run_session_clicks(n_results: int, clicks: int = 4) -> dict:
    """The station's label path (``label_job``, as the GUI runs it) with *Learn channel
    weights* on, in a session of ``n_results`` demo results (the stream, then defective
    evaluation cells): each click marks the hottest region of a part judged NG as a false
    alarm, with every other NG result protected and every result re-judged."""
    from core import CancelToken, run_job
    from core.demo import demo_split
    from core.feedback import FeedbackLearner
    from core.feedback_jobs import label_job
    from core.imageio import load_image
    from core.simulate import hottest_region_mask

    split = demo_split()
    det = _fit(split.ok_train, 0.01, "padim")
    det.warm_up(feedback=True)
    paths = ([c.path for c in split.stream] + split.eval_ng)[:n_results]
    images = [load_image(p) for p in paths]
    embs = [det.embed([im]) for im in images]
    learner = FeedbackLearner(det, reweight=True)
    out: dict = {"results": len(embs), "clicks": []}
    for k in range(clicks):
        d = learner.detector
        scores = [float(d.maps_and_scores(e)[1][0]) for e in embs]
        ng = [i for i, s in enumerate(scores) if s > d.thresholds.image]
        i = ng[k % len(ng)]
        mask = hottest_region_mask(d.maps_and_scores(embs[i])[0][0], d.thresholds.pixel)
        t = time.perf_counter()
        o = run_job(label_job(learner, "false_alarm", images[i], paths[i], mask, list(enumerate(embs)),
                              CancelToken(), protect=[embs[j] for j in ng if j != i]))
        out["clicks"].append({"ms": 1000 * (time.perf_counter() - t), "learner_ms": 1000 * o.record.seconds,
                              "judged_ng": len(ng), "weights_strength": None if o.record.weights is None
                              else o.record.weights.strength})
    return out


def memory_steps(det, items: list[torch.Tensor], reps: int = 3) -> dict:
    """Where the memory's time goes on these images (ms per image): each step of
    ``FeedbackMemory.apply`` timed in place (a wrapper around it; nested steps are included
    in their callers: ``search`` holds ``product`` (on PyTorch's threads) and
    ``shortlist_and_best``, one compiled pass)."""
    import core.feedback_memory as fm

    mem = det.memory
    dists = [det.model.score(e) for e in items]
    spent: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    fm._compiled()
    saved = {k: getattr(fm, k) for k in ("_query_blocks", "_search_kernel")}
    fm._query_blocks = timed("gather", saved["_query_blocks"])
    fm._search_kernel = timed("shortlist_and_best", saved["_search_kernel"])
    mem.match = timed("match", mem.match)
    mem._search = timed("search", mem._search)
    mem._grown = timed("growth_and_outlines", mem._grown)
    addmm = torch.addmm
    torch.addmm = timed("product", addmm)
    try:
        t = time.perf_counter()
        for _ in range(reps):
            for e, d in zip(items, dists):
                det.with_memory(e, d)  # the detector's own look-up level
        total = time.perf_counter() - t
    finally:
        torch.addmm = addmm
        for k, v in saved.items():
            setattr(fm, k, v)
        for k in ("match", "_search", "_grown"):
            delattr(mem, k)
    n = reps * len(items)
    return {"apply": 1000 * total / n, **{k: 1000 * v / n for k, v in spent.items()}}


def print_table(r: dict) -> None:
    print(f"\n{r['case']} ({r['model']}): pool {r['pool']}, evaluation {r['eval_ok']} OK + {r['eval_ng']} defective; "
          f"reference detection (clean model, unmarked defects, 0 clicks): {r['reference_detection_unmarked']:.3f}")
    print(f"{'clicks':>6} {'false alarms':>12} {'detection':>9} {'AUROC':>7} {'flipped':>7}")
    for c in r["checkpoints"]:
        print(f"{c['clicks']:>6} {c['false_alarm_rate']:>12.3f} {c['detection_rate']:>9.3f} {c['auroc']:>7.4f} "
              f"{c.get('defects_flipped', 0):>7}")
    if r.get("click_seconds_median") is not None:
        exhausted = "; pool exhausted" if r["pool_exhausted"] else ""
        print(f"median click {r['click_seconds_median'] * 1000:.0f} ms{exhausted}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=("mark", "poly", "all", "none"), default="all")
    ap.add_argument("--mark", default="ring,text", help=f"comma separated, of {', '.join(MARKS)}")
    ap.add_argument("--model", default="padim")
    ap.add_argument("--clicks", default="5,10,20")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="model parameter for the fits, e.g. neighbourhood=3 (numbers as JSON)")
    ap.add_argument("--pool", type=int, default=180, help="marked good cells to click on")
    ap.add_argument("--reweight", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--timing", action="store_true", help="time scoring with a 2,000-patch memory and clicks")
    ap.add_argument("--session-clicks", type=int, metavar="N",
                    help="time clicks with Learn channel weights on in a session of N results")
    args = ap.parse_args(argv)
    for item in args.param:
        key, _, value = item.partition("=")
        MODEL_PARAMS[key] = json.loads(value)
    torch.set_num_threads(2)
    ROOT.mkdir(parents=True, exist_ok=True)
    cache = FeatureCache(ROOT / "features.pt")
    clicks = [int(c) for c in args.clicks.split(",")]
    results = []
    if args.timing:
        t = run_timing(args.mark.split(",")[0], args.model, cache)
        print(json.dumps(t, indent=2))
        results.append({"case": "timing", **t})
    if args.session_clicks:
        t = run_session_clicks(args.session_clicks)
        print(json.dumps(t, indent=2))
        results.append({"case": "session_clicks", **t})
    if (args.timing or args.session_clicks) and args.case == "all":
        args.case = "none"
    if args.case in ("mark", "all"):
        for mark in args.mark.split(","):
            results.append(run_mark(mark, clicks, args.model, args.pool, args.reweight, cache))
            print_table(results[-1])
    if args.case in ("poly", "all"):
        results.append(run_poly(clicks, args.model, 150, args.reweight, cache))
        print_table(results[-1])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
