#!/usr/bin/env bash
# Mutation testing of the merge math (opt-in; slow, not part of CI).
#
# mutmut (pinned below) plants one small change at a time (a mutant) in coremerge/merging/{methods,spaces,linalg}.py
# and runs the fast math tests on it (tests/test_hand_cases.py, test_methods.py, test_linalg.py, test_spaces.py, the
# library half of test_reference.py and the parameter ranges of test_rules.py; see [tool.mutmut] in pyproject.toml). A mutant the tests catch is
# "killed"; one they do not catch "survived". Prints the counts and the surviving mutants.
#
#   bash scripts/mutation.sh            # every mutant (about an hour on a shared 2-core machine)
#   JOBS=1 bash scripts/mutation.sh     # fewer parallel test processes
#   mutmut show <name>                  # the diff of one mutant (after a run)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(python -c 'import importlib.metadata as m; print(m.version("mutmut"))' 2>/dev/null)" = 3.8.1 ] ||
  python -m pip install -q "mutmut==3.8.1"
unset PYTHONPATH  # mutmut puts its mutated copy (mutants/) first on the path; the original must not be importable
rm -rf mutants
nice -n 10 mutmut run --max-children "${JOBS:-2}"
mutmut results --all true > mutants/results.txt 2>&1 || mutmut results > mutants/results.txt 2>&1
python - <<'PY'
import collections, re
lines = open("mutants/results.txt").read().splitlines()
status = collections.Counter(line.rsplit(": ", 1)[1] for line in lines if re.match(r"\s*\S+__mutmut_\d+: ", line))
total = sum(status.values())
print(f"mutants: {total}; " + ", ".join(f"{k}: {v}" for k, v in sorted(status.items())))
if total:
    print(f"killed: {status['killed'] / total:.1%}")
PY
mutmut results
