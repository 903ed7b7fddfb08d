"""The embedded demo: a tiny BERT learns MLM on real Wikipedia text on a CPU.

Trains on the Wikipedia excerpt that installs with the package (about 0.65M
tokens), in about ten minutes on 2 cores, first-run data preparation
included:

  python -m mlm_jax.main --config=configs/cpu.py --workdir=/tmp/mlm_demo

The recipe (pre-LN, rotary positions, no dropout, a high learning rate) is
what lets a model this small leave the unigram plateau within the budget;
see experiments/2026-11-27_demo_recipe/ for what was tried.
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.num_steps = 1_600
  c.batch_size = 32
  c.seq_len = 128
  c.learning_rate = 2e-3
  c.warmup_steps = 200
  c.log_every = 50
  c.eval_every = 200
  c.checkpoint_every = 400
  c.model.size = 'tiny'
  c.model.max_len = 128
  c.model.pre_ln = True
  c.model.position = 'rope'
  c.model.dropout_rate = 0.0
  c.model.attention_dropout_rate = 0.0
  c.data.source = 'demo'
  c.data.vocab_size = 8192
  return c
