"""``okng serve``: the station without a window, driven by a PLC.

Wiring: the PLC's Trigger (OPC UA or Modbus, :mod:`.handshake`) -> the next image of the
source (:mod:`.sources`) -> the active recipe's detector -> one row in the recipe's results
log (with the part id, :mod:`.store`) -> ResultReady for the PLC, and the MQTT publisher of
that recipe sends the row from the log (:mod:`.mqtt_publisher`). Recipes are numbered 1..N
in the order given; RecipeIndex switches between them.

Example:
    >>> svc = LineService(ServeOptions([Path("cells.okrecipe")], Playlist(paths), modbus="127.0.0.1:5020"))
    >>> svc.start()   # returns when the links listen and the first recipe is loaded
    >>> svc.status()
    >>> svc.stop()
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import OkngError
from ..results_log import LogEntry, save_ng_copy, truth_from_path
from .handshake import CycleResult, Handshake, LineError
from .signals import ErrorCode
from .sources import TriggerSource
from .store import LineLog

log = logging.getLogger(__name__)


def parse_endpoint(text: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` -> (host, port)."""
    host, _, port = text.rpartition(":")
    try:
        return host or default_host, int(port)
    except ValueError:
        raise ValueError(f"not a port or HOST:PORT: {text!r}") from None


@dataclass
class WindowRecipe:
    """The recipe open in the station window, served as recipe 1 (one engine, one source of
    truth): each trigger inspects with the window's current model and thresholds (a refit or
    a threshold change applies from the next part) and logs to the window's results log."""

    name: str
    results_log: Path
    detector: Callable[[], Any]  # the window's current detector, or None before a fit
    model_id: Callable[[], str]
    station: dict[str, Any]
    #: whether NG images are kept now (the window's *Keep copies of NG images*); None: as ``station`` says
    copy_ng: Callable[[], bool] | None = None


@dataclass
class ServeOptions:
    recipes: list[Path]  # recipe files, RecipeIndex 1..N (empty with ``window``)
    source: TriggerSource
    opcua: str | None = None  # [HOST:]PORT
    modbus: str | None = None  # [HOST:]PORT
    mqtt: str | None = None  # HOST[:PORT] of the plant's broker
    recipe_index: int = 1
    heartbeat: float = 1.0  # seconds
    runtime: str | None = None
    operator: str = "line"
    mqtt_backoff: tuple[float, float] = (0.5, 5.0)  # first and longest wait between reconnects, s
    station_name: str = field(default_factory=lambda: __import__("socket").gethostname())
    window: WindowRecipe | None = None


@dataclass
class Engine:
    """A loaded recipe: what one trigger inspects with (read at each trigger)."""

    index: int
    name: str
    detector: Callable[[], Any]
    model_id: Callable[[], str]
    log: LineLog
    copy_ng: Callable[[], bool] = lambda: False  # recipe setting copy_ng_images: keep NG images as PNG


def model_identity(model_path: str) -> str:
    """The model file's name and time, as in the GUI's results log (``cells.okng@20260101T...``)."""
    p = Path(model_path)
    return f"{p.name}@{time.strftime('%Y%m%dT%H%M%S', time.localtime(p.stat().st_mtime))}"


def results_log_path(recipe_path: Path) -> Path:
    return Path(recipe_path).with_suffix(".results.sqlite")


class LineService:
    def __init__(self, options: ServeOptions) -> None:
        if not options.recipes and options.window is None:
            raise ValueError("okng serve needs at least one recipe")
        for p in options.recipes:
            if not Path(p).is_file():
                raise OkngError(f"recipe file not found: {p}")
        if not options.opcua and not options.modbus:
            raise ValueError("give --opcua and/or --modbus: without a link no PLC can trigger the station")
        self.options = options
        self.recipes = [Path(p).resolve() for p in options.recipes]
        from ..session_carry import recover_interrupted_save

        for i, path in enumerate(self.recipes, 1):  # before any of their logs is opened
            if recovered := recover_interrupted_save(path):  # a station's save onto it was stopped
                log.warning("recipe %d: %s", i, recovered)
        self.n_recipes = 1 if options.window is not None else len(self.recipes)
        self.source = options.source
        self._logs: dict[int, LineLog] = {}  # used from the inspection and ack paths (one at a time)
        self._log_lock = threading.Lock()
        self.handshake = Handshake(self._inspect, self._load, self._record_ack, self._first_part_id())
        self.transports: list[Any] = []
        self.publishers: dict[int, Any] = {}
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        """Open the image source, load the first recipe, present a result a previous run left
        unacknowledged, open the links, start the heartbeat and the publishers."""
        hs = self.handshake
        opener = getattr(self.source, "open", None)
        if opener is not None:  # before any trigger: an image that lands first is the first part's
            opener()
        self._restore_unacknowledged()
        hs.start(self.options.recipe_index)
        if not hs.wait_idle(timeout) or hs.value("ActiveRecipe") != self.options.recipe_index:
            raise OkngError(f"recipe {self.options.recipe_index} did not load: {hs.value('ErrorText')}")
        if self.options.mqtt:
            self._start_publishers()
        if self.options.opcua:
            from .opcua_server import OpcUaLink

            self.transports.append(OpcUaLink(hs, *parse_endpoint(self.options.opcua)))
        if self.options.modbus:
            from .modbus_server import ModbusLink

            self.transports.append(ModbusLink(hs, *parse_endpoint(self.options.modbus)))
        for t in self.transports:
            t.start()
        self._beat = threading.Thread(target=self._heartbeat, name="line-heartbeat", daemon=True)
        self._beat.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self.transports:
            t.stop()
        self.handshake.close()
        for p in self.publishers.values():
            p.stop()
        self.source.close()
        with self._log_lock:
            for lg in self._logs.values():
                lg.close()
            self._logs.clear()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.options.heartbeat):
            self.handshake.beat()

    def status(self) -> dict[str, Any]:
        """The link state, plain data (the window's Line dock shows it; okng serve's summary)."""
        hs = self.handshake
        r = hs.last_result
        return {
            "links": [t.describe() for t in self.transports],
            "active_recipe": hs.value("ActiveRecipe"),
            "cycles": hs.cycles,
            "refused": hs.refused,
            "faults": hs.faults,
            "last_trigger_age": None if hs.last_trigger is None else time.monotonic() - hs.last_trigger,
            "last_result": None if r is None else {"part_id": r.part_id, "verdict": r.verdict, "score": r.score},
            "mqtt": [p.describe() for p in self.publishers.values()],
            # images a watched folder skipped as another part's (core.line.sources.LiveGrab)
            "skipped": list(getattr(self.source, "skipped", [])),  # the last 100
            "skipped_total": int(getattr(self.source, "skipped_total", 0)),
            "out_of_step": int(getattr(self.source, "out_of_step", 0)),  # triggers that found several images
        }

    # -- recipes and logs ---------------------------------------------------------------
    def _log(self, index: int) -> LineLog:
        with self._log_lock:
            if index not in self._logs:
                w = self.options.window
                path = w.results_log if w is not None else results_log_path(self.recipes[index - 1])
                self._logs[index] = LineLog(path)
            return self._logs[index]

    def _logged_indices(self) -> list[int]:
        """The recipes whose results log exists: reading the others would create a log beside a
        file that may be no recipe at all (a model file given by mistake got one)."""
        w = self.options.window
        return [i for i in range(1, self.n_recipes + 1)
                if (w.results_log if w is not None else results_log_path(self.recipes[i - 1])).exists()]

    def _first_part_id(self) -> int:
        return 1 + max([self._log(i).max_part_id() for i in self._logged_indices()], default=0)

    def _restore_unacknowledged(self) -> None:
        """After a crash: the newest cycle that was never acknowledged is presented again."""
        newest = None
        for i in self._logged_indices():
            c = self._log(i).unacknowledged()
            if c is not None and (newest is None or c.inspection_id > newest[1].inspection_id):
                newest = (i, c)
        if newest is not None:
            i, c = newest
            self.handshake.restore(CycleResult(c.part_id, c.verdict, c.score, ErrorCode(c.error_code), c.error_text,
                                               i, (i, c.inspection_id)))
            log.warning("part %d: result logged but never acknowledged: presented again", c.part_id)

    def _load(self, index: int) -> Engine:
        from ..persistence import load_detector
        from ..recipes import load_recipe

        if not 1 <= index <= self.n_recipes:
            raise LineError(ErrorCode.UNKNOWN_RECIPE, f"recipe index {index} unknown: 1..{self.n_recipes}")
        w = self.options.window
        if w is not None:
            copy = w.copy_ng or (lambda: bool(w.station.get("copy_ng_images")))
            return Engine(1, w.name, w.detector, w.model_id, self._log(1), copy)
        path = self.recipes[index - 1]
        try:
            recipe = load_recipe(path)
            if not recipe.model_path or not Path(recipe.model_path).is_file():
                raise OkngError(f"recipe {path.name} has no fitted model")
            det = load_detector(recipe.model_path, runtime=self.options.runtime)
            if det.thresholds is not None and recipe.image_threshold is not None and recipe.pixel_threshold is not None:
                det.thresholds = replace(det.thresholds, image=recipe.image_threshold, pixel=recipe.pixel_threshold)
            det.warm_up()
        except OkngError as exc:
            raise LineError(ErrorCode.RECIPE_LOAD_FAILED, f"recipe {index} not loaded: {exc}") from None
        log.info("recipe %d loaded: %s (%s, runtime %s)", index, recipe.name, recipe.model_path, det.runtime_name)
        model_id = model_identity(recipe.model_path)
        copy = bool(recipe.station.get("copy_ng_images"))
        return Engine(index, recipe.name, lambda: det, lambda: model_id, self._log(index), lambda: copy)

    # -- one cycle ------------------------------------------------------------------------
    def _inspect(self, engine: Engine, part_id: int) -> CycleResult:
        """Grab, inspect, log (durably) and return the result; a failure is logged too, as
        an ERROR row, so every result the PLC sees is in the log."""
        t0 = time.perf_counter()
        det = engine.detector()
        th = det.thresholds if det is not None else None
        name, sha, score, verdict, code, text = "", "", None, "ERROR", ErrorCode.NONE, ""
        ng_copy = None
        try:
            if det is None:
                raise LineError(ErrorCode.INSPECTION_FAILED, "no model: fit the recipe first")
            set_bits = getattr(self.source, "set_bit_depth", None)  # a camera driver's own source may lack it
            if set_bits is not None:
                set_bits(det.config.bit_depth)  # the active model's rule for 16-bit images
            try:
                grabbed = self.source.grab()
            except LineError:
                raise
            except Exception as exc:  # noqa: BLE001 - a camera driver's own failure: no image this cycle
                raise LineError(ErrorCode.NO_IMAGE, f"the source failed: {type(exc).__name__}: {exc}") from exc
            name, sha = grabbed.name, grabbed.sha256
            try:
                ins = det.inspect([grabbed.image])[0]
            except Exception as exc:  # noqa: BLE001 - the cycle reports it; the line goes on
                raise LineError(ErrorCode.INSPECTION_FAILED, f"inspection failed: {exc}") from exc
            score, verdict = ins.score, ins.verdict
            if verdict == "NG" and engine.copy_ng():
                try:
                    ng_copy = save_ng_copy(grabbed.image, engine.log.path, name, part_id)
                except (OSError, OkngError) as exc:  # the verdict stands; the copy is what is missing
                    log.error("part %d: NG image not kept: %s", part_id, exc)
        except LineError as exc:
            code, text, name = exc.code, str(exc), name or exc.image_path
        t1 = time.perf_counter()
        entry = LogEntry(time.time(), name or "(no image)", sha, score, verdict, th.image if th else None,
                         th.pixel if th else None, engine.model_id(), self.options.operator, truth_from_path(name),
                         ng_copy)
        rowid = engine.log.record(entry, part_id, engine.index, int(code), text)
        log.info("part %d: %s, grab and inspect %.2f ms, log %.2f ms", part_id, verdict, (t1 - t0) * 1e3,
                 (time.perf_counter() - t1) * 1e3)
        pub = self.publishers.get(engine.index)
        if pub is not None:
            pub.wake()
        return CycleResult(part_id, verdict, score, code, text, engine.index, (engine.index, rowid))

    def _record_ack(self, result: CycleResult) -> None:
        if result.record is None:  # the cycle failed before its row was written: nothing to mark
            log.warning("part %d acknowledged; its result was never logged (%s)", result.part_id, result.error_text)
            return
        index, rowid = result.record
        if not self._log(index).acknowledge(rowid):
            log.warning("part %d was acknowledged already", result.part_id)

    # -- MQTT ---------------------------------------------------------------------------
    def _start_publishers(self) -> None:
        from ..recipes import load_recipe
        from .mqtt_publisher import MqttPublisher, MqttSettings

        host, port = parse_endpoint(self.options.mqtt, "127.0.0.1") if ":" in self.options.mqtt else (
            self.options.mqtt, 1883)
        w = self.options.window
        served = [(w.name, w.station, w.results_log)] if w is not None else [
            (r.name, r.station, results_log_path(p)) for p, r in ((p, load_recipe(p)) for p in self.recipes)]
        for i, (name, station, log_path) in enumerate(served, start=1):
            settings = MqttSettings(host, port, station.get("mqtt_topic") or f"okng/{name}/results",
                                    int(station.get("mqtt_qos", 1)), *self.options.mqtt_backoff,
                                    client_id=f"okng-{self.options.station_name}-{log_path.stem}"[:64])
            pub = MqttPublisher(log_path, settings, {"station": self.options.station_name, "recipe": name})
            pub.start()
            self.publishers[i] = pub
