"""BERT-base on one node of 8 H100 GPUs: sequence 128, bfloat16 compute.

Global batch 2048 (256 rows per GPU). One process drives all 8 GPUs:

  python -m mlm_jax.main --config=configs/gpu_h100.py --workdir=/checkpoints/bert_base \
      --config.data.source=/data/enwiki-latest-pages-articles.xml.bz2 \
      --config.data.data_dir=/data/mlm_jax
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.num_steps = 50_000
  c.batch_size = 2048
  c.seq_len = 128
  c.learning_rate = 1.5e-3
  c.warmup_steps = 3_000
  c.log_every = 100
  c.eval_every = 5_000
  c.eval_batches = 50
  c.checkpoint_every = 5_000
  c.model.size = 'base'
  c.model.dtype = 'bfloat16'
  c.data.vocab_size = 32_768
  return c
