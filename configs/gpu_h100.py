"""BERT-base on one node of 8 H100 GPUs: sequence 128, bfloat16 compute.

Global batch 2048 (256 rows per GPU) and half the steps of the TPU recipe,
so both see the same number of tokens. One process drives all 8 GPUs:

  python -m mlm_jax.main --config=configs/gpu_h100.py --workdir=/checkpoints/bert_base \
      --config.data.source=/data/enwiki-latest-pages-articles.xml.bz2 \
      --config.data.data_dir=/data/mlm_jax
"""
from configs import bert_base


def get_config(arg=None):
  c = bert_base.get_config(arg)
  c.batch_size = 2048
  c.num_steps = 50_000
  c.learning_rate = 1.5e-3
  c.warmup_steps = 2_500
  return c
