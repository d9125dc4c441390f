"""InspectionSession: one place for the station's state and every intent that changes it.

The recipe and its OK set, the current detector, the thresholds, the session's results (re-
judged when thresholds or the model change), the labels and their undo history. Plain Python:
it notifies through :class:`~core.events.Event` callbacks and runs long work as generator
jobs on an injected executor (the GUI's engine thread, or :class:`~core.jobs.InlineExecutor`
in scripts and tests). Job results come back through callbacks on the thread that owns the
session; jobs themselves only read snapshots (a detector is replaced, never edited in place
while a job may read it).

Example:
    >>> s = InspectionSession(InlineExecutor())
    >>> s.new_recipe("cells", DetectorConfig(), ok_paths)
    >>> s.start_fit()                       # returns when done with the inline executor
    >>> s.inspect_paths(["part.png"])
    >>> [(r.name, r.score, r.verdict) for r in s.results]
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .config import model_default
from .detector import Detector, DetectorConfig
from .atomic import describe_error
from .errors import OkngError
from .events import Event, Question
from .feedback_jobs import rescore_job
from .imageio import iter_image_paths, load_image
from .jobs import FitResult, JobCallbacks, ScoredImage, Skipped, fit_job, inspect_job, load_model_job, save_model_job
from .models import MODELS, TRAINED_KINDS
from .recipes import Recipe, load_recipe, model_path_for, safe_file_stem, save_recipe
from .roles import ENGINEER, OPERATOR, hash_pin, verify_pin
from .runtime import graph_key
from .session_carry import (
    CarriedStore,
    StoreCopy,
    StoreNotCarried,
    carry_job,
    put_back_carried,
    recover_interrupted_save,
    remove_journal,
    say_where_replaced_went,
    stores_to_carry,
    write_journal,
)
from .session_labels import LabelBook
from .session_shift import ShiftLog
from .session_results import (
    MAX_RESULTS,
    Display,
    ResultRecord,
    SessionResults,
    compose_display,
    display_name,
    judge,
)
from .sources import CapturedFrame, FolderWatchSource, VideoSource, capture_job, live_job
from .thresholds import Thresholds, held_out_needed, lone_part_text, resting_part

log = logging.getLogger(__name__)
DEMO_RECIPE_NAME = "ELPV mono cells (demo)"
#: the demo's split (:func:`core.demo.demo_split`), kept in a saved demo recipe's station settings
DEMO_SPLIT = {"kind": "mono", "seed": 0}


class InspectionSession:
    def __init__(self, executor: Any, labels_dir: str | Path | None = None,
                 captures_dir: str | Path | None = None, runtime: str | None = None) -> None:
        self.executor = executor
        #: what runs the backbone for inspection (core.runtime; None: OKNG_RUNTIME or the fastest)
        self.runtime = runtime
        self.labels_dir = Path(labels_dir) if labels_dir is not None else Path.home() / ".okng" / "labels"
        self.captures_dir = Path(captures_dir) if captures_dir is not None else Path.home() / ".okng" / "captures"
        # notifications
        self.recipe_changed = Event()  # (name)
        self.ok_paths_changed = Event()  # (paths)
        #: OK images the last fit could not read: path -> why (the OK set marks them)
        self.unreadable_ok: dict[str, str] = {}
        self.unreadable_ok_changed = Event()  # (unreadable_ok)
        #: why the last refit moved the threshold, for the verdicts-changed line that follows it
        self._refit_note = ""
        #: the last fit's status line until the stored labels' replay has said its own after it
        self.fit_line = ""
        self.model_changed = Event()  # ()
        self.thresholds_changed = Event()  # (image, pixel)
        self.results_changed = Event()  # () verdicts, scores or maps of stored results changed
        self.result_added = Event()  # (ResultRecord)
        self.shown_changed = Event()  # (result id) the result to display
        self.live_changed = Event()  # (bool)
        self.status = Event()  # (message)
        self.error = Event()  # (message)
        self.question = Event()  # (Question)
        self.dirty_changed = Event()  # (bool) unsaved changes
        self.role_changed = Event()  # ("engineer" | "operator")
        # state
        self.recipe = Recipe("untitled", config=DetectorConfig().to_dict())
        self.recipe_path: Path | None = None
        self._unsaved_stem = unsaved_stem(self.recipe.name)  # its stores' name while it has no file
        self.detector: Detector | None = None
        self._embedder_key = ""  # what embeds for the current detector (_embedder_key)
        self.rescoring = False  # the results table is being scored under a new model
        self._rescore_gen = 0  # which re-scoring is the newest
        #: results whose score came from a model that is no longer current (an inspection
        #: that ran while a label changed the model): scored again under the current one
        self._stale: set[int] = set()
        self._stale_running = False
        self.extractor = None
        self.image_threshold: float | None = None
        self.pixel_threshold: float | None = None
        #: True once the engineer moved a threshold away from the model's calibration
        self.thresholds_hand_set = False
        self.results = SessionResults()
        self.shown_id: int | None = None
        self.demo_stream: list[str] = []
        self.demo_truth: dict[str, str] = {}
        self._demo_ok: frozenset[str] = frozenset()  # the demo's own OK cells
        self.live = False
        self.saving = False  # a recipe save's job is queued or running
        self._carried: list[CarriedStore] = []  # stores that save has copied, put back if it stops
        self._saving_to: Path | None = None  # that save's recipe path (its journal beside it)
        #: who is at the station: written into every label and results-log row
        self.operator = ""
        self.role = ENGINEER
        #: True when the recipe, its thresholds or its model changed since it was saved or opened
        self.dirty = False
        self.labels = LabelBook(self)
        self.shift = ShiftLog(self)

    # -- recipe & OK set --------------------------------------------------------------------
    @property
    def config(self) -> DetectorConfig:
        return DetectorConfig.from_dict(dict(self.recipe.config))

    @property
    def ok_paths(self) -> list[str]:
        return list(self.recipe.ok_paths)

    @staticmethod
    def available_models() -> list[tuple[str, str]]:
        """(name, one-line summary) of every normality model."""
        return [(name, cls.summary) for name, cls in MODELS.items()]

    def new_recipe(self, name: str, config: DetectorConfig | None = None, ok_paths: list[str] | None = None) -> None:
        """A new, unsaved recipe. Engineer only: in operator mode it would leave the lock (a
        new recipe has no PIN) and could then be saved over the protected one (found trying
        the station)."""
        if not self._engineer_only("start a new recipe"):
            return
        self._replace_recipe(name, config, ok_paths)

    def _replace_recipe(self, name: str, config: DetectorConfig | None = None,
                        ok_paths: list[str] | None = None) -> None:
        if self._still_saving():
            return
        self._stop_live()
        self.recipe = Recipe(name, list(ok_paths or []), (config or DetectorConfig()).to_dict())
        self.recipe_path = None
        self._unsaved_stem = unsaved_stem(name)
        self.demo_stream, self.demo_truth, self._demo_ok = [], {}, frozenset()
        self.unreadable_ok = {}
        self.unreadable_ok_changed.emit(self.unreadable_ok)
        self.set_detector(None)
        self.labels.recipe_replaced()
        self.shift.recipe_replaced()
        self.clear_results()
        self._set_role(ENGINEER)
        self.recipe_changed.emit(name)
        self.ok_paths_changed.emit(self.ok_paths)
        self.mark_saved()

    def open_demo(self) -> None:
        from .demo import demo_split

        if not self._engineer_only("open the demo"):  # said once, not again by new_recipe
            return
        split = demo_split(**DEMO_SPLIT)
        self.new_recipe(DEMO_RECIPE_NAME, DetectorConfig(), split.ok_train)
        self.recipe.station["demo_split"] = dict(DEMO_SPLIT)  # a saved demo recipe gets its stream back
        self._set_demo_stream(split)
        self.recipe_changed.emit(DEMO_RECIPE_NAME)  # again, now that the demo stream is known
        self.status.emit(f"Demo: {len(split.ok_train)} OK cells ready — press Fit (F5)")

    def _set_demo_stream(self, split) -> None:
        self.demo_stream = split.stream_paths
        self.demo_truth = {c.path: ("OK" if c.is_ok else "NG") for c in split.stream}
        self._demo_ok = frozenset(split.ok_train)

    def _drop_demo_stream_if_no_demo(self) -> None:
        """The demo stream goes once no OK image is one of the demo's own cells: the recipe is
        another product's now (its button hidden, not saved with the recipe). Cells added to
        the demo (more OK cells, a stream cell labelled "part is OK") keep it."""
        if not self.demo_stream or set(self.recipe.ok_paths) & self._demo_ok:
            return
        self.demo_stream, self.demo_truth, self._demo_ok = [], {}, frozenset()
        self.recipe.station.pop("demo_split", None)
        self.recipe_changed.emit(self.recipe.name)  # the window hides the demo button

    def _restore_demo_stream(self, recipe: Recipe) -> str:
        """The demo stream of a saved demo recipe (the unseen cells and their [truth] tags are
        no part of a recipe, only the split that made them); "" or why it is not there. Only
        while the OK set still holds one of the demo's cells (:meth:`_drop_demo_stream_if_no_demo`)."""
        from .demo import demo_split

        spec = recipe.station.get("demo_split")
        if spec is None:
            return ""
        kind, seed = (spec.get("kind"), spec.get("seed")) if isinstance(spec, dict) else (None, None)
        if kind not in ("mono", "poly") or type(seed) is not int or not 0 <= seed < 2**32:
            return "; no demo stream (the recipe's demo split is damaged)"
        try:
            split = demo_split(kind=kind, seed=seed)
        except Exception as exc:  # noqa: BLE001 - the recipe opens all the same; the demo is extra
            return f"; no demo stream ({exc})"
        if not set(recipe.ok_paths) & set(split.ok_train):
            return ""  # none of the demo's cells left: another product now, nothing to say
        self._set_demo_stream(split)
        return ""

    # -- unsaved changes, roles -------------------------------------------------------------
    def mark_dirty(self) -> None:
        if not self.dirty:
            self.dirty = True
            self.dirty_changed.emit(True)

    def mark_saved(self) -> None:
        if self.dirty:
            self.dirty = False
            self.dirty_changed.emit(False)

    def _set_role(self, role: str) -> None:
        if role != self.role:
            self.role = role
            self.role_changed.emit(role)

    @property
    def has_pin(self) -> bool:
        return bool(self.recipe.station.get("pin_hash"))

    def set_pin(self, pin: str) -> bool:
        """Engineer only: protect engineer mode of this recipe with a PIN (saved hashed)."""
        if not self._engineer_only("set the PIN"):
            return False
        try:
            self.recipe.station["pin_hash"] = hash_pin(pin)
        except ValueError as exc:
            self.error.emit(str(exc))
            return False
        self.mark_dirty()
        self.status.emit("Engineer PIN set; save the recipe to keep it")
        return True

    def lock(self) -> None:
        """Operator mode: thresholds, fitting and settings are locked; labels stay allowed."""
        if not self.has_pin:
            self.error.emit("Set an engineer PIN first (Recipe menu), so an engineer can unlock again.")
            return
        self._set_role(OPERATOR)
        self.status.emit("Operator mode: thresholds, fitting and settings are locked")

    def unlock(self, pin: str) -> bool:
        if self.role == ENGINEER:
            return True
        if not verify_pin(pin, str(self.recipe.station.get("pin_hash", ""))):
            self.error.emit("Wrong PIN: still in operator mode.")
            return False
        self._set_role(ENGINEER)
        self.status.emit("Engineer mode: thresholds, fitting and settings unlocked")
        return True

    def _engineer_only(self, what: str) -> bool:
        if self.role == ENGINEER:
            return True
        self.error.emit(f"Operator mode: an engineer must unlock the station to {what} (Recipe ▸ Engineer mode).")
        return False

    def set_station_setting(self, key: str, value: Any) -> None:
        """A recipe's station setting (live source, NG copies, log retention)."""
        if self.recipe.station.get(key) != value:
            self.recipe.station[key] = value
            self.mark_dirty()

    def set_copy_ng_images(self, on: bool) -> bool:
        """Keep copies of NG images beside the recipe (an engineer's recipe setting: it changes
        the recipe); False if refused in operator mode."""
        if bool(self.recipe.station.get("copy_ng_images")) == bool(on):
            return True
        if not self._engineer_only("change whether NG images are kept"):
            return False
        self.set_station_setting("copy_ng_images", bool(on))
        return True

    def add_ok_paths(self, inputs: list[str]) -> None:
        if not self._engineer_only("change the OK set"):
            return
        known = set(self.recipe.ok_paths)
        new = list(dict.fromkeys(str(p) for p in iter_image_paths(inputs) if str(p) not in known))
        if not new:
            self.status.emit("No new images found")
            return
        self.recipe.ok_paths.extend(new)
        self.mark_dirty()
        self.ok_paths_changed.emit(self.ok_paths)
        then = "refit to use them" if self.detector is not None else "press Fit (F5) to fit a model on them"
        self.status.emit(f"Added {len(new)} OK images ({len(self.recipe.ok_paths)} in total); {then}")

    def remove_ok_paths(self, paths: list[str]) -> None:
        if not self._engineer_only("change the OK set"):
            return
        drop = set(paths)
        self.recipe.ok_paths = [p for p in self.recipe.ok_paths if p not in drop]
        self.mark_dirty()
        self.ok_paths_changed.emit(self.ok_paths)
        self._drop_demo_stream_if_no_demo()
        self.status.emit(f"Removed {len(drop)} images; refit to apply")

    def set_model(self, name: str) -> None:
        """Choose the normality model for the next fit, with that model's own defaults."""
        if name == self.recipe.config.get("model", "padim") or not self._engineer_only("change the model"):
            return
        try:
            cfg = DetectorConfig.for_model(name, self.config)
        except (TypeError, ValueError) as exc:
            self.error.emit(f"Cannot use model {name}: {exc}")
            return
        self.recipe.config = cfg.to_dict()
        self.mark_dirty()
        self.status.emit(f"Model for the next fit: {name} (press F5 to fit)")

    def training_budget(self) -> float | None:
        """Seconds the next fit may train the recipe's model's network; None for models that
        train none."""
        if self.config.model not in TRAINED_KINDS:
            return None
        from .models.trained import DEFAULT_BUDGET

        return float(self.config.model_params.get("budget", DEFAULT_BUDGET))

    def _change_next_fit(self, what: str, said: str, **changes: Any) -> bool:
        """Change the recipe's settings for the next fit (an engineer's action, ``what`` to
        change, e.g. "the tiling"); ``said``: the status line, ``{model}`` the model's name.
        A setting the config refuses is an error message naming it, the recipe unchanged."""
        if not self._engineer_only(f"change {what}"):
            return False
        try:
            cfg = self.config.with_(**changes)
        except (TypeError, ValueError) as exc:
            self.error.emit(f"Cannot use {what}: {exc}")
            return False
        self.recipe.config = cfg.to_dict()
        self.mark_dirty()
        self.status.emit(f"{said.format(model=cfg.model)} (press F5 to fit)")
        return True

    def set_training_budget(self, seconds: float) -> None:
        """Let the next fit train the network for at most ``seconds`` (trained models only)."""
        if self.training_budget() is not None:
            self._change_next_fit("the training budget",
                                  f"Next fit trains {{model}} for at most {seconds / 60:.0f} min",
                                  model_params={**self.config.model_params, "budget": float(seconds)})

    def feature_choices(self) -> list[tuple[str, int]] | None:
        """(label, ``neighbourhood``) of the patch features the recipe's model can be fitted
        on (PaDiM, PatchCore, the k-means mixture); None for models without that setting."""
        if "neighbourhood" not in MODELS[self.config.model].param_ranges:
            return None
        return [("Features: own patch", 1), ("Features: 3 × 3 mean", 3)]

    def neighbourhood(self) -> int | None:
        """The next fit's ``neighbourhood`` (the model's own default when the recipe sets
        none); None for models without that setting."""
        if self.feature_choices() is None:
            return None
        default = model_default(MODELS[self.config.model], "neighbourhood")
        return int(self.config.model_params.get("neighbourhood", default))

    def set_neighbourhood(self, n: int) -> None:
        """Average each patch's features over its n x n neighbourhood in the next fit (README,
        "Which model": the more accurate PaDiM on varied parts)."""
        if self.neighbourhood() not in (None, n):
            what = "each patch on its own" if n == 1 else f"patches averaged {n} × {n}"
            self._change_next_fit("the features", f"Next fit: {what}",
                                  model_params={**self.config.model_params, "neighbourhood": int(n)})

    def pooling_choices(self) -> list[tuple[str, tuple[str, int]]]:
        """(label, (pooling, topk)) of the image scores the station offers: the hottest pixel,
        the mean of the hottest 2 % of the map (1000 pixels at 224 px; varied parts), or the
        largest hot region. The 2 % are of a whole-image map (``image_size`` squared); a tiled
        model's stitched map is larger, so there it is a smaller share."""
        size = self.config.image_size
        k = max(1, round(1000 * (size / 224) ** 2))
        return [("Score: hottest pixel", ("max", self.config.topk)),
                ("Score: hottest 2 % mean", ("topk", k)),
                ("Score: largest region", ("blob", self.config.topk))]

    def set_pooling(self, choice: tuple[str, int]) -> None:
        """Score images the chosen way from the next fit on (thresholds are calibrated for it)."""
        pooling, topk = choice
        if (pooling, topk) != (self.config.pooling, self.config.topk):
            what = {"max": "the hottest pixel", "topk": f"the mean of the hottest {topk} pixels",
                    "blob": "the largest hot region (area × mean)"}.get(pooling, pooling)
            self._change_next_fit("the score", f"Next fit scores images by {what}", pooling=pooling, topk=int(topk))

    def contrast_choices(self) -> list[tuple[str, str | None]]:
        """(label, ``contrast`` setting) of the grey-level rules the station offers."""
        return [("Grey levels: as recorded", None), ("Grey levels: stretched", "stretch"),
                ("Grey levels: shading flattened", "flatten")]

    def set_contrast(self, contrast: str | None) -> None:
        """See each image's grey levels as recorded, stretched from its 1st to its 99th
        percentile, or with its shading taken out and then stretched, from the next fit on
        (``DetectorConfig.contrast``; whole images only)."""
        if contrast != self.config.contrast:
            what = {None: "grey levels as recorded", "stretch": "each image's grey levels stretched",
                    "flatten": "each image's shading flattened, grey levels stretched"}.get(contrast, str(contrast))
            self._change_next_fit("the grey levels", f"Next fit: {what}", contrast=contrast)

    def tiling_choices(self) -> list[tuple[str, object]]:
        """(label, ``tile`` setting) of the tilings the station offers, for the fit settings
        beside the model: whole image, automatic, or tiles of one or two network inputs."""
        size = self.config.image_size
        # short enough for the chooser's half of the panel (the auto label was cut off)
        return [(f"Whole image → {size} px", None), (f"Auto: tiles if ≥ {2 * size} px", "auto"),
                (f"Tiles: {size} px, 1:1", size), (f"Tiles: {2 * size} px, half res.", 2 * size)]

    def set_tiling(self, tile: int | str | None) -> None:
        """Tile the next fit's images (None: the whole image); the overlap is the default,
        an eighth of the tile. The fitted model records it (see :mod:`core.tiling`)."""
        if tile != self.recipe.config.get("tile"):
            what = "whole images" if tile is None else ("automatic tiling" if tile == "auto" else f"{tile}-px tiles")
            self._change_next_fit("the tiling", f"Next fit: {what}", tile=tile, tile_overlap=None)

    # -- jobs -------------------------------------------------------------------------------
    def submit(self, job, replace: bool = False, **callbacks: Any) -> None:
        """Run ``job(token)`` on the executor; callbacks as in :class:`~core.jobs.JobCallbacks`."""
        self.executor.submit(job, JobCallbacks(**callbacks), replace=replace)

    def _skip_reporter(self) -> tuple[list[Skipped], Callable[[Any], None], Callable[[], None]]:
        """(list, on_item for Skipped records, a function that reports them once at the end)."""
        skipped: list[Skipped] = []

        def on_skipped(item: Any) -> None:
            skipped.append(item)
            self.status.emit(f"Skipped {Path(item.path).name}: {item.reason}")

        def report() -> None:
            if skipped:
                first = skipped[0]
                self.error.emit(f"{len(skipped)} image(s) were skipped, "
                                f"e.g. {first.path}: {first.reason}")
                skipped.clear()

        return skipped, on_skipped, report

    def _failed(self, what: str, after: Callable[[], None] | None = None) -> Callable[[BaseException], None]:
        def on_failed(exc: BaseException) -> None:
            self.error.emit(f"{what}: {exc}")
            if after is not None:
                after()
        return on_failed

    def _set_unreadable_ok(self, unreadable: dict[str, str]) -> None:
        """The OK images the last fit could not read (path -> why), kept in the recipe too:
        found trying the station, a reopened recipe showed them as plain OK images again."""
        self.unreadable_ok = unreadable
        if unreadable:
            self.recipe.station["unreadable_ok"] = dict(unreadable)
        else:
            self.recipe.station.pop("unreadable_ok", None)
        self.unreadable_ok_changed.emit(self.unreadable_ok)

    def start_fit(self) -> None:
        if not self._engineer_only("fit a model"):
            return
        if not self.recipe.ok_paths:
            self.error.emit("Add OK images before fitting a model.")
            return
        self._stop_live()
        try:
            config = self.config
        except (TypeError, ValueError) as exc:
            self.error.emit(f"Invalid detector settings in the recipe: {exc}")
            return
        skipped, _, report = self._skip_reporter()

        def done(result: FitResult) -> None:
            skipped.extend(result.skipped)
            self._set_unreadable_ok({item.path: item.reason for item in result.skipped})
            self._fit_done(result)
            report()

        # parts labelled "part is OK" are trained on, never held out (see split_calibration)
        vouched = self.labels.accepted_paths() & set(self.recipe.ok_paths)
        # and what the model being replaced held out is held out again: one more OK image
        # then moves one held-out part, not a third of them (and the threshold with them)
        held_before = self.detector.calibration_paths if self.detector is not None else ()
        job = partial(fit_job, list(self.recipe.ok_paths), config, extractor=self.extractor, runtime=self.runtime,
                      feedback=True, keep_in_fit=vouched, held_before=held_before)
        self.status.emit(f"Fitting on {len(self.recipe.ok_paths)} OK images…")
        def failed(exc: BaseException) -> None:
            self._set_unreadable_ok({})  # the last fit's marks are stale; the error names what it could not read
            self._failed("Fit failed", report)(exc)

        self.submit(job, on_returned=done, on_failed=failed,
                     on_cancelled=lambda: self.status.emit("Fit cancelled; the model is unchanged"))

    def _fit_done(self, result: FitResult) -> None:
        det = result.detector
        self.extractor = det.extractor
        th = det.thresholds
        mine = (self.image_threshold, self.pixel_threshold)
        keep_mine = self.thresholds_hand_set and None not in mine and th is not None
        judged_ng = [r for r in self.results if r.verdict == "NG"]  # before the new thresholds re-judge them
        verdicts = {r.id: r.verdict for r in self.results}
        old_threshold = self.image_threshold
        held_before = set(self.detector.calibration_paths) if self.detector is not None else set()
        again = len(held_before & set(det.calibration_paths))
        self.set_detector(det, *(mine if keep_mine else (None, None)))
        self.thresholds_hand_set = keep_mine
        self.mark_dirty()
        as_before = f" ({again} held out as before)" if held_before and det.calibration_paths else ""
        msg = (f"Model fitted on {len(result.fitted)} images, calibrated on {len(result.calibration)}{as_before} "
               f"in {result.seconds:.1f} s; inspection runs on {det.runtime_name}")
        moved = ("" if th is None or keep_mine or old_threshold is None
                 else threshold_move_text(old_threshold, th, result.calibration))
        if not moved and not keep_mine and (lone := lone_part_text(th, result.calibration)):
            moved = f". Note: {lone}"
        msg += " — too few images to calibrate: set the thresholds by hand" if th is None else moved
        self._refit_note = moved.lstrip(". ")  # said again by the verdicts-changed line put over this one
        self.fit_line = msg  # carried on by the stored labels' replay line, which comes right after it
        self.status.emit(msg)
        if keep_mine:
            self._ask_thresholds_after_fit(th)
        self.labels.model_replaced(det, replay=True, judged_ng=judged_ng, verdicts_before=verdicts)

    def _ask_thresholds_after_fit(self, th: Thresholds) -> None:
        keep, new = "Keep my thresholds", "Use the new calibration"

        def answer(option: str) -> None:
            if option == new:
                self.set_thresholds(th.image, th.pixel)
                self.thresholds_hand_set = False
                text = f"Thresholds from the new calibration: image {th.image:.4g}, pixel {th.pixel:.4g}"
                self.fit_line = text if self.fit_line else ""  # a replay still to come carries it on
                self.status.emit(text)

        self.ask(Question(
            "Thresholds after refit",
            f"You set the thresholds by hand (image {self.image_threshold:.4g}, pixel {self.pixel_threshold:.4g}). "
            f"The new model calibrates to image {th.image:.4g}, pixel {th.pixel:.4g} at the target "
            f"false-alarm rate. Keep yours?", (keep, new), keep, answer))

    def ask(self, q: Question) -> None:
        if self.question.connected:
            self.question.emit(q)
        else:
            q.answer(q.default)

    def inspect_paths(self, inputs: list[str], record: bool = True, said: str = "") -> None:
        """Inspect image files and folders; ``record=False``: results for the table only, not
        logged or counted (a review of parts the log has already, :meth:`ShiftLog.review`)."""
        if not self._require_model():
            return
        paths = [str(p) for p in iter_image_paths(inputs)]
        if not paths:
            self.error.emit("No images to inspect were found.")
            return
        self._stop_live()
        _, on_skipped, report = self._skip_reporter()

        det = self.detector

        def on_item(item: Any) -> None:
            self._add_result(item, from_file=True, scored_by=det, record=record) if isinstance(item, ScoredImage) \
                else on_skipped(item)

        def done(summary: Any) -> None:
            self.status.emit(self._done_message(summary.scored) + ("" if record else " (a review: not logged)"))
            self.shift.refresh()
            report()

        job = partial(inspect_job, paths, det, keep_images=True, batch_size=4, keep_embeddings=True)
        self.status.emit(said or f"Inspecting {len(paths)} images…")
        self.submit(job, on_item=on_item, on_returned=done, on_failed=self._failed("Inspection failed", report),
                     on_cancelled=lambda: (self.status.emit("Inspection cancelled"), self.shift.refresh(), report()))

    def inspect_demo_stream(self) -> None:
        if not self.demo_stream:
            self.error.emit("No demo stream: open the demo first (okng demo).")
            return
        self.inspect_paths(self.demo_stream)

    def start_live(self, kind: str, target: str) -> None:
        if not self._require_model() or self._still_saving():  # live replaces queued jobs: the save's too
            return
        if not target:
            self.error.emit("Enter a camera index, a video file or a folder for live inspection.")
            return
        bit_depth = self.detector.config.bit_depth
        source = FolderWatchSource(target, bit_depth=bit_depth) if kind == "folder" else VideoSource(target)
        self.set_station_setting("live_source", [kind, target])  # the recipe remembers it
        _, on_skipped, report = self._skip_reporter()

        def on_item(item: Any) -> None:
            self._add_result(item, from_file=False) if isinstance(item, ScoredImage) else on_skipped(item)

        def ended(message: str) -> Callable[..., None]:
            def end(*_: Any) -> None:
                self.live = False
                self.live_changed.emit(False)
                self.shift.refresh()
                self.status.emit(message)
                report()
            return end

        def failed(exc: BaseException) -> None:
            self.error.emit(f"Live inspection stopped: {exc}")
            ended("Live inspection stopped")()

        self.live = True  # before submit: a job may end (and report) before submit returns
        self.live_changed.emit(True)
        job = partial(live_job, source, self.current_detector, keep_embeddings=True)
        self.status.emit(f"Live inspection from {kind} {target} — Space or Esc to stop")
        self.submit(job, replace=True, on_item=on_item,
                    on_returned=lambda n: ended(self._done_message(n))(),
                     on_failed=failed, on_cancelled=ended("Live inspection stopped"))

    def current_detector(self) -> Detector | None:
        """Read by the live job on the engine thread: a reference read of a snapshot."""
        return self.detector

    def stop_live(self) -> None:
        if self.live:
            self.executor.cancel()

    def cancel(self) -> None:
        if self.executor.busy:
            self.executor.cancel()
            self.status.emit("Cancelling…")

    def _stop_live(self) -> None:
        if self.live:
            self.executor.cancel()

    def _require_model(self) -> bool:
        if self.detector is None:
            self.error.emit("No model yet: fit the OK images first (F5) or open a recipe.")
            return False
        return True

    # -- capture ----------------------------------------------------------------------------
    def file_beside_recipe(self, suffix: str) -> Path:
        """Where a recipe's companion file lives (labels, results log): beside the recipe, or
        in the session's data folder while the recipe is not saved yet (:func:`unsaved_stem`)."""
        if self.recipe_path is not None:
            return Path(self.recipe_path).with_suffix(suffix)
        return self.labels_dir / f"{self._unsaved_stem}{suffix}"

    def capture_folder(self) -> Path:
        """Where captured OK frames go: beside the recipe, or ``<captures_dir>/<recipe>/``."""
        if self.recipe_path is not None:
            return self.recipe_path.parent / f"{self.recipe_path.stem}.captures"
        return self.captures_dir / safe_file_stem(self.recipe.name)  # frames are kept by path: sharing is harmless

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
        self._stop_live()  # a camera cannot be opened twice
        captured: list[str] = []
        folder = self.capture_folder()

        def finish(*_: Any) -> None:  # frames saved before a cancel or an error are kept too
            if captured:
                self.add_ok_paths(captured)

        def done(_saved: Any) -> None:
            if not captured:
                self.error.emit("No frame could be captured: the source delivered no image.")
            finish()

        self.status.emit(f"Capturing {count} OK frame(s) from {kind} {target} into {folder}…")
        self.submit(partial(capture_job, VideoSource(target), folder, int(count)),
                     on_item=lambda f: captured.append(f.path) if isinstance(f, CapturedFrame) else None,
                     on_returned=done, on_failed=self._failed("Capture failed", finish), on_cancelled=finish)

    # -- detector & thresholds --------------------------------------------------------------
    def set_detector(self, det: Detector | None, image_thr: float | None = None,
                     pixel_thr: float | None = None) -> None:
        """Make ``det`` current; thresholds given here win over the model's calibration."""
        self.detector = det
        self._embedder_key = "" if det is None else _embedder_key(det)
        th = det.thresholds if det is not None else None
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
        return self.results.scores()

    def set_thresholds(self, image: float, pixel: float) -> None:
        """Re-judge every stored result and redraw the shown one; no model work."""
        if (image, pixel) == (self.image_threshold, self.pixel_threshold):
            return
        if not self._engineer_only("move the thresholds"):
            self.thresholds_changed.emit(self.image_threshold, self.pixel_threshold)  # controls snap back
            return
        self.image_threshold, self.pixel_threshold = float(image), float(pixel)
        self.thresholds_hand_set = True
        self.mark_dirty()
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

    def _rejudge(self) -> None:
        self.results.rejudge(self.image_threshold)
        self.results_changed.emit()

    def rescore_results(self, before: dict[int, str] | None = None) -> None:
        """Score the results table again under the current model (after a fit: the table must
        never show what another model said). A result embedded differently (other backbone,
        image size, channels or bit depth), or any result when the new model tiles (a tiled
        model scores the image's tiles, not the kept whole-image embedding), cannot be: it
        leaves the table, which says so; the results log keeps it. Labels wait until it is
        done (:attr:`rescoring`); a cancelled or failed re-scoring takes the unscored results
        out of the table too. ``before``: the verdicts under the model this one replaces (a
        refit): the verdicts it changed are marked in the table and named in the status line."""
        det = self.detector
        self._stale.clear()  # the whole table is scored again (or there is nothing to score)
        if det is None or not len(self.results):
            return
        key = self._embedder_key
        self._drop_results({r.id for r in self.results
                            if det.config.tiled or r.embedding is None or r.embedder_key != key},
                           "the new model embeds images differently")
        items = self.results.with_embeddings()
        if not items:
            self._rejudge_after_model(before)
            return
        self.rescoring = True
        self._rescore_gen += 1
        gen = self._rescore_gen

        def finished() -> None:
            if gen == self._rescore_gen:  # not when a newer re-scoring is still to come
                self.rescoring = False

        def done(rescored: list) -> None:
            finished()
            if self.detector is not det:  # a newer model came meanwhile: it re-scores in turn
                return
            for r in rescored:
                rec = self.results.get(r.result_id)
                if rec is not None:
                    rec.score, rec.anomaly_map = r.score, r.anomaly_map
            self._rejudge_after_model(before)

        def not_done(why: str) -> Callable[..., None]:
            def drop(*_: Any) -> None:
                finished()
                if self.detector is det:
                    self._drop_results({rid for rid, _ in items}, f"their re-scoring {why}")
            return drop

        self.submit(partial(rescore_job, det, items), on_returned=done, on_failed=not_done("failed"),
                    on_cancelled=not_done("was cancelled"))

    def _rejudge_after_model(self, before: dict[int, str] | None) -> None:
        """Re-judge every result; with ``before`` (verdicts under the model replaced) mark and
        name the verdicts the new model changed."""
        self.results.rejudge(self.image_threshold)
        changed = []
        for rec in self.results:
            was = (before or {}).get(rec.id)
            if was is not None and was != rec.verdict:
                rec.changed_from = was
                changed.append(rec)
        self.results_changed.emit()
        note, self._refit_note = (self._refit_note, "") if before is not None else ("", self._refit_note)
        if changed:
            shown = ", ".join(f"{r.name} {r.changed_from} → {r.verdict}" for r in changed[:6])
            more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            self.status.emit(f"The new model changed {len(changed)} verdict(s): {shown}{more} "
                             f"(marked in the results)" + (f". {note}" if note else ""))

    def _drop_results(self, ids: set[int], why: str) -> None:
        ids = {rid for rid in ids if rid in self.results}
        if not ids:
            return
        self.results.remove(ids)
        if self.shown_id in ids:
            self.shown_id = None
        self.results_changed.emit()
        self.status.emit(f"{len(ids)} result(s) left the table: {why} (inspect them again to judge them under "
                         f"the new model; the results log keeps them)")

    # -- results ----------------------------------------------------------------------------
    def _done_message(self, inspected: int) -> str:
        """What a finished run tells the operator, including that the table shows only the
        newest results when older ones dropped out of it (all are in the results log)."""
        text = f"Done: {inspected} inspected"
        if self.results.dropped:
            text += (f"; the results table keeps the newest {MAX_RESULTS} "
                     f"({self.results.dropped} older ones are in the results log and the shift counts)")
        return text

    def _add_result(self, item: ScoredImage, from_file: bool, scored_by: Detector | None = None,
                    record: bool = True) -> None:
        insp = item.inspection
        rec = self.results.add(display_name(item.path, from_file, self.demo_truth), insp.score, insp.anomaly_map,
                               item.image, item.path if from_file else None, item.seconds, self.image_threshold,
                               item.embedding, item.sha256, self._embedder_key)
        if record:
            self.shift.record(rec, self.labels.current_model_id)
        self.result_added.emit(rec)
        self.show_result(rec.id)
        if scored_by is not None and scored_by is not self.detector:  # a label changed the model meanwhile
            rec.embedder_key = _embedder_key(scored_by)  # what embedded it, not what embeds now
            self.rescore_stale({rec.id})

    @property
    def rescoring_stale(self) -> bool:
        """Results wait to be scored again under the current model (labels wait for them)."""
        return self._stale_running or any(i in self.results for i in self._stale)

    def rescore_stale(self, ids: set[int]) -> None:
        """Score these results again under the current model: their scores came from one that
        is no longer current (an inspection queued before a label, or results added while a
        label was learning). One job at a time; the results table takes the new scores (a
        result that cannot be scored again leaves it, which says so)."""
        self._stale |= {i for i in ids if i in self.results}
        det = self.detector
        if self._stale_running or det is None or not self._stale:
            return
        key = self._embedder_key
        items = [(r.id, r.embedding) for r in self.results if r.id in self._stale
                 and r.embedding is not None and r.embedder_key == key and not det.config.tiled]
        self._drop_results(self._stale - {rid for rid, _ in items}, "the current model embeds images differently")
        self._stale = {rid for rid, _ in items}
        if not items:
            return
        self._stale_running = True

        def done(rescored: list) -> None:
            self._stale_running = False
            if self.detector is det:
                for r in rescored:  # only these are re-judged: other results keep their marks
                    rec = self.results.get(r.result_id)
                    if rec is not None:
                        rec.score, rec.anomaly_map = r.score, r.anomaly_map
                        rec.verdict = judge(rec.score, self.image_threshold)
                    self._stale.discard(r.result_id)
                self.results_changed.emit()
            self.rescore_stale(set())  # any left, or scored meanwhile by a model now replaced

        def not_done(why: str) -> Callable[..., None]:
            def drop(*_: Any) -> None:
                self._stale_running = False
                if self.detector is det:
                    ids_now = {rid for rid, _ in items} & self._stale
                    self._stale -= ids_now
                    self._drop_results(ids_now, f"their re-scoring under the current model {why}")
                self.rescore_stale(set())  # what came meanwhile
            return drop

        self.submit(partial(rescore_job, det, items), on_returned=done, on_failed=not_done("failed"),
                    on_cancelled=not_done("was cancelled"))

    def clear_results(self) -> None:
        self.results.clear()
        self.shown_id = None
        self.results_changed.emit()

    def show_result(self, result_id: int) -> None:
        if result_id in self.results:
            self.shown_id = result_id
            self.shown_changed.emit(result_id)

    @property
    def shown(self) -> ResultRecord | None:
        return self.results.get(self.shown_id)

    def image_of(self, rec: ResultRecord) -> np.ndarray | None:
        """The record's image, re-read from its file if it was dropped (None if gone)."""
        if rec.image is not None or rec.path is None:
            return rec.image
        try:
            return load_image(rec.path, self.detector.config.bit_depth if self.detector else None)
        except OkngError as exc:
            self.error.emit(str(exc))
            return None

    def display(self) -> Display | None:
        rec = self.shown
        if rec is None:
            return None
        return compose_display(rec, self.image_of(rec), self.image_threshold, self.pixel_threshold)

    # -- recipes on disk --------------------------------------------------------------------
    def _say_ok_parts_added_back(self, paths: list[str]) -> None:
        """Parts labelled "part is OK" put back into the OK set on opening: an unsaved change."""
        if paths:
            self.mark_dirty()
            self.error.emit(f"{len(paths)} part(s) labelled Part is OK were not in the saved OK set (the change "
                            f"was not saved) and are in it again, e.g. {Path(paths[0]).name}: save the recipe, or "
                            f"withdraw the label to leave the part out")

    @staticmethod
    def _read_recipe(path: Path) -> tuple[Recipe | None, str]:
        """(the recipe, "") or (None, why it cannot be opened)."""
        try:
            recipe = load_recipe(path)
            DetectorConfig.from_dict(dict(recipe.config))
        except (OkngError, TypeError, ValueError) as exc:
            return None, f"Cannot open recipe: {exc}"
        return recipe, ""

    def recipe_file_problem(self, path: str | Path) -> str:
        """Why ``path`` cannot be opened as a recipe, or "": asked before the window asks about
        unsaved changes (found trying the station: Discard was asked for, then the file was
        refused, a question about losing work for nothing)."""
        return self._read_recipe(Path(path))[1]

    def open_recipe(self, path: str | Path) -> None:
        if self._still_saving():
            return
        path = Path(path)
        recipe, problem = self._read_recipe(path)
        if recipe is None:
            self.error.emit(problem)
            return
        recovered = recover_interrupted_save(path)  # before its stores are read
        self._replace_recipe(recipe.name)
        self.recipe, self.recipe_path = recipe, path
        self.labels.recipe_replaced()  # now the labels and the results log beside this recipe
        self.shift.recipe_replaced()
        self._set_role(OPERATOR if self.has_pin else ENGINEER)
        no_demo = self._restore_demo_stream(recipe)
        self.recipe_changed.emit(recipe.name)
        self.ok_paths_changed.emit(self.ok_paths)
        if recovered:
            self.error.emit(recovered)
        try:
            saved_at = path.stat().st_mtime
        except OSError:
            saved_at = float("inf")
        if missing := self.labels.ok_parts_missing_from(recipe.ok_paths, saved_at):
            recipe.ok_paths.extend(missing)
            self.ok_paths_changed.emit(self.ok_paths)
            self._say_ok_parts_added_back(missing)
        marks = recipe.station.get("unreadable_ok")
        if isinstance(marks, dict):  # a damaged entry is no reason to refuse the recipe: no marks then
            in_set = set(recipe.ok_paths)
            self.unreadable_ok = {p: r for p, r in marks.items() if isinstance(r, str) and p in in_set}
            self.unreadable_ok_changed.emit(self.unreadable_ok)
        if recipe.model_path and not Path(recipe.model_path).is_file():  # fitted once, the file is gone
            kept = ("" if None in (recipe.image_threshold, recipe.pixel_threshold) else
                    f"; its thresholds ({recipe.image_threshold:.4g} / {recipe.pixel_threshold:.4g}) stay in "
                    "the recipe until a model is there")
            self.error.emit(f"Recipe {recipe.name}: its model file {recipe.model_path} is missing. Put it back "
                            f"beside the recipe and open the recipe again, or press Fit (F5) to fit anew{kept}")
            return
        if not recipe.model_path:
            self.status.emit(f"Recipe {recipe.name} opened; no fitted model yet — press Fit (F5){no_demo}")
            return

        def loaded(det: Detector) -> None:
            self.extractor = det.extractor
            self.set_detector(det, recipe.image_threshold, recipe.pixel_threshold)
            th = det.thresholds
            # saved with the recipe: a label re-measures the held-out scores but leaves the
            # thresholds, so "they match the calibration" called them hand-set after reopening
            # (found trying the station: a refit asked about thresholds nobody had set)
            hand_set = recipe.station.get("thresholds_hand_set")
            self.thresholds_hand_set = (hand_set if isinstance(hand_set, bool)
                                        else th is not None and not th.matches_calibration())
            self.labels.model_replaced(det, replay=False)
            self.mark_saved()  # what was just opened is what is on disk
            if missing:  # ... but for the parts put back into the OK set
                self.mark_dirty()
            waiting = sum(not r.undone and not r.in_model for r in self.labels.rows())
            unlearnt = (f"; {waiting} label(s) are not in this model (made after it was saved): Fit (F5) replays "
                        f"them" if waiting else "")
            self.status.emit(f"Recipe {recipe.name} ready; inspection runs on {det.runtime_name}{unlearnt}{no_demo}")

        self.status.emit(f"Loading model {Path(recipe.model_path).name}…")
        self.submit(partial(load_model_job, recipe.model_path, self.extractor, runtime=self.runtime, feedback=True),
                    on_returned=loaded,
                    on_failed=self._failed("Could not load the model"))

    def save_recipe(self, path: str | Path | None = None) -> bool:
        """Save the recipe (and its model beside it). False if there is no path yet.

        One job on the engine thread carries the labels and results log beside it first (a
        recipe saved where its labels could not follow would replay another recipe's labels)
        and then writes the model; the recipe file is written when that job returns. The
        session moves to the new path only then: until then it keeps its own stores, and a
        save that stops puts back what was beside the target. Meanwhile (``saving``) nothing
        that writes the stores or replaces the recipe starts, and a save that must carry the
        stores waits for an idle engine (a running inspection would log rows after the copy)."""
        path = Path(path) if path is not None else self.recipe_path
        if path is None:
            return False
        elsewhere = self.recipe_path is None or path.resolve() != Path(self.recipe_path).resolve()
        if (copies := self._stores_for_save(path, elsewhere)) is None:
            return True
        recipe, det = self.recipe, self.detector
        if det is not None:  # without a model (its file missing) the stored thresholds stay
            recipe.image_threshold, recipe.pixel_threshold = self.image_threshold, self.pixel_threshold
            recipe.station["thresholds_hand_set"] = bool(self.thresholds_hand_set)
        model = str(model_path_for(path)) if det is not None else None
        carried: list[CarriedStore] = []

        def save_job(token):
            yield from carry_job(copies, carried, token)
            if det is not None:
                return (yield from save_model_job(det, model, token))
            return None

        def written(_model: Any) -> None:
            say_where_replaced_went(carried, self)
            self._write_recipe_file(recipe, path, recipe.model_path if det is None else model,
                                    model_written=det is not None, name=path.stem if elsewhere else recipe.name)

        def not_saved(exc: BaseException) -> None:
            if isinstance(exc, StoreNotCarried):
                self.error.emit(str(exc))
            else:
                self.error.emit(f"Could not save the model: {exc}. Recipe NOT saved to {path}")
            self._save_ended(False)  # after the cause: a put-back that fails says so last

        try:
            if copies:
                write_journal(path, copies, Path(model) if model is not None else None)
        except (OSError, OkngError) as exc:
            self.error.emit(f"Recipe NOT saved to {path}: {describe_error(exc)}")
            return True
        self.saving, self._carried, self._saving_to = True, carried, path
        try:
            self.submit(save_job, on_returned=written, on_failed=not_saved,
                        on_cancelled=lambda: not_saved(RuntimeError("cancelled")))
        except BaseException:  # e.g. the engine has stopped: nothing will end this save
            self._save_ended(False)
            raise
        return True

    def _stores_for_save(self, path: Path, elsewhere: bool) -> list[StoreCopy] | None:
        """The stores a save to ``path`` must carry, or None (and why on screen) when the
        save is refused."""
        if self.live:
            self.error.emit("Stop live inspection before saving the recipe.")
            return None
        if elsewhere and not self._engineer_only("save the recipe under another name"):
            return None
        if elsewhere and (refusal := protected_by_another_pin(path, self.recipe.station.get("pin_hash"))):
            self.error.emit(refusal)
            return None
        if self._still_saving():
            return None
        if recovered := recover_interrupted_save(path):  # an earlier save there was stopped: undone first
            self.error.emit(recovered)
        try:
            copies = stores_to_carry(self, path)
        except StoreNotCarried as exc:
            self.error.emit(str(exc))
            return None
        if copies and self.executor.busy:
            self.error.emit("Recipe NOT saved: saving it to another file waits until the running job ends "
                            "(or is cancelled, Esc): its labels and results log are copied beside it first.")
            return None
        return copies

    def _still_saving(self) -> bool:
        """True (and a word on screen) while a save is not finished: its carried stores may
        still be put back, and the recipe it saves must stay the session's."""
        if self.saving:
            self.status.emit("Still saving the recipe…")
        return self.saving

    def _save_ended(self, saved: bool) -> None:
        """The save that carried the stores ended; not ``saved``: they are put back. Its
        journal goes once nothing is left to undo (a put-back that failed keeps it, and the
        next opening of that recipe tries again)."""
        self.saving = False
        carried, self._carried = self._carried, []
        put_back = saved or all([put_back_carried(store, self) for store in carried])
        if put_back and self._saving_to is not None:
            remove_journal(self._saving_to)
        self._saving_to = None

    def _write_recipe_file(self, recipe: Recipe, path: Path, model_path: str | None, model_written: bool,
                           name: str) -> None:
        """Write the recipe file, under ``name`` (saved to another file a recipe takes that
        file's name: the title, the line's logs and default MQTT topic tell recipes apart by
        it, and two files saved from one recipe kept one name). Without a written model a
        failure puts the carried stores back; after one they stay (that model holds their
        labels) and the session moves to ``path`` anyway, so saving again completes it. The
        session's stores reopen beside ``path`` when next used (they follow the recipe path)."""
        before = recipe.model_path, recipe.name
        recipe.model_path, recipe.name = model_path, name
        try:
            save_recipe(recipe, path)
        except Exception as exc:  # noqa: BLE001 - any failure must end the save and say so
            if not model_written:
                recipe.model_path, recipe.name = before
                self.error.emit(f"Recipe NOT saved: {exc}")
                self._save_ended(False)
                return
            self._save_ended(True)
            if self.recipe is recipe:
                self.recipe_path = path
            self.error.emit(f"{exc}. The model, labels and results log are saved beside it: save again to "
                            f"write the recipe file.")
            return
        self._save_ended(True)
        if self.recipe is recipe:
            self.recipe_path = path
            self.mark_saved()
            self._checkpoint_stores()
        self.status.emit(f"Recipe saved to {path}")

    def _checkpoint_stores(self) -> None:
        """After a save the files beside the recipe hold everything, without their ``-wal``
        files (a copy of the recipe folder then has the labels)."""
        self.labels.checkpoint()
        self.shift.checkpoint()


def unsaved_stem(name: str) -> str:
    """The name of a new recipe's stores (labels, results log) in the station's
    data folder until it is saved: the demo's is its name, so its labels carry over to the
    next demo session; every other new recipe gets stores of its own (all "untitled" ones
    shared one: a discarded product's false alarms were replayed into the next product's
    fit, and its shift counters counted the other product's parts)."""
    if name == DEMO_RECIPE_NAME:
        return safe_file_stem(name)
    return f"{safe_file_stem(name)}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _embedder_key(det: Detector) -> str:
    """What a kept embedding depends on: the embedding graph (backbone, weights, image size,
    channels) and how images are read (bit depth)."""
    return f"{graph_key(det.embedder)}|bits={det.config.bit_depth}|contrast={det.config.contrast}"


def threshold_move_text(old: float, th: Thresholds, calibration: list[str], notable: float = 0.1) -> str:
    """Why a refit moved the image threshold by more than ``notable`` (relative), or "": the
    held-out part it now rests on. With a few dozen held-out parts and a 1 % target the
    threshold is their highest score, so one unusual good part sets it (found trying the
    station: 66.9 -> 83.0 after one more OK image, and nothing said why)."""
    new = th.image
    if abs(new - old) <= notable * max(abs(old), 1e-12) or th.calibration_scores.size == 0:
        return ""
    scores = th.calibration_scores
    i = resting_part(th)
    text = f". Image threshold {old:.2f} → {new:.2f}"
    if i is not None and len(calibration) == scores.size:
        text += f": it rests on the held-out OK part {Path(calibration[i]).name} ({scores[i]:.2f})"
    n = int(scores.size)
    if n < held_out_needed(th.target_false_alarm_rate):
        text += (f"; with {n} held-out parts one part sets it at a {th.target_false_alarm_rate:.0%} target: "
                 "add OK images to steady it")
    return text


def protected_by_another_pin(path: Path, own_pin_hash: str | None) -> str:
    """Why ``path`` must not be overwritten by a save-as, or "": a recipe file there with an
    engineer PIN other than the saved recipe's own. Without this, a recipe with no PIN (or
    another PIN) could be saved over the protected production recipe, PIN and all."""
    if not path.is_file():
        return ""
    try:
        theirs = load_recipe(path).station.get("pin_hash")
    except (OkngError, OSError, ValueError, TypeError):
        return ""  # not a readable recipe: nothing to protect
    if theirs and theirs != own_pin_hash:
        return (f"{path.name} is protected by an engineer PIN: nothing was saved. Save under another "
                "name, or open that recipe and unlock it (Recipe ▸ Engineer mode) to change it.")
    return ""
