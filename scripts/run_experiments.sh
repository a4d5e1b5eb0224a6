#!/usr/bin/env bash
# Run experiments one after another and write their reports to results/ (each report records its
# command, git commit, machine and wall time). Usage:
#   scripts/run_experiments.sh [scale] [experiment ...] [-- overrides for every experiment]
# e.g. scripts/run_experiments.sh cpu rethinking/table2 rethinking/fig5
#      scripts/run_experiments.sh cpu                  # every experiment of the package
set -uo pipefail
scale=${1:-cpu}; shift || true
names=(); extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  names+=("$1"); shift
done
if [ ${#names[@]} -eq 0 ]; then
  mapfile -t names < <(python -c "from bnbench.experiment import known; print('\n'.join(known()))")
fi
status=0
for name in "${names[@]}"; do
  echo "== bnbench experiment $name scale=$scale ${extra[*]}"
  bnbench experiment "$name" "scale=$scale" "${extra[@]}" || status=1
done
exit $status
