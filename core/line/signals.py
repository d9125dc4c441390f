"""The PLC signal map: one table, served as OPC UA variables and as Modbus TCP coils and
holding registers (README "Connecting a line" prints it).

``owner`` says who writes a signal: ``plc`` (the station only reads it and clears the two
command bits when it has taken them), ``station`` (read-only for the PLC: an OPC UA write is
refused with BadUserAccessDenied, a Modbus write with exception 2, illegal data address), or
``both`` (PartId: the PLC writes the next part's id, 0 lets the station number it).

Modbus: coils hold the booleans; holding registers hold the numbers, big-endian with the
high word first for 32-bit values (Score as IEEE-754 float32, ScoreX1000 as signed int32),
and ErrorText as ASCII, two characters per register, high byte first, NUL padded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum

ERROR_TEXT_REGISTERS = 32  # 64 characters
#: ErrorText's length on OPC UA and MQTT (a PLC string variable, not a log)
ERROR_TEXT_CHARS = 200

# a file name with an extension at the end of a word (a path's last part)
_FILE_NAME = re.compile(r"[^\\/]+\.\w{1,5}$")
_WORD_EDGES = "\"'()[]<>,;:"


def _short_path(word: str) -> str:
    """``word`` with folders dropped if it is a path to a file ("/a/b/part.png:" ->
    "part.png:"); anything else as it was: URLs, dates like 2026/12/03, folder names."""
    core = word.strip(_WORD_EDGES)
    if "://" in core or ("/" not in core and "\\" not in core):
        return word
    name = _FILE_NAME.search(core)
    return word.replace(core, name.group(0)) if name else word


def plc_text(text: str, limit: int = ERROR_TEXT_CHARS) -> str:
    """``text`` for a PLC string of ``limit`` characters: paths shortened to their file names
    (which part it was; a deep folder used to push the reason past the cut), then, if still
    too long, cut at a word with "..." so the cut shows."""
    text = re.sub(r"\S+", lambda m: _short_path(m.group(0)), text)
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    space = cut.rfind(" ")
    if space >= limit // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:") + "..."


@dataclass(frozen=True)
class Signal:
    name: str
    kind: str  # bool | uint16 | uint32 | int32 | float | text
    owner: str  # plc | station | both
    address: int  # Modbus coil (bool) or first holding register (others)
    doc: str

    @property
    def registers(self) -> int:
        """Holding registers the signal spans (coils: 0)."""
        return {"bool": 0, "uint16": 1, "uint32": 2, "int32": 2, "float": 2, "text": ERROR_TEXT_REGISTERS}[self.kind]

    @property
    def default(self) -> object:
        return {"bool": False, "float": 0.0, "text": ""}.get(self.kind, 0)

    @property
    def plc_writable(self) -> bool:
        return self.owner in ("plc", "both")


SIGNALS: tuple[Signal, ...] = (
    Signal("Trigger", "bool", "plc", 0, "rising edge (write 1): inspect the next image; the station clears it"),
    Signal("ResultAck", "bool", "plc", 1, "write 1: the PLC has read the result; the station clears it"),
    Signal("Ready", "bool", "station", 2, "a trigger now would be accepted (recipe loaded, idle, no held result)"),
    Signal("Busy", "bool", "station", 3, "an inspection is running"),
    Signal("ResultReady", "bool", "station", 4,
           "Ok/Ng/Score/PartId/ErrorCode/ResultRecipe hold a result until ResultAck"),
    Signal("Ok", "bool", "station", 5, "the held result is OK"),
    Signal("Ng", "bool", "station", 6, "the held result is NG (neither: no verdict or an error)"),
    Signal("RecipeIndex", "uint16", "plc", 0, "recipe wanted (1..N, the order given to okng serve)"),
    Signal("ActiveRecipe", "uint16", "station", 1, "recipe the next trigger inspects with"),
    Signal("Heartbeat", "uint16", "station", 2, "counts up every heartbeat period, wraps at 65535"),
    Signal("ErrorCode", "uint16", "station", 3, "0 = no error; see ErrorCode table"),
    Signal("PartId", "uint32", "both", 4, "part id: written by the PLC before Trigger, or 0 = station numbers it"),
    Signal("Score", "float", "station", 6, "anomaly score of the held result"),
    Signal("ScoreX1000", "int32", "station", 8, "the score x 1000, rounded (for PLCs without floats)"),
    Signal("ErrorText", "text", "station", 10, "what went wrong, in words (64 characters on Modbus)"),
    Signal("ResultRecipe", "uint16", "station", 42, "recipe (1..N) that judged the held result (0: none held)"),
)
BY_NAME = {s.name: s for s in SIGNALS}
COILS = [s for s in SIGNALS if s.kind == "bool"]
REGISTERS = [s for s in SIGNALS if s.kind != "bool"]
N_COILS = max(s.address for s in COILS) + 1
N_REGISTERS = max(s.address + s.registers for s in REGISTERS)


class ErrorCode(IntEnum):
    """Values of the ErrorCode signal. Refusals (1-3, 6-7) leave a held result untouched;
    cycle errors (4-5) come as the cycle's result, with ResultReady, Ok and Ng both 0."""

    NONE = 0
    TRIGGER_WHILE_BUSY = 1  # refused, not queued: the PLC triggers again when Ready
    RESULT_NOT_ACKNOWLEDGED = 2  # refused: acknowledge the held result first
    NOT_READY = 3  # refused: no recipe loaded (or it failed to load)
    NO_IMAGE = 4  # the source gave no image in time, or an unreadable one
    INSPECTION_FAILED = 5  # the image could not be inspected
    UNKNOWN_RECIPE = 6  # RecipeIndex out of range; the active recipe is kept
    RECIPE_LOAD_FAILED = 7  # the recipe could not be loaded; the active recipe is kept
    ACK_NOT_RECORDED = 8  # the results log could not record the ack: the result stays held
