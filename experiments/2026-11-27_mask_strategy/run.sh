#!/usr/bin/env bash
# Trains every arm one after another (about 5 minutes each on 2 CPU cores),
# then rebuilds the table and the plot. Usage, from the repo root:
#   bash experiments/2026-11-27_mask_strategy/run.sh [OUT_DIR]
set -euo pipefail
EXP=experiments/2026-11-27_mask_strategy
OUT="${1:-/tmp/mask_strategy}"
for arm in token whole_word span; do
  python -m mlm_jax.main --config=$EXP/config.py:$arm --workdir="$OUT/$arm"
done
python experiments/report.py "$OUT" --arms="token,whole_word,span" --plot="$EXP/curves.png"
