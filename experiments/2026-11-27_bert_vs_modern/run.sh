#!/usr/bin/env bash
# Trains every arm one after another (about 5 minutes each on 2 CPU cores),
# then rebuilds the table and the plot. Usage, from the repo root:
#   bash experiments/2026-11-27_bert_vs_modern/run.sh [OUT_DIR]
set -euo pipefail
EXP=experiments/2026-11-27_bert_vs_modern
OUT="${1:-/tmp/bert_vs_modern}"
for arm in bert modern; do
  python -m mlm_jax.main --config=$EXP/config.py:$arm --workdir="$OUT/$arm"
done
python experiments/report.py "$OUT" --arms="bert,modern" --plot="$EXP/curves.png"
