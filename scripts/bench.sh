#!/usr/bin/env bash
# The cost benchmark of every normalization variant against torch.nn.BatchNorm2d (lone layers,
# ResNet-18 training step, first step in a fresh process, PreciseBN), written to results/.
#
#   scripts/bench.sh                 # this machine's default device; run it when the machine is quiet
#   scripts/bench.sh --threads 2     # extra options go to `bnbench bench` (see --help)
#   FULL_R18=1 scripts/bench.sh      # also the full-width ResNet-18 rows at 32 px (slow on CPU)
#
# Output: results/bench_<device>_<date>.{md,json} (and ..._r18full.{md,json}); each .md is the
# printed report, which starts with the exact command line, git revision and machine.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
device=${BNBENCH_DEVICE:-$("$py" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
prefix=results/bench_${device}_$(date +%Y%m%d)
mkdir -p results
"$py" -m bnbench bench --device "$device" --json "$prefix.json" "$@" > "$prefix.md"
if [[ "$device" == cuda || -n "${FULL_R18:-}" ]]; then
  "$py" -m bnbench bench --device "$device" --no-layer --no-precise --model-width 1 \
    --image-size 32 --json "${prefix}_r18full.json" "$@" > "${prefix}_r18full.md"
fi
