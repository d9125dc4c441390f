"""The model file's bytes: a safetensors file whose header holds the description and a checksum.

What reading and writing a model file needs without PyTorch: the format constants, the
SHA-256 over the whole file (``okng_sha256``, see :mod:`core.persistence`), the description's
checks, and the arrays as numpy (``safetensors.numpy``). :mod:`core.persistence` builds a
detector from them (torch tensors viewing the same memory); inspection without PyTorch
(:mod:`core.lean_inspection`) reads the same file through the same checks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelFileError

log = logging.getLogger("core.persistence")  # the messages read as before the split

FORMAT = "okng-model"
#: 2: a SHA-256 over header and data (``okng_sha256``), and the feedback memory
#: (``feedback_memory`` metadata + ``feedback_memory.*`` tensors, optional);
#: format 1 (no checksum, no memory) still loads, with a warning that it cannot be verified
FORMAT_VERSION = 2
#: oldest format still read
OLDEST_FORMAT_VERSION = 1
READABLE_VERSIONS = (1, 2)
MODEL_SUFFIX = ".okng"
#: header metadata key of the file checksum (see the module docstring)
CHECKSUM_KEY = "okng_sha256"
_ZERO_DIGEST = b"0" * 64
_CHECKSUM_FIELD = re.compile(rb'"' + CHECKSUM_KEY.encode() + rb'"\s*:\s*"([^"\\]*)"')


def _digest_field(header: bytes) -> re.Match[bytes] | None:
    found = list(_CHECKSUM_FIELD.finditer(header))
    return found[0] if len(found) == 1 else None


def _file_digest(raw: bytes | memoryview, header_len: int, field: re.Match[bytes]) -> str:
    """SHA-256 of the file with the digest value replaced by zeros (no copy of the data)."""
    view = memoryview(raw)
    lo, hi = 8 + field.start(1), 8 + field.end(1)
    h = hashlib.sha256()
    h.update(view[:lo])
    h.update(_ZERO_DIGEST)
    h.update(view[hi:])
    return h.hexdigest()


def seal_model_bytes(raw: bytes) -> list[bytes | memoryview]:
    """Set the checksum field of a serialized model (safetensors bytes whose metadata holds
    ``okng_sha256`` with a 64-character value) to the file's digest.

    Returns the file as pieces to write in order (the tensor data is not copied).
    """
    n = struct.unpack("<Q", raw[:8])[0]
    field = _digest_field(bytes(raw[8 : 8 + n]))
    if field is None or field.end(1) - field.start(1) != 64:
        raise ValueError("no checksum field to seal")
    digest = _file_digest(raw, n, field).encode()
    view = memoryview(raw)
    return [view[: 8 + field.start(1)], digest, view[8 + field.end(1) :]]


def _unreadable_reason(raw: bytes) -> str:
    """What a file that does not parse as a model file is, in words that say what to do (the
    parser's own message names its header fields)."""
    if len(raw) < 8:
        return "the file is empty or cut short: restore it from a backup or fit the model again"
    n = struct.unpack("<Q", raw[:8])[0]
    if raw[8:9] != b"{":  # a model file's description starts right after its 8-byte length
        return "not an OK/NG model file (it does not start like one; model files end in .okng)"
    cut = (f"the file is cut short ({len(raw):,} bytes, its start promises more): restore it from a "
           "backup or fit the model again")
    if 8 + n > len(raw):
        return cut
    try:  # the description lists where each array ends: past the file's end means cut short
        header = json.loads(raw[8 : 8 + n])
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        end = 0
    if 8 + n + end > len(raw):
        return cut
    return "the file is damaged: restore it from a backup or fit the model again"


def read_checked(path: str | os.PathLike[str], check_config: Callable[[dict, Path], None] | None = None
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray], str | None]:
    """(metadata, numpy arrays, the verified SHA-256 or None for a format-1 file) of a model
    file, trusting nothing in it. The whole file is read once; the checksum is verified on
    those very bytes and the arrays are taken from them. ``check_config`` checks the recipe
    settings' types (:mod:`core.persistence` passes DetectorConfig's)."""
    from safetensors.numpy import load

    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, not a model file (model files end in {MODEL_SUFFIX})")
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    try:
        tensors = load(raw)
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        header = header.get("__metadata__") or {}
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a model file"
        raise ModelFileError(f"{path}: {_unreadable_reason(raw)} ({str(exc)[:120]})") from None
    raw_meta = header.get("okng") if isinstance(header, dict) else None
    if not isinstance(raw_meta, str):
        raise ModelFileError(f"{path} is a safetensors file but not an OK/NG Station model")
    checked = _verify_checksum(raw, n, header, path)
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: the model description is damaged (invalid JSON)") from None
    check_meta(meta, path, check_config)
    if not checked:
        if meta["format_version"] >= 2:
            raise ModelFileError(f"{path}: the file's checksum is missing; the file is damaged. "
                                 "Restore it from a backup or refit the model.")
        log.warning("%s is a model file of format %d, written before model files carried a checksum: "
                    "its integrity cannot be verified. Save it again (or refit) to add one.",
                    path, meta["format_version"])
    for name, t in tensors.items():
        if np.issubdtype(t.dtype, np.floating) and not all_finite(t):
            raise ModelFileError(f"{path}: tensor {name!r} holds NaN or infinite values; the file is damaged")
    return meta, tensors, (header[CHECKSUM_KEY] if checked else None)


def peek(path: str | os.PathLike[str], limit: int = 1 << 20) -> tuple[dict[str, Any], dict[str, list[int]]] | None:
    """(the model description, the tensors' shapes) from a model file's header alone, or None
    when the header cannot be read as one. Verifies nothing: for deciding *how* to load (a
    look that costs kilobytes, not the whole file), never for trusting the file;
    :func:`read_checked` does that."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if not 0 < n <= limit:
                return None
            header = json.loads(f.read(n))
        meta = json.loads(header["__metadata__"]["okng"])
        shapes = {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except Exception:  # noqa: BLE001 - anything odd: the full read says what is wrong
        return None
    return (meta, shapes) if isinstance(meta, dict) else None


def all_finite(a: np.ndarray) -> bool:
    """No NaN or infinity in ``a``: its largest and smallest values are finite (max and min
    propagate NaN). One pass without a mask: 5-10x faster than ``isfinite(a).all()`` on the
    63 MB of PaDiM statistics, which was a tenth of ``okng score``'s start-up."""
    return a.size == 0 or bool(np.isfinite(a.max()) and np.isfinite(a.min()))


def _verify_checksum(raw: bytes, header_len: int, header: dict[str, Any], path: Path) -> bool:
    """True if the file carries a checksum and it matches; False if it carries none."""
    if CHECKSUM_KEY not in header:
        return False
    stored = header[CHECKSUM_KEY]
    field = _digest_field(raw[8 : 8 + header_len])
    damaged = ModelFileError(f"{path}: the file is damaged (its checksum does not match its content: a "
                             "changed byte on disk or in transfer). Restore it from a backup or refit the model.")
    if not (isinstance(stored, str) and re.fullmatch("[0-9a-f]{64}", stored)) or field is None \
            or field.group(1) != stored.encode():
        raise damaged
    if _file_digest(raw, header_len, field) != stored:
        raise damaged
    return True


def require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise ModelFileError(f"{path}: {what}")


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_meta(meta: Any, path: Path, check_config: Callable[[dict, Path], None] | None = None) -> None:
    """The description's fields and types (the settings' own types by ``check_config``)."""
    require(isinstance(meta, dict) and meta.get("format") == FORMAT, path, "not an OK/NG Station model")
    version = meta.get("format_version")
    require(isinstance(version, int) and not isinstance(version, bool), path, "format version missing")
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} was written by a newer OK/NG Station (model format {version}, made by "
            f"version {meta.get('okng_version', '?')}); this station reads format {FORMAT_VERSION}. "
            "Update OK/NG Station, or refit the model here."
        )
    require(version >= OLDEST_FORMAT_VERSION, path, f"model format {version} is no longer supported; refit the model")
    require(isinstance(meta.get("okng_version", ""), str), path, "field 'okng_version' is not text")
    for key in ("config", "backbone", "model"):
        require(isinstance(meta.get(key), dict), path, f"field {key!r} is missing or not an object")
    if check_config is not None:
        check_config(meta["config"], path)
    b = meta["backbone"]
    require(b.get("weights") is None or isinstance(b.get("weights"), str), path, "backbone weights invalid")
    m = meta["model"]
    require(isinstance(m.get("kind"), str) and isinstance(m.get("params"), dict), path, "model kind/params invalid")
    grid_ok = all(isinstance(g, int) and 0 < g <= 4096 for g in m.get("grid") or [None])
    require(isinstance(m.get("grid"), list) and len(m["grid"]) == 2 and grid_ok,
             path, "model grid invalid")
    require(isinstance(m.get("n_channels"), int) and 0 < m["n_channels"] <= 100_000, path, "channel count invalid")
    th = meta.get("thresholds")
    require(th is None or (isinstance(th, dict) and is_number(th.get("image")) and is_number(th.get("pixel"))
                            and is_number(th.get("target_false_alarm_rate"))),
             path, "thresholds invalid")
    if th is not None:
        require(0.0 <= th["target_false_alarm_rate"] < 1.0, path,
                 "thresholds invalid: target_false_alarm_rate must be from 0 to 1, "
                 f"got {th['target_false_alarm_rate']!r}")
    cal = meta.get("calibration_paths")
    require(cal is None or (isinstance(cal, list) and all(isinstance(p, str) for p in cal)),
            path, "the list of held-out images is damaged")
    fm = meta.get("feedback_memory")
    require(fm is None or isinstance(fm, dict), path, "feedback memory settings invalid")
