#!/usr/bin/env bash
# Runs the main job exactly as README documents it and records its output in results/main_job.md.
# Usage: scripts/record_main_job.sh   (from the repo root, with the venv active)
set -euo pipefail
out=results/main_job.md
run_dir=$(mktemp -d)/run
start=$(date +%s)
log=$( { /usr/bin/time -f "%e s wall, %M KB max RSS" bnbench train hydra.run.dir="$run_dir"; } 2>&1 )
end=$(date +%s)
{
  echo "# Main job: \`bnbench train\` (CPU scale, embedded synthetic dataset)"
  echo
  echo "Command: \`bnbench train\` (recorded by \`scripts/record_main_job.sh\`, run dir overridden to a temp dir)."
  echo "Machine: $(nproc) CPU cores, torch $(python -c 'import torch; print(torch.__version__)'), $(date -u +%Y-%m-%d)."
  echo "Scale: 1/4-width ResNet-18 on 10k synthetic 16x16 images, 8 epochs — not an ImageNet reproduction."
  echo
  echo '```'
  echo "$log" | grep -v "^\[" || true
  echo '```'
  echo
  echo "Per-epoch validation (from metrics.jsonl):"
  echo
  echo "| epoch | EMA top-1 | PreciseBN top-1 |"
  echo "|---|---|---|"
  python - "$run_dir/metrics.jsonl" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e["split"] == "val":
        rows.setdefault(e["epoch"], {})[e["stats"]] = e["top1"]
for epoch, r in sorted(rows.items()):
    print(f"| {epoch} | {r.get('ema', float('nan')):.2f} | {r.get('precise', float('nan')):.2f} |")
PY
  echo
  echo "Wall time of the whole command: $((end - start)) s."
} > "$out"
cat "$out"
