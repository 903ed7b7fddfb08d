"""Token vs whole-word vs span (SpanBERT) masking, 15%, same model and data.

The argument picks the arm:
  python -m mlm_jax.main --config=experiments/2026-11-27_mask_strategy/config.py:span \
      --workdir=/tmp/mask_strategy/span
"""
from configs import cpu

ARMS = ('token', 'whole_word', 'span')


def get_config(arm='token'):
  if arm not in ARMS:
    raise ValueError(f'arm={arm!r}; choose one of {ARMS}.')
  c = cpu.get_config()
  c.num_steps = 800            # half the demo: 3.3M tokens, about 5 minutes
  c.checkpoint_every = 800
  c.mask.strategy = arm        # eval masks with the same strategy, at 15%
  return c
