"""Entry point: python -m mlm_jax.main --config=configs/cpu.py --workdir=DIR.

A workdir that already holds a checkpoint resumes from it.
"""
from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from mlm_jax import checkpoint
from mlm_jax import host_memory
from mlm_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/cpu.py[:arg].', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where checkpoints and metrics go; resumes if it has any.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Call jax.distributed.initialize() first, which finds the coordinator '
    'itself on TPU pod slices, SLURM and GKE; needed on every multi-host run.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0, for multi-process runs where JAX cannot find it '
    'itself (e.g. several local processes); with --num_processes and '
    '--process_id.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Processes in the run (with --coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0..num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed(distributed: bool, coordinator_address=None,
                           num_processes=None, process_id=None):
  """jax.distributed.initialize from flags, or from the cluster's environment."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(x is not None for x in explicit):
    if any(x is None for x in explicit):
      raise app.UsageError('--coordinator_address, --num_processes and '
                           '--process_id go together.')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  elif distributed:
    jax.distributed.initialize()  # TPU pod slice, SLURM, GKE: auto-detected


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  checkpoint.quiet_orbax_logs()
  if _CONFIG.value.keep_freed_host_memory:  # before anything starts a backend
    host_memory.keep_freed_memory()
  initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value,
                         _NUM_PROCESSES.value, _PROCESS_ID.value)
  logging.info('JAX process %d/%d, local devices: %s', jax.process_index(),
               jax.process_count(), jax.local_devices())
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
