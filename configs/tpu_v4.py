"""BERT-base on a TPU v4 slice: sequence 128, bfloat16 compute.

Global batch 1024 suits a v4-8 (4 chips, 256 rows per chip) and a v4-32
(16 chips, 64 per chip) alike. On every worker of the slice (see launch/):

  python -m mlm_jax.main --distributed --config=configs/tpu_v4.py \
      --workdir=gs://BUCKET/bert_base \
      --config.data.source=/data/enwiki-latest-pages-articles.xml.bz2 \
      --config.data.data_dir=/data/mlm_jax
"""
from configs import bert_base


def get_config(arg=None):
  return bert_base.get_config(arg)  # the recipe's batch of 1024 fits as is
