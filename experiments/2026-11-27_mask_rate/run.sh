#!/usr/bin/env bash
# Trains every arm one after another (about 5 minutes each on 2 CPU cores),
# then rebuilds the table and the plot. Usage, from the repo root:
#   bash experiments/2026-11-27_mask_rate/run.sh [OUT_DIR]
set -euo pipefail
EXP=experiments/2026-11-27_mask_rate
OUT="${1:-/tmp/mask_rate}"
for arm in rate15 rate30 rate40; do
  python -m mlm_jax.main --config=$EXP/config.py:$arm --workdir="$OUT/$arm"
done
python experiments/report.py "$OUT" --arms="rate15,rate30,rate40" --plot="$EXP/curves.png"
