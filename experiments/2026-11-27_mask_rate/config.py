"""Mask 15%, 30% or 40% of tokens in training; evaluate all at 15%.

The argument picks the arm:
  python -m mlm_jax.main --config=experiments/2026-11-27_mask_rate/config.py:rate30 \
      --workdir=/tmp/mask_rate/rate30
"""
from configs import cpu

ARMS = {'rate15': 0.15, 'rate30': 0.30, 'rate40': 0.40}


def get_config(arm='rate15'):
  c = cpu.get_config()
  c.num_steps = 800            # half the demo: 3.3M tokens, about 5 minutes
  c.checkpoint_every = 800
  c.mask.rate = ARMS[arm]
  c.mask.eval_rate = 0.15      # every arm is judged on the same task
  return c
