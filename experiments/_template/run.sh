#!/usr/bin/env bash
# Trains every arm one after another, then rebuilds the table and the plot.
# Usage, from the repo root: bash experiments/_template/run.sh [OUT_DIR]
set -euo pipefail
EXP="experiments/$(basename "$(dirname "$0")")"
OUT="${1:-/tmp/$(basename "$EXP")}"
for arm in token plugin; do
  python -m mlm_jax.main --config=$EXP/config.py:$arm --workdir="$OUT/$arm"
done
python experiments/report.py "$OUT" --arms="token,plugin" --plot="$EXP/curves.png"
