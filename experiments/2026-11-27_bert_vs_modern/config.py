"""BERT (post-LN, learned positions, GELU) vs the modern recipe (pre-LN,
RoPE, GeGLU, no biases), same size, data, optimizer and steps.

The argument picks the arm:
  python -m mlm_jax.main --config=experiments/2026-11-27_bert_vs_modern/config.py:modern \
      --workdir=/tmp/bert_vs_modern/modern
"""
from configs import cpu
from configs import recipes


def get_config(arm='modern'):
  if arm not in recipes.RECIPES:
    raise ValueError(f'arm={arm!r}; choose one of {sorted(recipes.RECIPES)}.')
  c = cpu.get_config()
  c.num_steps = 800            # half the demo: 3.3M tokens, about 5 minutes
  c.checkpoint_every = 800
  c.model.update(recipes.RECIPES[arm])
  c.model.dropout_rate = c.model.attention_dropout_rate = 0.0  # both arms
  return c
