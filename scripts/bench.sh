#!/usr/bin/env bash
# The cost benchmark of every normalization variant against torch.nn.BatchNorm2d (lone layer and
# ResNet-18 training step), written to results/ with the command that made it.
#
#   scripts/bench.sh                 # this machine's default device; run it when the machine is quiet
#   scripts/bench.sh --threads 2     # extra options go to `bnbench bench` (see --help)
#   FULL_R18=1 scripts/bench.sh      # also the full-width ResNet-18 step at 32 px (slow on CPU)
#
# Output: results/bench_<device>_<date>.{md,json} (and ..._r18full.{md,json}); each .md starts
# with the exact command line.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
device=${BNBENCH_DEVICE:-$("$py" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}
prefix=results/bench_${device}_$(date +%Y%m%d)
mkdir -p results
"$py" -m bnbench bench --device "$device" --out "$prefix" "$@"
if [[ "$device" == cuda || -n "${FULL_R18:-}" ]]; then
  "$py" -m bnbench bench --device "$device" --no-layer --model-width 1 --image-size 32 \
    --out "${prefix}_r18full" "$@"
fi
