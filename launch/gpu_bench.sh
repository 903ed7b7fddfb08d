#!/usr/bin/env bash
# The GPU benchmark, one call on a lent H100/H200 (about 8 minutes at most):
#   1. BERT-base, sequence 128, batch 256: ours against HF FlaxBertForMaskedLM
#   2. BERT-large, sequence 512, batch 32: ours alone
# both bfloat16 compute (float32 parameters and AdamW state), cuDNN fused
# attention (so attention dropout 0, for every contender; hidden dropout
# 0.1), the vocabulary padded to a multiple of 128. Prints the bench tables
# (ms/step, real tokens/s, MFU against the card's dense bf16 peak in
# metrics.PEAK_FLOPS) and writes their JSON to $OUT (default /tmp/gpu_bench).
#
#   bash launch/gpu_bench.sh
#   GPU_BENCH_TINY=1 bash launch/gpu_bench.sh   # CPU check: tiny, float32, XLA
#
# The lent machine has jax, flax, optax, orbax, sentencepiece, chex and absl
# but not ml_collections, grain, tensorboardX, mwparserfromhell or
# transformers (HF Flax): set WHEELS to a folder of their wheels carried
# with the tree, and they are installed from it (no network there).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-/tmp/gpu_bench}
mkdir -p "$OUT"

if [[ -n "${WHEELS:-}" ]]; then
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" \
    ml_collections grain tensorboardX mwparserfromhell transformers
fi
"$PYTHON" - <<'EOF'
import importlib.util, sys
missing = [m for m in ('ml_collections', 'grain', 'tensorboardX',
                       'mwparserfromhell', 'transformers')
           if importlib.util.find_spec(m) is None]
if missing:
  sys.exit(f'gpu_bench.sh: missing {missing}; set WHEELS (see the header).')
EOF

if [[ -n "${GPU_BENCH_TINY:-}" ]]; then
  # Same flow on a CPU in a minute or two: shapes and kernels that run there.
  common=(--dtype=float32 --attention=xla --vocab_size=200 --repeats=2
          --warmup=1)
  base=(--model=tiny --batch=2 --seq=16)
  large=(--model=tiny --batch=1 --seq=32)
  limit=600
else
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total \
    --format=csv,noheader
  common=(--dtype=bfloat16 --attention=cudnn --vocab_multiple=128
          --vocab_size=30522 --repeats=20 --warmup=3)
  base=(--model=base --batch=256 --seq=128)
  large=(--model=large --batch=32 --seq=512)
  limit=240  # per run: compile (about a minute) and 23 steps each
fi

status=0
timeout "$limit" "$PYTHON" -m mlm_jax.bench train "${common[@]}" "${base[@]}" \
  --contenders=mlm_jax,hf_flax --json="$OUT/base_seq128.json" || status=$?
timeout "$limit" "$PYTHON" -m mlm_jax.bench train "${common[@]}" "${large[@]}" \
  --contenders=mlm_jax --json="$OUT/large_seq512.json" || status=$?

"$PYTHON" - "$OUT" <<'EOF'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], '*.json'))):
  r = json.load(open(path))
  for name, c in r['contenders'].items():
    print(f"{os.path.basename(path)}: {r['device_kind']} {r['model']} "
          f"{r['batch_shape']} {r['dtype']} {r['attention']} {name}: "
          f"{c['tokens_per_s']:,.0f} real tokens/s, MFU {c['mfu']:.3f}")
EOF
exit "$status"
