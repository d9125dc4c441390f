"""Sampling and scoring for ``benchmarks/mutation.sh`` (issue 18).

``sample``: read every mutant name (``mutmut results --all true`` on stdin), print a uniform
random sample of up to N per module, the same for a given seed and mutant set. A full mutmut
run of the verdict-deciding modules is ~5,800 mutants, ~13 hours on two cores; a sample of 40
per module takes about an hour and still bounds each module's score (Wilson interval below).

``report``: read ``mutmut results --all true`` on stdin and print killed / survived / timeout /
no-tests counts and the score per module, with a 95 % Wilson interval; restricted to the
names in ``--only FILE`` when given (the sample). Timeouts count as killed: the mutant made a
test hang. "No tests" mutants (no test in the selection reaches the mutated line) count as
survivors: nothing would notice them.
"""
from __future__ import annotations

import argparse
import collections
import math
import random
import sys


def module_of(name: str) -> str:
    return name.split(".x_")[0].split(".xǁ")[0]


def read_results(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        name, _, status = line.strip().rpartition(": ")
        if "__mutmut_" in name:
            out[name] = status
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sample(results: dict[str, str], per_module: int, seed: int, modules: list[str]) -> list[str]:
    by_module = collections.defaultdict(list)
    for name in sorted(results):
        by_module[module_of(name)].append(name)
    rng = random.Random(seed)
    chosen = []
    for module in sorted(by_module):
        if modules and module not in modules:
            continue
        names = by_module[module]
        chosen += sorted(rng.sample(names, min(per_module, len(names))))
    return chosen


def report(results: dict[str, str], only: set[str] | None) -> str:
    counts = collections.defaultdict(collections.Counter)
    for name, status in results.items():
        if only is None or name in only:
            counts[module_of(name)][status] += 1
    rows = [f"{'module':24} {'killed':>6} {'timeout':>7} {'survived':>8} {'no tests':>8} {'pending':>7} "
            f"{'score':>6}  95 % interval"]
    total = collections.Counter()
    for module, c in sorted(counts.items()):
        total.update(c)
        rows.append(_row(module, c))
    rows.append(_row("all", total))
    return "\n".join(rows)


def _row(module: str, c: collections.Counter) -> str:
    killed = c["killed"] + c["timeout"]
    judged = killed + c["survived"] + c["no tests"]
    pending = c["not checked"]
    score = f"{killed / judged:.0%}" if judged else "—"
    lo, hi = wilson(killed, judged)
    interval = f"{lo:.0%}–{hi:.0%}" if judged else ""
    return (f"{module:24} {c['killed']:>6} {c['timeout']:>7} {c['survived']:>8} {c['no tests']:>8} {pending:>7} "
            f"{score:>6}  {interval}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--per-module", type=int, default=40)
    s.add_argument("--seed", type=int, default=18)
    s.add_argument("modules", nargs="*", help="e.g. core.thresholds (default: all)")
    r = sub.add_parser("report")
    r.add_argument("--only", help="file with the sampled mutant names, one a line")
    r.add_argument("--survivors", action="store_true", help="also list surviving mutants")
    args = ap.parse_args(argv)
    results = read_results(sys.stdin)
    if args.command == "sample":
        print("\n".join(sample(results, args.per_module, args.seed, args.modules)))
        return 0
    only = set(open(args.only).read().split()) if args.only else None
    print(report(results, only))
    if args.survivors:
        for name, status in sorted(results.items()):
            if status in ("survived", "no tests") and (only is None or name in only):
                print(f"{status:9} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
