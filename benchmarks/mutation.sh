#!/usr/bin/env bash
# Mutation testing of the modules that decide verdicts and keep data (issue 18).
#
#   bash benchmarks/mutation.sh                     # every module listed in [tool.mutmut]
#   bash benchmarks/mutation.sh core.thresholds core.metrics
#
# mutmut copies the project to mutants/, changes one thing at a time (a comparison, a
# constant, a call dropped) and runs the tests that cover that line; a mutant the tests do not
# notice "survived". Long on two cores (thresholds.py alone, 153 mutants: ~15 min), so it is
# a deliberate run, never part of CI. It resumes where it stopped: results stay in mutants/.
# Prints the score per module: killed / (killed + survived); timeouts count as killed (the
# mutant made a test hang), "no tests" mutants are listed apart.
set -euo pipefail
cd "$(dirname "$0")/.."
mm=.venv/bin/mutmut
[ -x "$mm" ] || .venv/bin/pip install --quiet "mutmut>=3.3"
if [ "$#" -eq 0 ]; then
    "$mm" run --max-children 2
else
    for m in "$@"; do "$mm" run --max-children 2 "${m}.*"; done
fi
"$mm" results --all true | .venv/bin/python -c '
import collections, sys
counts = collections.defaultdict(collections.Counter)
for line in sys.stdin:
    name, _, status = line.strip().rpartition(": ")
    if "__mutmut_" not in name:
        continue
    module = name.split(".x")[0].split(".xǁ")[0]
    counts[module][status] += 1
print(f"{\"module\":28} {\"killed\":>6} {\"survived\":>8} {\"timeout\":>7} {\"no tests\":>8} {\"score\":>6}")
for module, c in sorted(counts.items()):
    killed = c["killed"] + c["timeout"]
    judged = killed + c["survived"]
    score = f"{killed / judged:.0%}" if judged else "—"
    print(f"{module:28} {c[\"killed\"]:>6} {c[\"survived\"]:>8} {c[\"timeout\"]:>7} {c[\"no tests\"]:>8} {score:>6}")
'
