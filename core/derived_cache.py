"""What a model derives from its file when loaded (PaDiM: 784 precision matrices), cached beside it.

A model file keeps float64 sufficient statistics (exact incremental updates, feedback), not
the float32 precisions scoring reads; deriving them (a Cholesky solve per patch) was 0.6-2 s
of every ``okng score`` start-up on two cores. They are written once, when the model is saved
(the very values the fitted detector scores with) or, for a model saved before this cache
existed, at its first load, as ``MODEL.derived-KEY.safetensors`` beside the model file (a
read-only folder: the user cache, see :func:`core.runtime.cache_dir`).

The model file's format is unchanged (no version bump): the cache is optional and only trusted
when it provably belongs to the very bytes of the model file:

- KEY is derived from the model file's verified SHA-256 (``okng_sha256``, format 2; format-1
  files have none and are never cached) and the cache's own version; a refitted or re-saved
  model gets a new key and the stale cache beside it is removed;
- the cache names that SHA-256, the model kind and the torch version in its header (another
  torch could derive other last bits) and carries a SHA-256 of its own data section;
- the model checks shapes, dtypes and finiteness (:meth:`NormalityModel.load_derived`).

Any doubt (missing, damaged, another key, a failed write) means "derive as before": the cache
can make loading faster, never change a score or make a load fail.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: bump when what models derive (or how it is stored) changes: every cache is then ignored
DERIVED_VERSION = 1
_HEADER_KEY = "okng_derived"


def _key(model_sha256: str) -> str:
    return hashlib.sha256(f"{DERIVED_VERSION}:{model_sha256}".encode()).hexdigest()[:16]


def cache_paths(model_path: str | os.PathLike[str], model_sha256: str) -> tuple[Path, Path]:
    """(beside the model file, in the user cache) for this model file's content."""
    from .graph_runtime import cache_dir

    key = _key(model_sha256)
    return Path(f"{Path(model_path)}.derived-{key}.safetensors"), cache_dir() / f"derived-{key}.safetensors"


def _parse(raw: bytearray) -> tuple[dict, dict[str, np.ndarray], memoryview]:
    """(our header, float32 arrays viewing ``raw`` without a copy, the data section) of a
    safetensors file; ValueError if it is not one of ours."""
    n = int.from_bytes(raw[:8], "little")
    if not 0 < n <= len(raw) - 8:
        raise ValueError("bad header length")
    entries = json.loads(bytes(raw[8 : 8 + n]))
    header = json.loads(entries.pop("__metadata__")[_HEADER_KEY])
    data = memoryview(raw)[8 + n :]
    tensors = {}
    for name, e in entries.items():
        lo, hi = e["data_offsets"]
        shape = [int(x) for x in e["shape"]]
        if e["dtype"] != "F32" or not 0 <= lo <= hi <= len(data) or hi - lo != 4 * math.prod(shape):
            raise ValueError(f"tensor {name!r} is not float32 of its declared size")
        tensors[name] = np.frombuffer(data[lo:hi], np.float32).reshape(shape)
    return header, tensors, data


def _serialize(tensors: dict[str, torch.Tensor], header: dict) -> bytes:
    """A safetensors file whose metadata holds ``header`` plus the SHA-256 of its data section."""
    from safetensors.torch import save

    plain = save(tensors, metadata={_HEADER_KEY: json.dumps(header)})
    data = plain[8 + int.from_bytes(plain[:8], "little") :]
    header = dict(header, data_sha256=hashlib.sha256(data).hexdigest())
    return save(tensors, metadata={_HEADER_KEY: json.dumps(header)})  # same data section


def _expected_header(kind: str, model_sha256: str, with_torch: bool = True) -> dict:
    """What a cache's header must say. ``with_torch``: also the PyTorch version, for a model
    that could derive the values itself (another torch could derive other last bits);
    inspection without PyTorch takes the values as they are."""
    header = {"version": DERIVED_VERSION, "model_sha256": model_sha256, "kind": kind}
    if with_torch:
        import torch

        header["torch"] = torch.__version__
    return header


def store(model, model_path: str | os.PathLike[str], model_sha256: str | None) -> Path | None:
    """Write the model's derived tensors for the model file with this SHA-256; best effort
    (returns where, or None: nothing to cache, no checksum, or no writable place)."""
    derived = model.derived_tensors() if model_sha256 else None
    if not derived:
        return None
    derived = {k: v.detach().contiguous().cpu() for k, v in derived.items()}
    data = _serialize(derived, _expected_header(model.kind, model_sha256))
    beside, user = cache_paths(model_path, model_sha256)
    for target in (beside, user):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_replace(target, data)
        except OSError as exc:
            log.info("cannot cache the derived model state at %s (%s)", target, exc)
            continue
        if target == beside:
            _remove_stale(beside)
        return target
    return None


def _write_replace(target: Path, data: bytes) -> None:
    """Write then rename over ``target``: readers see the old file or the new one, never half
    of one. No fsync, unlike model files: a cache lost or torn by a crash fails its SHA-256 on
    the next load and is derived again, and the model's save does not wait for the disk."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def restore(model, model_path: str | os.PathLike[str], model_sha256: str | None) -> bool:
    """Give the model its cached derived tensors; False (model untouched) if there are none
    that provably belong to this model file, and the caller derives them."""
    if not model_sha256:
        return False
    for candidate in cache_paths(model_path, model_sha256):
        if candidate.is_file() and _restore_from(model, candidate, model_sha256):
            return True
    return False


def _restore_from(model, path: Path, model_sha256: str) -> bool:
    import torch

    arrays = _read_checked(path, _expected_header(model.kind, model_sha256))
    if arrays is None:
        return False
    try:
        return bool(model.load_derived({k: torch.from_numpy(a) for k, a in arrays.items()}))
    except Exception as exc:  # noqa: BLE001 - any unusable cache: derive as before
        log.warning("cannot use the derived model state %s (%s); deriving it", path, str(exc)[:160])
        return False


def read_arrays(model_path: str | os.PathLike[str], model_sha256: str | None,
                kind: str) -> dict[str, np.ndarray] | None:
    """The cached derived arrays of the model file with this SHA-256 as float32 numpy arrays
    (no PyTorch: inspection from an exported graph), or None when there are none that
    provably belong to it. The caller checks shapes and finiteness."""
    if not model_sha256:
        return None
    for candidate in cache_paths(model_path, model_sha256):
        if candidate.is_file():
            arrays = _read_checked(candidate, _expected_header(kind, model_sha256, with_torch=False))
            if arrays is not None:
                return arrays
    return None


def _read_checked(path: Path, expected: dict) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file whose header says ``expected`` and whose data matches its
    SHA-256; None (logged) otherwise."""
    try:
        with open(path, "rb") as f:  # into a writable buffer: the arrays view it, no copy
            raw = bytearray(os.fstat(f.fileno()).st_size)
            if f.readinto(raw) != len(raw):
                raise ValueError("short read")
        header, arrays, data = _parse(raw)
        if any(header.get(k) != v for k, v in expected.items()):
            log.info("derived model state %s belongs to another model or station; deriving it", path)
            return None
        if header.get("data_sha256") != hashlib.sha256(data).hexdigest():
            log.warning("derived model state %s is damaged; deriving it again", path)
            return None
        return arrays
    except Exception as exc:  # noqa: BLE001 - any unreadable cache: derive as before
        log.warning("cannot use the derived model state %s (%s); deriving it", path, str(exc)[:160])
        return None


def _remove_stale(beside: Path) -> None:
    """Caches of earlier contents of the same model file (it was re-saved) are stale."""
    prefix = beside.name.split(".derived-")[0] + ".derived-"
    for p in beside.parent.iterdir():  # not glob: a model name may hold [ or *
        if p.name.startswith(prefix) and p.name.endswith(".safetensors") and p != beside:
            try:
                p.unlink()
                log.info("removed stale derived model state %s", p)
            except OSError:
                pass
