"""Entry point: python -m mlm_jax.main --config=configs/cpu.py --workdir=DIR.

A workdir that already holds a checkpoint resumes from it.
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mlm_jax import checkpoint
from mlm_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/cpu.py[:arg].', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where checkpoints and metrics go; resumes if it has any.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Call jax.distributed.initialize() first, which finds the coordinator '
    'itself on TPU pod slices, SLURM and GKE; needed on every multi-host run.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  checkpoint.quiet_orbax_logs()
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
