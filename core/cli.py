"""``okng``: the station's command line (stable; scripts and other tools call it).

    okng fit PATH... --out MODEL [--model padim] [--backbone NAME] [--image-size N] [--tile N|auto [--overlap K]]
             [--ray [ADDRESS]]
    okng score --model MODEL|BUNDLE PATH... [--csv FILE] [--heatmaps DIR] [--runtime NAME] [--ray [ADDRESS]]
    okng eval --model MODEL|BUNDLE --ok PATH... --ng PATH... [--json FILE] [--runtime NAME]
    okng export MODEL --out DIR
    okng models
    okng serve RECIPE... (--images PATH...|--watch DIR|--camera N|--video FILE) [--opcua PORT] [--modbus PORT]
               [--mqtt HOST]
    okng demo | okng gui [RECIPE]

PATH is an image file or a folder (searched recursively). Unreadable images are reported
on stderr and skipped; the run goes on; a folder without images is reported too. Exit
status: 0 success, 1 error, 2 usage, 130 interrupted (a closed output pipe, as in
``okng score ... | head``, is a success).

``okng score`` streams one CSV row per image as soon as it is scored (stdout is flushed per
row). With ``--csv FILE`` the rows go to ``FILE.partial``, renamed to FILE when the run ends:
a run that is killed or interrupted leaves ``FILE.partial`` (every row scored so far) and
FILE, if it exists, is still the previous run's. Text fields starting with ``=``, ``+``, ``-``,
``@``, tab or carriage return get a leading ``'`` so spreadsheets do not run them as formulas.
Heatmaps are named ``NNNNN_<image name>.png`` (NNNNN: the image's row, from 0); names that
would pass 255 bytes are shortened, keeping the row number and a hash of the full name.

``--ray [ADDRESS]`` runs ``fit`` and ``score`` on a Ray cluster (``auto``, ``host:port``,
``ray://host:port``; alone: a private Ray on this machine): the same model file and the same
CSV rows as a local run (core/ray_fit.py, core/ray_score.py). Without it Ray is not imported.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from . import __version__
from .errors import OkngError
from .recipes import RECIPE_SUFFIX


def _progress_bar(total: int, desc: str, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False)


def _drive(gen, desc: str, on_item=None):
    """Run a job with a progress bar; report skipped files as they happen and hand each
    streamed item to ``on_item(index, item)``."""
    from .jobs import Skipped

    bar, training = None, False
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            if bar is not None:
                bar.close()
            return stop.value
        if bar is None and p.total:
            bar = _progress_bar(p.total, desc)
        if bar is not None:
            if p.unit == "epoch" and not training:
                # a trained model's epochs follow the images (core.models.trained)
                training = True
                bar.close()
                bar = _progress_bar(p.total, "train", unit=p.unit)
            bar.n = p.done
            if training:
                bar.set_postfix_str(p.message.split(": ", 1)[-1], refresh=False)
            bar.refresh()
        if isinstance(p.item, Skipped):
            print(f"skipped {p.item.path}: {p.item.reason}", file=sys.stderr)
        if on_item is not None and p.item is not None:
            on_item(p.done - 1, p.item)
        p = None  # the item (a tiled model's full-resolution map) goes before the next is made


def _paths(inputs: list[str]) -> list[str]:
    from .imageio import iter_image_paths

    missing = [item for item in inputs if not Path(item).exists()]
    if missing:
        raise OkngError(f"not found: {', '.join(missing)}")
    paths, empty = [], []
    for item in inputs:
        found = [str(p) for p in iter_image_paths([item])]
        if not found and Path(item).is_dir():
            empty.append(item)
        paths += found
    if not paths:  # one message: the error says it all
        raise OkngError(f"no images found in {' '.join(inputs)}")
    for item in empty:  # the others had images: the run goes on, and says which gave none
        print(f"okng: warning: no images found in folder {item}", file=sys.stderr)
    return paths


#: first characters that make a spreadsheet read a cell as a formula (CSV injection)
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(text: str) -> str:
    """Neutralise a text cell a spreadsheet would evaluate: ``=cmd|...`` -> ``'=cmd|...``."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


#: longest file name most file systems take (bytes)
NAME_MAX = 255


def heatmap_name(index: int, image_path: str, max_bytes: int = NAME_MAX) -> str:
    """``NNNNN_<stem>.png``; shortened on a character boundary when over ``max_bytes``
    (UTF-8), with 8 hex digits of the full stem's hash so the name still says which image.
    Names stay unique: the row number is always kept."""
    import hashlib

    stem = Path(image_path).stem
    name = f"{index:05d}_{stem}.png"
    if len(name.encode("utf-8")) <= max_bytes:
        return name
    tag = "~" + hashlib.sha256(stem.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    budget = max_bytes - len(f"{index:05d}_{tag}.png".encode())
    cut = stem.encode("utf-8", "surrogateescape")[:budget].decode("utf-8", "ignore")
    return f"{index:05d}_{cut}{tag}.png"


def _config_from_args(args: argparse.Namespace):
    """The fit settings: the model's own defaults (:meth:`DetectorConfig.for_model`), then
    every option the user gave."""
    from .detector import DetectorConfig

    params = {}
    if args.epsilon is not None:
        params["epsilon"] = args.epsilon
    for kv in args.param or []:
        key, _, value = kv.partition("=")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    given = {k: getattr(args, k) for k in ("backbone", "image_size", "sigma", "pooling", "topk",
                                            "false_alarm_rate", "seed", "batch_size", "weights")
             if getattr(args, k) is not None}
    if args.stages:
        given["stages"] = tuple(int(s) for s in args.stages.split(","))
    if args.channels is not None:
        given["n_channels"] = None if args.channels == 0 else args.channels
    if args.bit_depth is not None:
        given["bit_depth"] = None if args.bit_depth == "range" else int(args.bit_depth)
    if args.contrast is not None:
        given["contrast"] = None if args.contrast == "as-is" else args.contrast
    if args.tile is not None:
        given["tile"] = args.tile
    if args.overlap is not None:
        given["tile_overlap"] = args.overlap
    if args.weights and args.weights != "random":
        # stored resolved: a relative path would point elsewhere from another folder
        given["weights"] = str(Path(args.weights).expanduser().resolve())
    return DetectorConfig.for_model(args.model, model_params=params, **given)


def tile_option(text: str) -> int | str:
    """``--tile``: a whole number of pixels or ``auto`` (the range is checked with the settings)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a tile size in pixels or 'auto', not {text!r}") from None


def _check_scored_as_fitted(args: argparse.Namespace, det) -> None:
    """``okng score --tile/--overlap`` may only restate the model's own tiling: a model is
    always scored the way it was fitted (its file records the tiling)."""
    cfg = det.config
    tile = getattr(args, "tile", None)
    overlap = getattr(args, "overlap", None)
    # "auto" restates whatever the fit resolved it to (the same flags may go to fit and score)
    wrong_tile = tile is not None and tile != "auto" and tile != (cfg.tile if cfg.tiled else None)
    wrong_overlap = overlap is not None and overlap != cfg.tile_overlap
    if wrong_tile or wrong_overlap:
        fitted = (f"tiles of {cfg.tile} pixels overlapping by {cfg.tile_overlap}" if cfg.tiled
                  else "whole images (no tiling)")
        raise ValueError(f"this model was fitted on {fitted} and is always scored that way; "
                         "to inspect otherwise, refit with okng fit --tile N [--overlap K]")


def _ray_options(args: argparse.Namespace):
    """The Ray settings of ``--ray`` and friends, or None without ``--ray``."""
    if args.ray is None:
        return None
    from .ray_cluster import RayOptions, check_address

    for opt in ("ray_cpus", "ray_threads", "ray_chunk"):
        value = getattr(args, opt, None)
        if value is not None and value < 1:
            raise ValueError(f"--{opt.replace('_', '-')} must be at least 1, got {value}")
    address = None if args.ray == _PRIVATE_RAY else check_address(args.ray)
    return RayOptions(address, args.ray_cpus, args.ray_threads or 1, getattr(args, "ray_chunk", None))


def _held_out_by(model: str) -> tuple[str, ...]:
    """The images ``model`` held out to calibrate (``--hold-out-like``), read from its file
    without building it; a model file older than that list says so and holds none out again."""
    from .model_file import read_checked

    meta, _, _ = read_checked(model)
    held = tuple(meta.get("calibration_paths") or ())
    if not held:
        print(f"okng: warning: {model} lists no held-out images (saved before they were kept, or "
              "fitted without any): the held-out share is dealt afresh", file=sys.stderr)
    return held


def cmd_fit(args: argparse.Namespace) -> int:
    from .jobs import CancelToken, fit_job
    from .persistence import save_detector
    from .thresholds import false_alarm_statement, lone_part_text

    paths = _paths(args.paths)
    config = _config_from_args(args)
    _check_output(args.out, "--out")
    if args.recipe:
        _check_new_recipe(args.recipe)
    ray = _ray_options(args)
    if ray is not None and config.tile is not None:
        raise ValueError("--ray does not fit tiled models yet: fit with --tile without --ray")
    held_before = _held_out_by(args.hold_out_like) if args.hold_out_like else ()
    if ray is not None:
        from .ray_fit import ray_fit_job

        job = ray_fit_job(paths, config, CancelToken(), ray, runtime="torch", held_before=held_before)
    else:
        # no inspection here: the embedding graph is only exported, next to the model file
        job = fit_job(paths, config, CancelToken(), runtime="torch", held_before=held_before)
    result = _drive(job, "fit")
    for s in result.skipped:
        print(f"skipped {s.path}: {s.reason}", file=sys.stderr)
    out = save_detector(result.detector, args.out)
    _export_graph(result.detector, out)
    det = result.detector
    th = det.thresholds
    msg = (f"fitted {config.model} on {len(result.fitted) + len(result.calibration)} OK images "
           f"in {result.seconds:.1f} s -> {out}")
    if th is not None:
        msg += (f"\nimage threshold {th.image:.4g}, pixel threshold {th.pixel:.4g}"
                f"\nexpected false alarms: {false_alarm_statement(th)[0]}")
        if lone := lone_part_text(th, result.calibration):
            msg += f"\nnote: {lone}"
    if getattr(det.model, "trains", False) and det.model.history:
        best = min(det.model.history, key=lambda h: h[2])
        msg += (f"\ntrained {len(det.model.history)} epochs, stopped by {det.model.stop_reason}; kept epoch "
                f"{best[0]} (held-out loss {best[2]:.4g})")
    if args.recipe:
        msg += f"\nrecipe {_write_fit_recipe(args.recipe, out, paths, config)} (okng serve and the station open it)"
    print(msg)
    _warn_uncalibrated(det)
    return 0


def _check_new_recipe(path: str) -> None:
    """``--recipe`` names a new file: a recipe made in the station holds more than a fit gives
    (thresholds set by hand, labels, a PIN, line settings), so it is never replaced here."""
    from .recipes import RECIPE_SUFFIX

    if not path.lower().endswith(RECIPE_SUFFIX):
        raise OkngError(f"--recipe {path}: a recipe file ends with {RECIPE_SUFFIX} (nothing was done)")
    if Path(path).exists():
        raise OkngError(f"--recipe {path} exists: give a new name, or refit that recipe in the station (F5), which "
                        "keeps its thresholds, labels and settings (nothing was done)")
    _check_output(path, "--recipe")


def _write_fit_recipe(path: str, model: Path, paths: list[str], config) -> Path:
    """A recipe of the fit just made: its OK images, settings and model, the model's own
    thresholds (found trying the station: a model fitted with ``okng fit`` could not be served,
    and nothing documented how to make the recipe ``okng serve`` needs)."""
    from .recipes import Recipe, save_recipe

    target = Path(path).expanduser().absolute()
    recipe = Recipe(target.stem, [str(Path(p).absolute()) for p in paths], config.to_dict(),
                    str(Path(model).absolute()))
    return save_recipe(recipe, target)


def _check_output(path: str | None, option: str, folder_itself: bool = False) -> None:
    """Refuse an output that could not be written before the work, not after it (a fit or a
    simulation of minutes lost to a read-only share): its folder must exist and take a new
    file. ``folder_itself``: ``path`` is a folder to write in (made if missing)."""
    if not path:
        return
    # not resolved: a save writes beside the name it is given (a link is replaced, not followed)
    target = Path(path).expanduser().absolute()
    if not folder_itself and target.is_dir():  # a file cannot replace a folder: say so now
        raise OkngError(f"{option} {path}: it is a folder; give a file name inside it (nothing was done)")
    folder = target if folder_itself and target.is_dir() else target.parent
    if not folder.is_dir():
        raise OkngError(f"{option} {path}: folder {Path(path).parent} does not exist (nothing was done)")
    try:
        handle, probe = tempfile.mkstemp(prefix=".okng-write-test-", dir=folder)
    except OSError as exc:
        reason = exc.strerror or exc
        raise OkngError(f"{option} {path}: cannot write in {folder} ({reason}; nothing was done)") from None
    os.close(handle)
    try:
        os.unlink(probe)
    except OSError:  # a folder that takes files but lets nobody delete them: the save still works
        logging.getLogger(__name__).warning("could not remove the write test %s", probe)


def _export_graph(det, model_path: Path) -> None:
    """Export the embedding graph beside a new model file now, so that the first ``okng
    score`` does not; a failure is logged, never an error (scoring falls back to torch)."""
    from .runtime import ensure_graph

    try:
        ensure_graph(det.embedder, model_path)
    except Exception as exc:  # noqa: BLE001 - the fast path is optional
        logging.getLogger(__name__).warning("embedding graph not exported (%s); scoring will export or use torch",
                                            exc)


def _load(args, lean: bool = False):
    """``--model`` is a model file, an exported bundle folder, or a recipe (its model with the
    recipe's thresholds), embedding on ``--runtime`` (inspection commands) or PyTorch. A forced
    runtime that cannot run says why on stderr and the run goes on with PyTorch.

    ``lean``: score without importing PyTorch when the model allows it
    (:mod:`core.lean_inspection`: a PaDiM model file whose graph and derived state are
    cached, or a bundle, on ONNX Runtime or OpenVINO); otherwise the full detector."""
    from .bundle import is_bundle

    runtime = getattr(args, "runtime", None)
    path = Path(args.model)
    recipe = path.is_file() and _is_recipe(path)
    det = None
    if lean and not recipe:
        from .lean_inspection import load_lean

        def full_on_torch():  # a runtime failing mid-run: PyTorch takes over, as in the detector
            from .persistence import load_detector

            return load_detector(path, runtime="torch")

        det = load_lean(path, runtime, fallback=None if is_bundle(path) else full_on_torch)
    if det is None:
        det = _load_full(args, runtime, recipe)
    if runtime not in (None, "auto") and det.runtime_name != runtime:
        for note in det.runtime_notes:
            print(f"okng: {note}", file=sys.stderr)
        print(f"okng: {runtime} is not available; running on {det.runtime_name}", file=sys.stderr)
    logging.getLogger(__name__).info("embedding runtime: %s", det.runtime_name)
    return det


def _load_full(args, runtime: str | None, recipe: bool):
    from .bundle import is_bundle, load_bundle
    from .persistence import load_detector
    from .runtime import load_for_inspection

    if is_bundle(args.model):
        return load_bundle(args.model, runtime)
    if recipe:
        return _load_recipe_model(Path(args.model), runtime)
    if hasattr(args, "runtime"):  # inspection only: no backbone code when the graph is cached
        return load_for_inspection(args.model, runtime)
    return load_detector(args.model, runtime="torch")


def _is_recipe(path: Path) -> bool:
    """A recipe by its content (SQLite), or by its name: a damaged ``.okrecipe`` is then
    refused as a recipe, not as a model file."""
    if path.suffix.lower() == RECIPE_SUFFIX:
        return True
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def _load_recipe_model(path: Path, runtime: str | None = None):
    from dataclasses import replace

    from .persistence import load_detector
    from .recipes import load_recipe

    recipe = load_recipe(path)
    if not recipe.model_path or not Path(recipe.model_path).is_file():
        raise OkngError(f"recipe {path} has no fitted model yet: fit it in the station (F5) or with okng fit")
    det = load_detector(recipe.model_path, runtime=runtime)
    if det.thresholds is not None and recipe.image_threshold is not None and recipe.pixel_threshold is not None:
        det.thresholds = replace(det.thresholds, image=recipe.image_threshold, pixel=recipe.pixel_threshold)
    print(f"okng: using the model of recipe {recipe.name}: {recipe.model_path}", file=sys.stderr)
    return det


def _warn_uncalibrated(det) -> None:
    if det.thresholds is None:
        print("okng: warning: the model has no calibrated threshold (fitted on fewer than 5 OK images): "
              "every verdict is '?' (no verdict) — never counted as OK. Refit on more OK images.",
              file=sys.stderr)


def _heatmap_png(m, scale: float):
    import cv2
    import numpy as np

    img = np.clip(m / max(scale, 1e-9) * 255.0, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(img, cv2.COLORMAP_JET)


def heatmap_image(m, thresholds):
    """The colour heatmap of an anomaly map: twice the pixel threshold is full scale (the
    map's own maximum without thresholds)."""
    return _heatmap_png(m, 2.0 * thresholds.pixel if thresholds else float(m.max()))


def _heat_dir(arg: str | None) -> Path | None:
    if not arg:
        return None
    d = Path(arg)
    if d.exists() and not d.is_dir():
        raise OkngError(f"--heatmaps {arg}: a file of that name exists; give a folder")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from .atomic import describe_error

        raise OkngError(f"cannot create heatmap folder {arg}: {describe_error(exc)}") from None
    return d


def _write_heatmap(path: Path, img) -> None:
    """Encode then write with Python, so a failed write is an error, never a silent
    zero-byte file (cv2.imwrite only returns False)."""
    import cv2

    from .atomic import SaveError

    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise SaveError(f"cannot save heatmap {path}: PNG encoding failed")
    _write_png(path, buf.tobytes())


def _write_png(path: Path, data: bytes) -> None:
    from .atomic import SaveError, describe_error

    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as exc:
        try:
            path.unlink()
        except OSError:
            pass
        raise SaveError(f"cannot save heatmap {path}: {describe_error(exc)}") from None


def _warm_kernel_in_background():
    """Load the compiled scoring kernel (numba and its cache: ~1 s of a fresh process) on a
    thread while the model file is read and the runtime opened; the first score waits for it
    (:func:`core.models.mahalanobis.warm_up` holds the kernel's lock). Models that do not use
    it only lose that thread's time."""
    import threading

    def warm() -> None:
        try:
            from .models.mahalanobis import warm_up

            warm_up()
        except Exception:  # noqa: BLE001 - the first score compiles it, or falls back to torch.bmm
            pass

    thread = threading.Thread(target=warm, name="okng-kernel-warm-up", daemon=True)
    thread.start()
    return thread


def result_row(r) -> dict:
    """The CSV row of one result: a :class:`~core.jobs.ScoredImage` (local run), a
    :class:`~core.ray_score.ScoredRow` (Ray worker) or a :class:`~core.jobs.Skipped` file."""
    from .jobs import ScoredImage, Skipped

    if isinstance(r, Skipped):
        return {"path": csv_safe(r.path), "score": "", "verdict": "ERROR", "peak": "", "error": csv_safe(r.reason)}
    score, verdict, peak = ((r.inspection.score, r.inspection.verdict, r.inspection.peak)
                            if isinstance(r, ScoredImage) else (r.score, r.verdict, r.peak))
    return {"path": csv_safe(r.path), "score": f"{score:.6g}", "verdict": verdict, "peak": f"{peak:.6g}", "error": ""}


def _score_job(args: argparse.Namespace, ray, det, paths: list[str], heat: bool):
    """The scoring job: local, or on Ray with ``--ray`` (the model file travels as bytes)."""
    from .jobs import CancelToken, inspect_job

    if ray is None:
        return inspect_job(paths, det, CancelToken())
    from .ray_score import ray_inspect_job

    return ray_inspect_job(paths, _model_bytes(args, det), det.runtime_name, det.config.batch_size, ray,
                           CancelToken(), heatmaps=heat)


def _model_bytes(args: argparse.Namespace, det) -> bytes:
    """The model file as loaded: the file itself, or (bundle, recipe) the loaded detector
    with its thresholds, saved to a temporary file."""
    import tempfile

    from .bundle import is_bundle
    from .persistence import save_detector

    path = Path(args.model)
    if path.is_file() and not _is_recipe(path):
        return path.read_bytes()
    if is_bundle(args.model):
        return (path / "model.okng").read_bytes()
    with tempfile.TemporaryDirectory(prefix="okng-ray-") as tmp:
        saved = save_detector(det.copy(), Path(tmp) / "model.okng", cache_derived=False)
        return saved.read_bytes()


def cmd_score(args: argparse.Namespace) -> int:
    ray = _ray_options(args)
    warming = _warm_kernel_in_background() if ray is None else None  # Ray workers score elsewhere
    try:
        return _score(args, ray, _load(args, lean=ray is None))
    finally:
        if warming is not None:
            warming.join()  # an early error must not end the process while numba is loading


def _score(args: argparse.Namespace, ray, det) -> int:
    import io

    from .jobs import ScoredImage

    _check_scored_as_fitted(args, det)
    _warn_uncalibrated(det)
    paths = _paths(args.paths)
    heat_dir = _heat_dir(args.heatmaps)
    fields = ["path", "score", "verdict", "peak", "error"]
    out = None
    if args.csv:
        from .atomic import PartialFile

        out = PartialFile(args.csv)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)

    def emit(row: dict | None) -> None:
        w.writeheader() if row is None else w.writerow(row)
        text = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        if out is not None:
            out.write(text)  # flushed: a killed run keeps every row in FILE.partial
        else:
            sys.stdout.write(text)
            sys.stdout.flush()

    counts = {"OK": 0, "NG": 0, "?": 0, "ERROR": 0}

    def on_item(i: int, r) -> None:
        row = result_row(r)
        if heat_dir and row["verdict"] != "ERROR":
            if isinstance(r, ScoredImage):
                _write_heatmap(heat_dir / heatmap_name(i, r.path), heatmap_image(r.inspection.anomaly_map,
                                                                                 det.thresholds))
            else:  # rendered by the Ray worker
                _write_png(heat_dir / heatmap_name(i, r.path), r.heatmap_png)
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
        emit(row)

    try:
        emit(None)
        _drive(_score_job(args, ray, det, paths, heat_dir is not None), "score", on_item=on_item)
    except BaseException:
        if out is not None and out.path.exists() and not out.closed:
            out.keep()
            print(f"okng: the run did not finish: the rows scored so far are in {out.path}; "
                  f"{args.csv} is not this run's result", file=sys.stderr)
        raise
    if out is not None:
        out.commit()
    n = sum(counts.values())
    no_verdict = f", {counts['?']} without a verdict (no threshold)" if counts["?"] else ""
    print(f"{n} image{'' if n == 1 else 's'}: {counts['NG']} NG, {counts['OK']} OK{no_verdict}, "
          f"{counts['ERROR']} not inspected (runtime {det.runtime_name})",
          file=sys.stderr)
    if n and counts["ERROR"] == n:  # a script must be able to tell that nothing was judged
        print(f"okng: error: none of the {n} image{'' if n == 1 else 's'} could be inspected", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .bundle import export_bundle
    from .persistence import load_detector

    _check_output(args.out, "--out", folder_itself=True)  # the bundle's folder, or its parent to make it in
    model = Path(args.model)
    # a recipe stands for its model and its thresholds, as for score and eval
    det = (_load_recipe_model(model, runtime="torch") if model.is_file() and _is_recipe(model)
           else load_detector(args.model, runtime="torch"))
    out = export_bundle(det, args.out)
    print(f"exported {args.model} -> {out} (model.okng, embedding.onnx, bundle.json)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_job
    from .jobs import CancelToken

    _check_output(args.json, "--json")
    det = _load(args)
    ev = _drive(evaluate_job(det, _paths(args.ok), _paths(args.ng), CancelToken()), "eval")
    try:  # the figures first: a late --json failure loses nothing shown
        print(f"OK images {ev.n_ok}, NG images {ev.n_ng}")
        print(f"image AUROC      {ev.image_auroc:.4f}")
        print(f"FPR at 95% TPR   {ev.fpr_at_95_tpr:.4f}")
        if ev.at_threshold is not None:
            a = ev.at_threshold
            print(f"at threshold {ev.threshold:.4g}: false-alarm rate {a['false_alarm_rate']:.3f}, "
                  f"detection rate {a['detection_rate']:.3f}, F1 {a['f1']:.3f}")
        print(f"best-F1 threshold {ev.best_f1_threshold:.4g} (F1 {ev.best_f1:.3f})")
        print(f"(runtime {det.runtime_name})", file=sys.stderr)  # as okng score's summary says it
    finally:  # and the file even when the reader of the figures left (a closed pipe)
        _write_json(args.json, ev.to_dict())
    return 0


def cmd_simulate_feedback(args: argparse.Namespace) -> int:
    from .jobs import CancelToken
    from .simulate import simulate_feedback_job

    try:
        clicks = [int(c) for c in args.clicks.split(",")]
    except ValueError:
        raise ValueError(f"--clicks takes comma-separated numbers, got {args.clicks!r}") from None
    if any(c < 0 for c in clicks):
        raise ValueError(f"--clicks takes click counts of 0 or more, got {args.clicks!r}")
    _check_output(args.json, "--json")
    det = _load(args)
    res = _drive(simulate_feedback_job(det, _paths(args.pool), _paths(args.ok), _paths(args.ng), clicks,
                                       CancelToken(), reweight=args.reweight), "simulate")
    try:  # the table first: a late --json failure loses nothing shown
        print(f"{'clicks':>6} {'false alarms':>12} {'detection':>9} {'AUROC':>7} {'FPR@95':>7} {'threshold':>9} "
              f"{'defects flipped':>15}")
        for c in res.checkpoints:
            print(f"{c.clicks:>6} {c.false_alarm_rate:>12.3f} {c.detection_rate:>9.3f} {c.auroc:>7.4f} "
                  f"{c.fpr_at_95_tpr:>7.3f} {c.threshold:>9.4g} {c.defects_flipped:>15}")
        if res.pool_exhausted and res.checkpoints[-1].clicks == 0:
            print(f"no image of the pool ({len(_paths(args.pool))}) was judged NG: nothing to click "
                  f"(give --pool good parts the station flags)", file=sys.stderr)
        elif res.pool_exhausted:
            clicks = res.checkpoints[-1].clicks
            print(f"the pool ran out after {clicks} click{'' if clicks == 1 else 's'}", file=sys.stderr)
    finally:  # and the file even when the reader of the table left (a closed pipe)
        _write_json(args.json, res.to_dict())
    return 0


def _write_json(path: str | None, d: dict) -> None:
    if path:
        from .atomic import write_bytes_atomic

        write_bytes_atomic(path, json.dumps(d, indent=2).encode())


def cmd_models(args: argparse.Namespace) -> int:
    from .models import MODELS

    for name, cls in MODELS.items():
        print(f"{name}\t{cls.summary}")
    return 0


def _add_plugin_commands(sub: argparse._SubParsersAction) -> None:
    """Commands other installed packages add (the station window's ``gui`` and ``demo``),
    found through the ``okng.commands`` entry-point group: the engine never imports the GUI."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="okng.commands"):
        try:
            ep.load()(sub)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break `okng score`
            logging.getLogger(__name__).warning("okng: command plugin %s unavailable: %s", ep.name, exc)


def _add_runtime_option(p: argparse.ArgumentParser) -> None:
    from .graph_runtime import CHOICES

    p.add_argument("--runtime", choices=CHOICES, default=None,
                   help="what runs the backbone: auto (default, or $OKNG_RUNTIME: the fastest installed), "
                        "torch, onnxruntime, openvino")


#: ``--ray`` given without an address: start a private Ray on this machine
_PRIVATE_RAY = "<private>"


def _add_ray_options(p: argparse.ArgumentParser, chunk: bool) -> None:
    p.add_argument("--ray", nargs="?", const=_PRIVATE_RAY, default=None, metavar="ADDRESS",
                   help="run on Ray (pip install 'okng-station[ray]'): auto, host:port or ray://host:port; "
                        "alone: a Ray on this machine. Every node needs the station and the images' paths")
    p.add_argument("--ray-cpus", type=int, metavar="N", help="CPUs of the Ray --ray starts here (default: all)")
    p.add_argument("--ray-threads", type=int, metavar="N",
                   help="CPUs and PyTorch threads per Ray task (default 1)")
    if chunk:
        p.add_argument("--ray-chunk", type=int, metavar="N",
                       help="images per Ray task, whole batches (default 8 batches)")


def build_parser() -> argparse.ArgumentParser:
    from .config import DetectorConfig
    from .models import KINDS

    D = DetectorConfig.defaults()  # written once (core/config.py); no model import: `okng score` needs no torch

    p = argparse.ArgumentParser(prog="okng", description="OK/NG Station: visual anomaly inspection")
    p.add_argument("--version", action="version", version=f"okng {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="fit a normality model on OK images")
    f.add_argument("paths", nargs="+", metavar="PATH", help="OK image files or folders")
    f.add_argument("--out", required=True, metavar="MODEL", help="model file to write (.okng)")
    f.add_argument("--recipe", metavar="RECIPE",
                   help="also write a new recipe (.okrecipe) with this model, these OK images and settings: what "
                        "okng serve and the station open")
    f.add_argument("--hold-out-like", metavar="MODEL",
                   help="a refit: hold out again the images MODEL held out to calibrate (those still "
                        "given), so its thresholds do not move because the held-out share was re-dealt")
    f.add_argument("--model", default="padim", choices=sorted(KINDS), help="normality model")
    f.add_argument("--backbone", help=f"timm model name (default {D.backbone}, works offline)")
    f.add_argument("--weights", help="local backbone weights file (.safetensors or state dict)")
    f.add_argument("--image-size", type=int, metavar="N", help=f"network input size, square (default {D.image_size})")
    f.add_argument("--stages", help="feature stages, comma separated timm indices (default "
                                    f"{','.join(map(str, D.stages))})")
    f.add_argument("--channels", type=int, help="random channel subset size, 0 = all (default: the "
                                                f"model's own, {D.n_channels} for the PaDiM family)")
    f.add_argument("--epsilon", type=float, help="covariance regularisation (default 0.01)")
    f.add_argument("--param", action="append", metavar="KEY=VALUE", help="extra model parameter")
    f.add_argument("--sigma", type=float, help=f"Gaussian blur of the map, pixels (default {D.sigma:g})")
    f.add_argument("--pooling", choices=["max", "topk", "blob"], help=f"image score pooling (default {D.pooling})")
    f.add_argument("--topk", type=int, help=f"pixels averaged by topk pooling (default {D.topk})")
    f.add_argument("--false-alarm-rate", type=float,
                   help=f"target for the calibrated threshold (default {D.false_alarm_rate:g})")
    f.add_argument("--batch-size", type=int, help=f"images per backbone pass (default {D.batch_size})")
    f.add_argument("--seed", type=int, help=f"seed of the channel subset (default {D.seed})")
    f.add_argument("--bit-depth", choices=["range", "8", "10", "12", "14", "16"],
                   help="16-bit images: scale by each image's own range (default) or by this fixed bit "
                        "depth (keeps absolute brightness; e.g. 12 for a 12-bit camera)")
    f.add_argument("--contrast", choices=["as-is", "stretch", "flatten"],
                   help="grey levels before the network: as recorded (default); stretch: each image's 1st..99th "
                        "percentile to the full range (parts whose exposure varies); flatten: each image's shading "
                        "(brightness changing slowly across the part) taken out, then stretched (parts whose "
                        "lighting varies too). Not with --tile")
    f.add_argument("--tile", type=tile_option, metavar="N|auto",
                   help="inspect large images as N x N pixel tiles, each seen at --image-size, stitched into one "
                        "map at the image's own size; auto: tiles of --image-size when the images are at least "
                        "twice that (default: the whole image scaled to --image-size)")
    f.add_argument("--overlap", type=int, metavar="K", help="least overlap of neighbouring tiles, pixels "
                                                           "(default: an eighth of the tile)")
    _add_ray_options(f, chunk=False)
    f.set_defaults(func=cmd_fit)

    s = sub.add_parser("score", help="score images with a model")
    s.add_argument("--model", required=True, metavar="MODEL")
    s.add_argument("paths", nargs="+", metavar="PATH")
    s.add_argument("--csv", metavar="FILE", help="write results here instead of stdout")
    s.add_argument("--heatmaps", metavar="DIR", help="write a colour heatmap PNG per image")
    s.add_argument("--tile", type=tile_option, metavar="N|auto",
                   help="check that the model inspects N-pixel tiles (a model is always scored with the tiling "
                        "it was fitted with, recorded in its file)")
    s.add_argument("--overlap", type=int, metavar="K", help="check the model's tile overlap likewise")
    _add_runtime_option(s)
    _add_ray_options(s, chunk=True)
    s.set_defaults(func=cmd_score)

    e = sub.add_parser("eval", help="evaluate a model on labelled OK and NG images")
    e.add_argument("--model", required=True, metavar="MODEL")
    e.add_argument("--ok", nargs="+", required=True, metavar="PATH")
    e.add_argument("--ng", nargs="+", required=True, metavar="PATH")
    e.add_argument("--json", metavar="FILE")
    _add_runtime_option(e)
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("export", help="write a model as a bundle other tools and line PCs can run")
    x.add_argument("model", metavar="MODEL", help="model file (.okng), or a recipe (its model and thresholds)")
    x.add_argument("--out", required=True, metavar="DIR", help="bundle folder to write")
    x.set_defaults(func=cmd_export)

    sf = sub.add_parser("simulate-feedback", help="measure what false-alarm clicks would buy (model unchanged)")
    sf.add_argument("--model", required=True, metavar="MODEL",
                    help="a fitted model file (.okng), an exported bundle folder, or a recipe (.okrecipe)")
    sf.add_argument("--pool", nargs="+", required=True, metavar="PATH", help="unseen OK images to click on")
    sf.add_argument("--ok", nargs="+", required=True, metavar="PATH", help="held-out OK images")
    sf.add_argument("--ng", nargs="+", required=True, metavar="PATH", help="held-out defective images")
    sf.add_argument("--clicks", default="5,10,20", help="checkpoints, comma separated (default: 5,10,20)")
    sf.add_argument("--reweight", action="store_true", help="also learn per-channel weights (off by default)")
    sf.add_argument("--json", metavar="FILE", help="also write the checkpoints as JSON to FILE")
    sf.set_defaults(func=cmd_simulate_feedback)

    m = sub.add_parser("models", help="list the available normality models")
    m.set_defaults(func=cmd_models)

    from .line import command as line_command  # the parser only: no protocol library is imported

    line_command.add_parser(sub)

    _add_plugin_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")
    # the line's warnings (an image skipped as another part's, a result presented again after a
    # crash) are for the operator of okng serve even without -v; asyncua's INFO (1,100 lines at
    # start-up, found on a night shift) is not, even with it
    logging.getLogger("core.line").setLevel(logging.INFO if args.verbose else logging.WARNING)
    for chatty in ("asyncua", "pymodbus"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from .allocator import tune_allocator

    tune_allocator()
    try:
        return int(args.func(args) or 0)
    except OkngError as exc:
        print(f"okng: error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"okng: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("okng: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `okng score ... | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # what no command foresaw (a folder that cannot be made...): one line
        logging.getLogger(__name__).debug("unforeseen OS error", exc_info=True)  # --verbose keeps the trace
        names = " -> ".join(str(n) for n in (exc.filename, exc.filename2) if n)
        print(f"okng: error: {exc.strerror or exc}: {names}".rstrip(": "), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
