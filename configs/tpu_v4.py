"""BERT-base on a TPU v4 slice: sequence 128, bfloat16 compute.

Global batch 1024 suits a v4-8 (4 chips, 256 rows per chip) and a v4-32
(16 chips, 64 per chip) alike. Point data.source at a Wikipedia dump; the
tokenizer and packed dataset are built once into data.data_dir. On every
worker of the slice (see launch/):

  python -m mlm_jax.main --distributed --config=configs/tpu_v4.py \
      --workdir=gs://BUCKET/bert_base \
      --config.data.source=/data/enwiki-latest-pages-articles.xml.bz2 \
      --config.data.data_dir=/data/mlm_jax
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.num_steps = 100_000
  c.batch_size = 1024
  c.seq_len = 128
  c.learning_rate = 1e-3
  c.warmup_steps = 5_000
  c.log_every = 100
  c.eval_every = 5_000
  c.eval_batches = 50
  c.checkpoint_every = 5_000
  c.model.size = 'base'
  c.model.dtype = 'bfloat16'
  c.data.vocab_size = 32_768
  return c
