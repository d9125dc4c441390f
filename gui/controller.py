"""StationController: the session state and every user intent that touches the engine.

Lives in the GUI thread and is the only mutator of the session (recipe, OK images, detector,
thresholds, results). Long work goes to the runner as generator jobs over immutable inputs;
results come back as signals and are applied here. Threshold changes re-judge stored scores
and maps; they never re-run the model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from PySide6.QtCore import QObject, QTimer, Signal, Slot

from core import DetectorConfig, Thresholds, find_regions, fit_job, inspect_job, iter_image_paths
from core import load_detector, load_image, save_detector, verdict
from core.errors import OkngError
from core.jobs import FitResult, Progress, ScoredImage, Skipped
from core.recipes import Recipe, load_recipe, model_path_for, save_recipe
from core.recipes import safe_file_stem
from core.sources import CapturedFrame, FolderWatchSource, VideoSource, capture_job, live_job

from .feedback import FeedbackController, model_id_for

log = logging.getLogger(__name__)
MAX_RESULTS = 500
KEEP_IMAGES = 50  # decoded images kept for redisplay; older file results are re-read from disk
DEMO_RECIPE_NAME = "ELPV mono cells (demo)"


@dataclass
class ResultRecord:
    id: int
    name: str
    score: float
    verdict: str
    anomaly_map: np.ndarray  # (S, S) float32, read-only
    image: np.ndarray | None
    path: str | None
    seconds: float
    thumbnail: np.ndarray | None = None


@dataclass(frozen=True)
class Display:
    """Everything the inspection view needs for one result."""

    name: str
    image: np.ndarray
    anomaly_map: np.ndarray
    contours: list
    verdict: str
    score: float
    image_threshold: float | None
    pixel_threshold: float | None
    vmax: float | None


def _thumb(img: np.ndarray, size: int = 48) -> np.ndarray:
    step = max(1, min(img.shape[:2]) // size)
    return np.ascontiguousarray(img[::step, ::step])


class StationController(QObject):
    model_changed = Signal()
    ok_paths_changed = Signal(list)
    recipe_changed = Signal(str)
    thresholds_changed = Signal(float, float)
    results_changed = Signal()  # verdicts re-judged or list cleared
    result_added = Signal(object)  # ResultRecord
    display_changed = Signal(object)  # Display of the shown result
    busy_changed = Signal(bool)
    progress = Signal(int, int, str)
    live_changed = Signal(bool)
    status = Signal(str)
    error = Signal(str)

    def __init__(self, runner, parent: QObject | None = None, labels_dir: str | Path | None = None,
                 captures_dir: str | Path | None = None) -> None:
        super().__init__(parent)
        self.runner = runner
        self.captures_root = Path(captures_dir) if captures_dir is not None else None  # for unsaved recipes
        self._captured: list[str] = []
        self.recipe = Recipe("untitled", config=DetectorConfig().to_dict())
        self.recipe_path: Path | None = None
        self.detector = None
        self.extractor = None
        self.image_threshold: float | None = None
        self.pixel_threshold: float | None = None
        self.results: dict[int, ResultRecord] = {}
        self.shown_id: int | None = None
        self.demo_stream: list[str] = []
        self.demo_truth: dict[str, str] = {}
        self.live = False
        self._next_id = 1
        self._skipped: list[Skipped] = []
        self._render_pending = False
        self.feedback = FeedbackController(self, labels_dir)  # click-to-label (gui/feedback.py)
        runner.progress.connect(self._on_runner_progress)
        runner.yielded.connect(self._on_runner_yielded)
        runner.returned.connect(self._on_runner_returned)
        runner.failed.connect(self._on_runner_failed)
        runner.cancelled.connect(self._on_runner_cancelled)
        runner.busy_changed.connect(self.busy_changed)

    # -- recipe & OK set ----------------------------------------------------------------------
    @property
    def config(self) -> DetectorConfig:
        return DetectorConfig.from_dict(dict(self.recipe.config))

    @property
    def ok_paths(self) -> list[str]:
        return list(self.recipe.ok_paths)

    def new_recipe(self, name: str, config: DetectorConfig | None = None, ok_paths: list[str] | None = None) -> None:
        self._stop_live_for_change()
        self.recipe = Recipe(name, list(ok_paths or []), (config or DetectorConfig()).to_dict())
        self.recipe_path = None
        self.demo_stream, self.demo_truth = [], {}
        self._set_detector(None)
        self.feedback.model_replaced(None, "")
        self.feedback.recipe_replaced()
        self.clear_results()
        self.recipe_changed.emit(name)
        self.ok_paths_changed.emit(self.ok_paths)

    def open_demo(self) -> None:
        from core.demo import demo_split

        split = demo_split()
        self.new_recipe(DEMO_RECIPE_NAME, DetectorConfig(), split.ok_train)
        self.demo_stream = split.stream_paths
        self.demo_truth = {c.path: ("OK" if c.is_ok else "NG") for c in split.stream}
        self.recipe_changed.emit(DEMO_RECIPE_NAME)  # again, now that the demo stream is known
        self.status.emit(f"Demo: {len(split.ok_train)} OK cells ready — press Fit (F5)")

    def add_ok_paths(self, inputs: list[str]) -> None:
        known = set(self.recipe.ok_paths)
        new = [str(p) for p in iter_image_paths(inputs) if str(p) not in known]
        new = list(dict.fromkeys(new))
        if not new:
            self.status.emit("No new images found")
            return
        self.recipe.ok_paths.extend(new)
        self.ok_paths_changed.emit(self.ok_paths)
        self.status.emit(f"Added {len(new)} OK images ({len(self.recipe.ok_paths)} in total); refit to use them")

    def remove_ok_paths(self, paths: list[str]) -> None:
        drop = set(paths)
        self.recipe.ok_paths = [p for p in self.recipe.ok_paths if p not in drop]
        self.ok_paths_changed.emit(self.ok_paths)
        self.status.emit(f"Removed {len(drop)} images; refit to apply")

    def capture_folder(self) -> Path:
        """Where captured OK frames go: beside the recipe, or ``<AppData>/captures/<recipe>/`` if unsaved."""
        stem = safe_file_stem(self.recipe.name)
        if self.recipe_path is not None:
            return self.recipe_path.parent / f"{self.recipe_path.stem}.captures"
        if self.captures_root is None:
            from PySide6.QtCore import QStandardPaths

            loc = QStandardPaths.StandardLocation.AppDataLocation
            self.captures_root = Path(QStandardPaths.writableLocation(loc)) / "captures"
        return self.captures_root / stem

    def capture_ok(self, kind: str, target: str, count: int = 1) -> None:
        """Grab ``count`` frames from a camera (index) or video file and add them as OK images."""
        if kind == "folder":
            self.error.emit("Capture needs a camera or a video file: choose one in the Inspect panel.")
            return
        if not target:
            self.error.emit("Enter a camera index or a video file to capture OK images from.")
            return
        if count < 1:
            return
        self._stop_live_for_change()  # a camera cannot be opened twice
        self._captured = []
        folder = self.capture_folder()
        self.runner.submit(partial(capture_job, VideoSource(target), folder, int(count)), tag="capture")
        self.status.emit(f"Capturing {count} OK frame(s) from {kind} {target} into {folder}…")

    # -- jobs ---------------------------------------------------------------------------------------
    # -- model choice (issue 5) ---------------------------------------------------------------------
    #: channel subset each model is fitted with by default (low-rank projects all channels)
    MODEL_CHANNELS = {"padim-lowrank": None}

    @staticmethod
    def available_models() -> list[tuple[str, str]]:
        """(name, one-line summary) of every normality model, for the chooser."""
        from core.models import MODELS

        return [(name, cls.summary) for name, cls in MODELS.items()]

    def set_model(self, name: str) -> None:
        """Choose the normality model for the next fit; its own parameters start at defaults."""
        if name == self.recipe.config.get("model", "padim"):
            return
        cfg = dict(self.recipe.config, model=name, model_params={},
                   n_channels=self.MODEL_CHANNELS.get(name, 100))
        try:
            DetectorConfig.from_dict(dict(cfg))
        except (TypeError, ValueError) as exc:
            self.error.emit(f"Cannot use model {name}: {exc}")
            return
        self.recipe.config = cfg
        self.status.emit(f"Model for the next fit: {name} (press F5 to fit)")

    def start_fit(self) -> None:
        if not self.recipe.ok_paths:
            self.error.emit("Add OK images before fitting a model.")
            return
        self._stop_live_for_change()
        try:
            config = self.config
        except (TypeError, ValueError) as exc:
            self.error.emit(f"Invalid detector settings in the recipe: {exc}")
            return
        self._skipped = []
        self.runner.submit(partial(fit_job, list(self.recipe.ok_paths), config, extractor=self.extractor), tag="fit")
        self.status.emit(f"Fitting on {len(self.recipe.ok_paths)} OK images…")

    def inspect_paths(self, inputs: list[str]) -> None:
        if not self._require_model():
            return
        paths = [str(p) for p in iter_image_paths(inputs)]
        if not paths:
            self.error.emit("No images to inspect were found.")
            return
        self._stop_live_for_change()
        self._skipped = []
        self.runner.submit(partial(inspect_job, paths, self.detector, keep_images=True, batch_size=4), tag="inspect")
        self.status.emit(f"Inspecting {len(paths)} images…")

    def inspect_demo_stream(self) -> None:
        if not self.demo_stream:
            self.error.emit("No demo stream: open the demo first (okng demo).")
            return
        self.inspect_paths(self.demo_stream)

    def start_live(self, kind: str, target: str) -> None:
        if not self._require_model():
            return
        if not target:
            self.error.emit("Enter a camera index, a video file or a folder for live inspection.")
            return
        source = FolderWatchSource(target) if kind == "folder" else VideoSource(target)
        self._skipped = []
        self.live = True  # before submit: a job may end (and report) before submit returns
        self.live_changed.emit(True)
        self.runner.submit(partial(live_job, source, self._current_detector), replace=True, tag="live")
        self.status.emit(f"Live inspection from {kind} {target} — Space or Esc to stop")

    def _current_detector(self):
        return self.detector  # read from the engine thread: a reference read of an immutable snapshot

    def stop_live(self) -> None:
        if self.live:
            self.runner.cancel()

    def cancel(self) -> None:
        if self.runner.busy:
            self.runner.cancel()
            self.status.emit("Cancelling…")

    def _stop_live_for_change(self) -> None:
        if self.live:
            self.runner.cancel()

    def _require_model(self) -> bool:
        if self.detector is None:
            self.error.emit("No model yet: fit the OK images first (F5) or open a recipe.")
            return False
        return True

    # -- runner signals -----------------------------------------------------------------------------
    def _tag(self) -> str:
        cur = self.runner.current
        return cur.tag if cur is not None else ""

    @Slot(object)
    def _on_runner_progress(self, p: Progress) -> None:
        self.progress.emit(p.done, p.total, p.message)

    @Slot(object)
    def _on_runner_yielded(self, item: object) -> None:
        if isinstance(item, Skipped):
            self._skipped.append(item)
            self.status.emit(f"Skipped {Path(item.path).name}: {item.reason}")
        elif isinstance(item, CapturedFrame):
            self._captured.append(item.path)
        elif isinstance(item, ScoredImage):
            self._add_result(item, from_file=self._tag() == "inspect")

    @Slot(object)
    def _on_runner_returned(self, value: object) -> None:
        tag = self._tag()
        if tag == "fit" and isinstance(value, FitResult):
            self.extractor = value.detector.extractor
            self._skipped += value.skipped
            self._set_detector(value.detector)
            self.feedback.model_replaced(value.detector, model_id_for(None, len(value.fitted)))
            msg = f"Model fitted on {len(value.fitted)} images, calibrated on {len(value.calibration)} in {value.seconds:.1f} s"
            if value.detector.thresholds is None:
                msg += " — too few images to calibrate: set the thresholds by hand"
            self.status.emit(msg)
        elif tag == "load":
            self.extractor = value.extractor
            self._set_detector(value, self.recipe.image_threshold, self.recipe.pixel_threshold)
            self.feedback.model_replaced(value, model_id_for(self.recipe.model_path, value.model.n_samples))
            self.status.emit(f"Recipe {self.recipe.name} ready")
        elif tag == "save":
            self._write_recipe_file()
        elif tag == "feedback":
            self.feedback.on_returned(value)
        elif tag in ("inspect", "live"):
            self.status.emit(f"Done: {len(self.results)} results")
        elif tag == "capture" and not self._captured:
            self.error.emit("No frame could be captured: the source delivered no image.")
        self._end_job(tag)

    @Slot(object)
    def _on_runner_failed(self, exc: object) -> None:
        tag = self._tag()
        if tag == "feedback":
            self.feedback.on_failed(exc)
            return
        what = {"fit": "Fit failed", "capture": "Capture failed", "inspect": "Inspection failed", "live": "Live inspection stopped",
                "load": "Could not load the model", "save": "Could not save the model"}.get(tag, "Error")
        self.error.emit(f"{what}: {exc}")
        self._end_job(tag)

    @Slot()
    def _on_runner_cancelled(self) -> None:
        tag = self._tag()
        if tag == "feedback":
            self.feedback.on_failed("cancelled")
            return
        self.status.emit("Live inspection stopped" if tag == "live" else f"{tag or 'job'} cancelled")
        self._end_job(tag)

    def _end_job(self, tag: str) -> None:
        if tag == "capture":  # frames saved before a cancel or an error are kept too
            captured, self._captured = self._captured, []
            if captured:
                self.add_ok_paths(captured)
        if tag == "live":
            self.live = False
            self.live_changed.emit(False)
        if self._skipped and tag in ("fit", "inspect", "live"):
            first = self._skipped[0]
            self.error.emit(f"{len(self._skipped)} image(s) could not be read and were skipped, "
                            f"e.g. {first.path}: {first.reason}")
            self._skipped = []

    # -- detector & thresholds ------------------------------------------------------------------
    def _set_detector(self, det, image_thr: float | None = None, pixel_thr: float | None = None) -> None:
        self.detector = det
        th: Thresholds | None = det.thresholds if det is not None else None
        self.image_threshold = image_thr if image_thr is not None else (th.image if th else None)
        self.pixel_threshold = pixel_thr if pixel_thr is not None else (th.pixel if th else None)
        self._push_thresholds_to_detector()
        self.model_changed.emit()
        if self.image_threshold is not None and self.pixel_threshold is not None:
            self.thresholds_changed.emit(self.image_threshold, self.pixel_threshold)
        self._rejudge()

    def calibration_scores(self) -> np.ndarray:
        th = self.detector.thresholds if self.detector is not None else None
        return np.asarray(th.calibration_scores if th is not None else [], np.float64)

    def calibration_peaks(self) -> np.ndarray:
        th = self.detector.thresholds if self.detector is not None else None
        return np.asarray(th.calibration_peaks if th is not None else [], np.float64)

    def inspected_scores(self) -> np.ndarray:
        return np.array([r.score for r in self.results.values()], np.float64)

    def set_thresholds(self, image: float, pixel: float) -> None:
        """Re-judge every stored result and redraw the shown one; no model work."""
        if (image, pixel) == (self.image_threshold, self.pixel_threshold):
            return
        self.image_threshold, self.pixel_threshold = float(image), float(pixel)
        self._push_thresholds_to_detector()
        self.thresholds_changed.emit(self.image_threshold, self.pixel_threshold)
        self._rejudge()

    def _push_thresholds_to_detector(self) -> None:
        det = self.detector
        if det is None or self.image_threshold is None or self.pixel_threshold is None:
            return
        th = det.thresholds or Thresholds(self.image_threshold, self.pixel_threshold)
        # rebinding the attribute is atomic: a live job sees the old or the new value, never a mix
        det.thresholds = replace(th, image=self.image_threshold, pixel=self.pixel_threshold)

    def _judge(self, score: float) -> str:
        return "?" if self.image_threshold is None else verdict(score, self.image_threshold)

    def _rejudge(self) -> None:
        for r in self.results.values():
            r.verdict = self._judge(r.score)
        self.results_changed.emit()
        self._schedule_render()

    # -- results ------------------------------------------------------------------------------------
    def _add_result(self, item: ScoredImage, from_file: bool) -> None:
        rid = self._next_id
        self._next_id += 1
        name = Path(item.path).name if from_file else item.path
        if item.path in self.demo_truth:
            name += f"  [truth {self.demo_truth[item.path]}]"
        img = item.image
        rec = ResultRecord(rid, name, item.inspection.score, self._judge(item.inspection.score),
                           item.inspection.anomaly_map, img, item.path if from_file else None, item.seconds,
                           _thumb(img) if img is not None else None)
        self.results[rid] = rec
        old = [k for k in self.results if k <= rid - KEEP_IMAGES]
        for k in old:
            if self.results[k].path is not None:
                self.results[k].image = None
        while len(self.results) > MAX_RESULTS:
            del self.results[next(iter(self.results))]
        self.result_added.emit(rec)
        self.show_result(rid)

    def clear_results(self) -> None:
        self.results.clear()
        self.shown_id = None
        self.results_changed.emit()

    def show_result(self, result_id: int) -> None:
        if result_id in self.results:
            self.shown_id = result_id
            self._schedule_render()

    def _schedule_render(self) -> None:
        # several results arriving during one paint collapse into one render of the newest
        if not self._render_pending and self.shown_id is not None:
            self._render_pending = True
            QTimer.singleShot(0, self._render)

    @Slot()
    def _render(self) -> None:
        self._render_pending = False
        d = self.display()
        if d is not None:
            self.display_changed.emit(d)

    def display(self) -> Display | None:
        rec = self.results.get(self.shown_id) if self.shown_id is not None else None
        if rec is None:
            return None
        img = rec.image
        if img is None and rec.path is not None:
            try:
                img = load_image(rec.path)
            except OkngError as exc:
                self.error.emit(str(exc))
                return None
        if img is None:
            img = np.zeros(rec.anomaly_map.shape + (3,), np.uint8)
        contours = []
        if self.pixel_threshold is not None:
            contours = [r.contour for r in find_regions(rec.anomaly_map, self.pixel_threshold)]
        vmax = 2.0 * self.pixel_threshold if self.pixel_threshold else None
        return Display(rec.name, img, rec.anomaly_map, contours, rec.verdict, rec.score,
                       self.image_threshold, self.pixel_threshold, vmax)

    # -- recipes on disk ----------------------------------------------------------------------------
    def open_recipe(self, path: str | Path) -> None:
        path = Path(path)
        try:
            recipe = load_recipe(path)
            DetectorConfig.from_dict(dict(recipe.config))
        except (OkngError, TypeError, ValueError) as exc:
            self.error.emit(f"Cannot open recipe: {exc}")
            return
        self.new_recipe(recipe.name)
        self.recipe, self.recipe_path = recipe, path
        self.feedback.recipe_replaced()  # now the labels beside this recipe
        self.recipe_changed.emit(recipe.name)
        self.ok_paths_changed.emit(self.ok_paths)
        if recipe.model_path and Path(recipe.model_path).is_file():
            mp, ex = recipe.model_path, self.extractor
            self.runner.submit(lambda token: _load_job(mp, ex), tag="load")
            self.status.emit(f"Loading model {Path(mp).name}…")
        else:
            self.status.emit(f"Recipe {recipe.name} opened; no fitted model yet — press Fit (F5)")

    def save_recipe(self, path: str | Path | None = None) -> bool:
        """Save the recipe (and its model beside it). False if there is no path yet."""
        path = Path(path) if path is not None else self.recipe_path
        if path is None:
            return False
        if self.live:
            self.error.emit("Stop live inspection before saving the recipe.")
            return True
        self.feedback.recipe_saved_to(path)
        self.recipe_path = path
        self.recipe.image_threshold, self.recipe.pixel_threshold = self.image_threshold, self.pixel_threshold
        if self.detector is not None:
            model = model_path_for(path)
            self.recipe.model_path = str(model)
            det = self.detector
            self.runner.submit(lambda token: _save_job(det, model), tag="save")
        else:
            self._write_recipe_file()
        return True

    def _write_recipe_file(self) -> None:
        try:
            save_recipe(self.recipe, self.recipe_path)
        except OkngError as exc:
            self.error.emit(str(exc))
            return
        self.status.emit(f"Recipe saved to {self.recipe_path}")

    def shutdown(self, timeout_ms: int = 5000) -> bool:
        return self.runner.shutdown(timeout_ms)


def _load_job(path: str, extractor):
    yield Progress(0, 1, f"loading model {Path(path).name}")
    det = load_detector(path, extractor)
    det.warm_up()  # here, not in the operator's first inspection
    return det


def _save_job(det, path: Path):
    yield Progress(0, 1, f"saving model {path.name}")
    save_detector(det, path)
    return path
