"""The PLC handshake as a state machine, independent of the protocol that carries it.

One cycle (README "Connecting a line" has the timing diagram)::

    PLC: PartId (optional), Trigger=1      station: clears Trigger, Ready=0, Busy=1
                                            station: inspects (worker thread)
                                            station: Score, Ok/Ng, PartId, ErrorCode, ResultRecipe, Busy=0,
                                                     ResultReady=1
    PLC: reads the result, ResultAck=1     station: records the ack, clears ResultAck, ResultReady, Ok, Ng,
                                                     PartId=0, ResultRecipe=0, Ready=1

Rules: a trigger while busy, or while a result waits for its ack, is refused with an
ErrorCode and never queued; a result is held until acknowledged (and recorded as
acknowledged before it is released, so a restart never presents it again); RecipeIndex loads
the recipe on a background thread while the active one keeps inspecting, then switches
between two parts. Transports call :meth:`Handshake.plc_write` and mirror
:meth:`Handshake.snapshot`/the listeners; listeners run under the handshake's lock, in the
order the values changed, so they must only hand the change to their own thread.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .signals import BY_NAME, SIGNALS, ErrorCode, plc_text

log = logging.getLogger(__name__)
Listener = Callable[[dict[str, Any]], None]


class LineError(Exception):
    """A refusal or failure with the ErrorCode the PLC sees."""

    def __init__(self, code: ErrorCode, text: str, image_path: str = "") -> None:
        super().__init__(text)
        self.code = code
        self.image_path = image_path  # the image the failure concerns, when there was one (logged)


@dataclass(frozen=True)
class CycleResult:
    """One inspection as the PLC sees it. ``record`` is the service's own (where it was logged)."""

    part_id: int
    verdict: str  # OK | NG | ? | ERROR
    score: float | None
    error_code: ErrorCode = ErrorCode.NONE
    error_text: str = ""
    recipe_index: int = 0
    record: Any = None


#: inspect(engine, part_id) -> CycleResult; runs on the inspection thread
Inspect = Callable[[Any, int], CycleResult]
#: load(recipe_index) -> engine (raises LineError); runs on the loader thread
Load = Callable[[int], Any]
#: record_ack(result): make the ack durable before the result is released
RecordAck = Callable[[CycleResult], None]


class Handshake:
    def __init__(self, inspect: Inspect, load: Load, record_ack: RecordAck, next_part_id: int = 1) -> None:
        self._inspect, self._load, self._record_ack = inspect, load, record_ack
        self._lock = threading.RLock()
        self._loaded = threading.Condition(self._lock)  # notified when no recipe load is pending
        self._values: dict[str, Any] = {s.name: s.default for s in SIGNALS}
        self._listeners: list[Listener] = []
        self._engine: Any = None
        self._busy = False
        self._held: CycleResult | None = None
        self._loading: int | None = None
        self._next_part = max(1, int(next_part_id))
        self._inspector = ThreadPoolExecutor(1, thread_name_prefix="line-inspect")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="line-recipe")
        #: link state for status displays: monotonic times and the last result
        self.last_trigger: float | None = None
        self.last_result: CycleResult | None = None
        self.cycles = 0
        self.refused = 0  # triggers refused (busy, a result not acknowledged, no recipe)
        self.faults = 0  # other refusals: a recipe that would not load, an ack not recorded

    # -- observation --------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._values)

    def value(self, name: str) -> Any:
        with self._lock:
            return self._values[name]

    def add_listener(self, fn: Listener) -> None:
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    @property
    def held(self) -> CycleResult | None:
        return self._held

    def _set(self, **values: Any) -> None:
        """Change station values (caller holds the lock); listeners see the changes in order."""
        changed = {k: v for k, v in values.items() if self._values[k] != v or k in ("ErrorCode", "ErrorText")}
        self._values.update(changed)
        if changed:
            for fn in list(self._listeners):
                try:
                    fn(changed)
                except Exception:  # noqa: BLE001 - one broken transport must not stop the line
                    log.exception("line listener failed")

    def _refuse(self, code: ErrorCode, text: str) -> None:
        if code in (ErrorCode.TRIGGER_WHILE_BUSY, ErrorCode.RESULT_NOT_ACKNOWLEDGED, ErrorCode.NOT_READY):
            self.refused += 1
        else:
            self.faults += 1
        log.info("refused: %s", text)
        self._set(ErrorCode=int(code), ErrorText=plc_text(text))

    def _update_ready(self) -> None:
        self._set(Ready=self._engine is not None and not self._busy and self._held is None)

    # -- PLC side -----------------------------------------------------------------------
    def plc_write(self, name: str, value: Any) -> bool:
        """A PLC wrote ``value`` to signal ``name``. False: the signal is not the PLC's."""
        sig = BY_NAME.get(name)
        if sig is None or not sig.plc_writable:
            return False
        with self._lock:
            if name == "Trigger":
                self._set(Trigger=bool(value))
                if value:
                    self._trigger()
            elif name == "ResultAck":
                self._set(ResultAck=bool(value))
                if value:
                    self._acknowledge()
            elif name == "RecipeIndex":
                self._set(RecipeIndex=int(value))
                self._request_recipe(int(value))
            else:
                self._set(**{name: value})
        return True

    def _trigger(self) -> None:
        self._set(Trigger=False)  # taken: the PLC's next write of 1 is the next trigger
        if self._busy:
            return self._refuse(ErrorCode.TRIGGER_WHILE_BUSY, "trigger refused: an inspection is running")
        if self._held is not None:
            return self._refuse(ErrorCode.RESULT_NOT_ACKNOWLEDGED,
                                f"trigger refused: the result of part {self._held.part_id} is not acknowledged")
        if self._engine is None:
            return self._refuse(ErrorCode.NOT_READY, "trigger refused: no recipe loaded")
        part = int(self._values["PartId"]) or self._take_part_id()
        self._next_part = max(self._next_part, part + 1) if part < 0xFFFFFFFF else 1
        self._busy = True
        self.last_trigger = time.monotonic()
        self._set(ErrorCode=0, ErrorText="", Ready=False, Busy=True, PartId=part)
        self._inspector.submit(self._run, self._engine, part, int(self._values["ActiveRecipe"]))

    def _take_part_id(self) -> int:
        part = self._next_part
        self._next_part = part + 1 if part < 0xFFFFFFFF else 1
        return part

    def _run(self, engine: Any, part: int, recipe: int) -> None:
        try:
            result = self._inspect(engine, part)
        except LineError as exc:
            result = CycleResult(part, "ERROR", None, exc.code, str(exc), recipe)
        except Exception as exc:  # noqa: BLE001 - any failure is this cycle's result, never a hang
            log.exception("inspection of part %d failed", part)
            result = CycleResult(part, "ERROR", None, ErrorCode.INSPECTION_FAILED, f"{type(exc).__name__}: {exc}",
                                 recipe)
        with self._lock:
            self._busy = False
            self._present(result)

    def _present(self, r: CycleResult) -> None:
        self._held = r
        self.last_result = r
        self.cycles += 1
        score = float(r.score) if r.score is not None else 0.0
        self._set(Score=score, ScoreX1000=_clamp_int32(round(score * 1000.0)), Ok=r.verdict == "OK",
                  Ng=r.verdict == "NG", PartId=r.part_id, ErrorCode=int(r.error_code), ErrorText=plc_text(r.error_text),
                  ResultRecipe=r.recipe_index, Busy=False, Ready=False, ResultReady=True)

    def _acknowledge(self) -> None:
        self._set(ResultAck=False)
        r = self._held
        if r is None:
            return  # nothing held: an ack twice is harmless
        try:
            self._record_ack(r)
        except Exception as exc:  # noqa: BLE001 - the result stays held: the PLC may ack again
            log.exception("ack of part %d not recorded", r.part_id)
            return self._refuse(ErrorCode.ACK_NOT_RECORDED, f"ack of part {r.part_id} not recorded: {exc}")
        self._held = None
        # the error went with the result (or said why a trigger was refused while it was held):
        # left set, a PLC read "not acknowledged" beside Ready=1 (found trying the station)
        self._set(ResultReady=False, Ok=False, Ng=False, PartId=0, ResultRecipe=0, ErrorCode=0, ErrorText="")
        self._update_ready()

    # -- station side -------------------------------------------------------------------
    def restore(self, result: CycleResult) -> None:
        """Present a result logged but never acknowledged (after a restart): held as usual."""
        with self._lock:
            self._next_part = max(self._next_part, result.part_id + 1)
            self._present(result)

    def start(self, recipe_index: int) -> None:
        """Load the first recipe (in the background, like a PLC's RecipeIndex write)."""
        with self._lock:
            self._set(RecipeIndex=recipe_index)
            self._request_recipe(recipe_index)

    def _request_recipe(self, index: int) -> None:
        if index == self._loading or (self._loading is None and index == self._values["ActiveRecipe"]
                                      and self._engine is not None):
            return
        self._loading = index
        self._loader.submit(self._load_recipe, index)

    def _load_recipe(self, index: int) -> None:
        try:
            engine = self._load(index)
        except LineError as exc:
            return self._load_failed(index, exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001
            log.exception("recipe %d failed to load", index)
            return self._load_failed(index, ErrorCode.RECIPE_LOAD_FAILED, f"recipe {index} not loaded: {exc}")
        with self._lock:  # between two parts: a running inspection keeps the engine it started with
            self._engine = engine
            if self._loading == index:
                self._loading = None
                self._loaded.notify_all()
            self._set(ActiveRecipe=index)
            if self._values["ErrorCode"] in (ErrorCode.UNKNOWN_RECIPE, ErrorCode.RECIPE_LOAD_FAILED):
                # an earlier switch's refusal is over: a PLC waiting for ActiveRecipe == N and
                # ErrorCode == 0 would otherwise wait for the next trigger
                self._set(ErrorCode=int(ErrorCode.NONE), ErrorText="")
            self._update_ready()

    def _load_failed(self, index: int, code: ErrorCode, text: str) -> None:
        with self._lock:
            if self._loading == index:
                self._loading = None
                self._loaded.notify_all()
            self._refuse(code, text)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no recipe load is pending (startup, tests). False: still loading."""
        with self._loaded:
            return self._loaded.wait_for(lambda: self._loading is None, timeout)

    def beat(self) -> None:
        with self._lock:
            self._set(Heartbeat=(int(self._values["Heartbeat"]) + 1) & 0xFFFF)

    def close(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)
        self._inspector.shutdown(wait=True)


def _clamp_int32(v: int) -> int:
    return max(-(2**31), min(2**31 - 1, int(v)))
