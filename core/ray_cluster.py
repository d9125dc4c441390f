"""Connecting to Ray and running tasks with results in input order (``okng ... --ray``).

Ray is an optional extra (``pip install okng-station[ray]``) imported only here and only
when ``--ray`` is given: without it nothing of Ray is loaded.

Addresses: ``auto`` (the cluster this machine belongs to, e.g. after ``ray start``),
``host:port`` (a cluster's GCS address) or ``ray://host:port`` (Ray Client); none (``--ray``
alone) starts a private Ray on this machine for the run. Every node must have the same
``okng-station`` (and torch) installed and see the images at the same paths.

:func:`ordered` submits tasks with a bounded number in flight and hands results back in
input order, each exactly once: a task whose worker died is retried by Ray
(``max_retries``), and a result that arrives twice for the same index is dropped.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OkngError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'okng-station[ray]'"
#: times Ray reruns a task whose worker process died (killed, out of memory, node lost)
TASK_RETRIES = 4


def import_ray():
    try:
        import ray
    except ImportError:
        raise OkngError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """How a command uses Ray: where, and how each task is sized."""

    #: None: start a private Ray here; "auto", "host:port" or "ray://host:port": join that cluster
    address: str | None = None
    #: CPUs of the private Ray (None: all of this machine's)
    num_cpus: int | None = None
    #: CPUs (and PyTorch threads) per task; exact equality with a local run needs the local
    #: run's thread count (see core/shards.py)
    threads: int = 1
    #: images per scoring task (None: chosen from the batch size), rounded to whole batches
    chunk: int | None = None


def check_address(address: str | None) -> str | None:
    """Refuse what is not an address, e.g. a folder caught by ``--ray`` before the paths."""
    if address is None or address == "auto" or address.startswith("ray://"):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--ray {address}: not a Ray address (auto, host:port or ray://host:port); "
                         "to start a Ray on this machine write --ray after the paths, or --ray=auto")
    return address


def _code_root() -> str:
    """The folder that holds this ``core`` package: a private Ray's workers import it from
    there, so they run the driver's code even from a source checkout."""
    return str(Path(__file__).resolve().parents[1])


@contextmanager
def connected(options: RayOptions) -> Iterator[Any]:
    """The ``ray`` module, connected as ``options`` says; disconnects (and stops a private
    Ray) at the end. An already initialised Ray (a script, a test) is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if options.address is None:
        path = os.pathsep.join([_code_root()] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        kwargs.update(num_cpus=options.num_cpus, runtime_env={"env_vars": {"PYTHONPATH": path}})
    else:
        kwargs["address"] = options.address
    try:
        ray.init(**kwargs)
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        where = options.address or "a local Ray"
        raise OkngError(f"cannot start or reach {where}: {exc.__class__.__name__}: {str(exc)[:300]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def cluster_cpus(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def ordered(ray, remote_fn, calls: list[tuple], window: int, on_done: Callable[[int], None] | None = None
            ) -> Iterator[tuple[int, Any]]:
    """Run ``remote_fn.remote(*call)`` for each call, at most ``window`` in flight, and yield
    ``(index, result)`` in input order, each index once. ``on_done(index)`` is told as soon
    as a task finishes, in any order (progress). Unfinished tasks are cancelled if the
    consumer stops early (an error, Ctrl+C)."""
    pending: dict[Any, int] = {}
    arrived: dict[int, Any] = {}
    nxt = submitted = 0
    try:
        while nxt < len(calls):
            while submitted < len(calls) and len(pending) < window:
                pending[remote_fn.remote(*calls[submitted])] = submitted
                submitted += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                if i < nxt or i in arrived:  # already handed on: never twice
                    log.warning("duplicate result for task %d dropped", i)
                    continue
                arrived[i] = _get(ray, ref, i)
                if on_done is not None:
                    on_done(i)
            while nxt in arrived:
                yield nxt, arrived.pop(nxt)
                nxt += 1
    finally:
        for ref in pending:
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass


def _get(ray, ref, index: int):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        if isinstance(cause, OkngError):
            raise OkngError(f"on a Ray worker: {cause}") from None
        raise OkngError(f"Ray task {index} failed: {cause.__class__.__name__}: {str(cause)[:500]}") from None
    except ray.exceptions.RayError as exc:  # worker died more than TASK_RETRIES times, node lost...
        raise OkngError(f"Ray task {index} failed after {TASK_RETRIES} retries: "
                        f"{exc.__class__.__name__}: {str(exc)[:500]}") from None
