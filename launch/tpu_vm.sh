#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), install mlm_jax on
# every worker, and run the same command on all of them (--worker=all); JAX
# finds the coordinator itself (--distributed).
#
#   TPU_NAME=bert ZONE=us-central2-b ACCELERATOR=v4-32 \
#     WORKDIR=gs://BUCKET/bert_base CONFIG=configs/tpu_v4.py \
#     DATA_SOURCE=/data/enwiki-latest-pages-articles.xml.bz2 \
#     launch/tpu_vm.sh [--config.key=value ...]
#
# Extra arguments go to mlm_jax.main. The data source must exist on every
# worker (a GCS-fuse mount or a copy); the workdir should be on GCS so all
# workers write one checkpoint. Rerunning the script resumes the run.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/tpu_v4.py}"
DATA_SOURCE="${DATA_SOURCE:-demo}"
DATA_DIR="${DATA_DIR:-/tmp/mlm_jax_data}"
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url)}"
BRANCH="${BRANCH:-$(git rev-parse --abbrev-ref HEAD)}"

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
    --command="$1"
}

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" \
    >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
fi

ssh_all "set -e
  if [ ! -d mlm_jax ]; then git clone -b '$BRANCH' '$REPO_URL' mlm_jax; fi
  cd mlm_jax && git fetch -q && git checkout -q '$BRANCH' && git pull -q
  python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip
  ~/venv/bin/pip install -q 'jax[tpu]' -e ."

args=$(printf ' %q' "$@")
ssh_all "cd mlm_jax && ~/venv/bin/python -m mlm_jax.main --distributed \
  --config='$CONFIG' --workdir='$WORKDIR' \
  --config.data.source='$DATA_SOURCE' --config.data.data_dir='$DATA_DIR' $args"
