"""A template experiment: the token strategy vs the same as a plug-in.

Copy this folder to experiments/YYYY-MM-DD_slug/ and edit. The argument
picks the arm:
  python -m mlm_jax.main --config=experiments/_template/config.py:plugin \
      --workdir=/tmp/_template/plugin
"""
import os

from configs import cpu

# This folder as a module path, so a copied folder finds its own plug-in.
HERE = 'experiments.' + os.path.basename(os.path.dirname(__file__))
ARMS = {'token': 'token', 'plugin': f'{HERE}.masking:choose'}


def get_config(arm='token'):
  c = cpu.get_config()
  c.num_steps = 400
  c.checkpoint_every = 400
  c.mask.strategy = ARMS[arm]
  return c
