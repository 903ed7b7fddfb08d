#!/usr/bin/env bash
# Runs the demo recipe and its ablations one after another (about 10 minutes
# each on 2 CPU cores), then prints the table. Usage, from the repo root:
#   bash experiments/2026-11-27_demo_recipe/run.sh [OUT_DIR]
set -euo pipefail
OUT="${1:-/tmp/demo_recipe}"
run() {  # name, then config overrides
  local name="$1"; shift
  python -m mlm_jax.main --config=configs/cpu.py --workdir="$OUT/$name" "$@"
}
run rope_preln                                          # the demo as shipped
run learned_preln --config.model.position=learned       # BERT positions
run learned_postln --config.model.position=learned --config.model.pre_ln=False  # BERT
python experiments/2026-11-27_demo_recipe/table.py "$OUT"
