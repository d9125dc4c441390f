"""The built-in demo data: electroluminescence images of solar cells (PyPI ``elpv-dataset``).

ELPV labels each 300x300 cell with a defect probability (0, 1/3, 2/3, 1) and a type (mono
or poly crystalline). The demo uses one product, as a factory would: by default the
monocrystalline cells. OK = probability 0; NG = probability 1 (certainly defective); the
uncertain middle grades are left out of evaluation sets.

The split is deterministic: a fixed shuffled order (seed 0) is cut into the OK set to fit,
then a stream of unseen cells to inspect, then a held-out evaluation set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OkngError


@dataclass(frozen=True)
class Cell:
    path: str
    defect_probability: float
    kind: str  # "mono" | "poly"

    @property
    def is_ok(self) -> bool:
        return self.defect_probability == 0.0

    @property
    def is_ng(self) -> bool:
        return self.defect_probability >= 1.0


def elpv_root() -> Path:
    try:
        import elpv_dataset
    except ImportError:
        raise OkngError("the demo needs the ELPV data set: pip install elpv-dataset") from None
    return Path(elpv_dataset.__file__).parent / "data"


def elpv_cells(kind: str | None = "mono") -> list[Cell]:
    """All ELPV cells of a type (None: both), in the data set's own order."""
    root = elpv_root()
    cells = []
    for line in (root / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        rel, prob, typ = parts
        if kind is None or typ == kind:
            cells.append(Cell(str(root / rel), float(prob), typ))
    return cells


@dataclass(frozen=True)
class DemoSplit:
    ok_train: list[str]  # OK cells to fit on
    stream: list[Cell]  # unseen cells, good and defective, to inspect live
    eval_ok: list[str]  # held-out OK cells for evaluation
    eval_ng: list[str]  # held-out certainly-defective cells

    @property
    def stream_paths(self) -> list[str]:
        return [c.path for c in self.stream]


def demo_split(n_train: int = 200, n_stream: int = 60, kind: str | None = "mono", seed: int = 0) -> DemoSplit:
    """Disjoint OK-train / mixed stream / evaluation sets from ELPV."""
    cells = elpv_cells(kind)
    order = np.random.default_rng(seed).permutation(len(cells))
    cells = [cells[i] for i in order]
    ok = [c for c in cells if c.is_ok]
    ng = [c for c in cells if c.is_ng]
    if len(ok) < n_train + 10:
        raise OkngError(f"only {len(ok)} OK cells of type {kind}; asked for {n_train} to fit")
    train = ok[:n_train]
    rest_ok = ok[n_train:]
    n_stream_ng = n_stream // 3
    stream = rest_ok[: n_stream - n_stream_ng] + ng[:n_stream_ng]
    stream = [stream[i] for i in np.random.default_rng(seed + 1).permutation(len(stream))]
    return DemoSplit(
        ok_train=[c.path for c in train],
        stream=stream,
        eval_ok=[c.path for c in rest_ok[n_stream - n_stream_ng :]],
        eval_ng=[c.path for c in ng[n_stream_ng:]],
    )
