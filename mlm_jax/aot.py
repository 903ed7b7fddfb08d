"""Ahead-of-time: compile the train step for a mesh and print its memory.

Compiles the real train step (sharded as in training) for N fake CPU
devices from abstract inputs only: no data, no parameters in memory. Prints
per-device bytes of the train state (parameters + optimizer state), of the
compiled step's arguments, temporaries and outputs, and the step's FLOPs, so
one knows before booking a pod whether a config fits. CPU numbers are XLA's
CPU buffer assignment: close to, not the same as, a TPU's or GPU's.

  python -m mlm_jax.aot --config=configs/bert_base.py --devices=8 \
      --mesh=fsdp=8 --config.model.size=large --config.batch_size=64
"""
import math

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from mlm_jax import build
from mlm_jax import sharding

FLAGS = flags.FLAGS


def _define_flags():
  """Flags of the command line only: importing this module defines none."""
  config_flags.DEFINE_config_file(
      'config', None, 'Config file, e.g. configs/bert_base.py.',
      lock_config=True)
  flags.DEFINE_integer('devices', 8, 'Fake CPU devices to compile for.')
  flags.DEFINE_string(
      'mesh', '', 'Mesh sizes, e.g. "fsdp=8" or "data=2,fsdp=2,tensor=2" (axes '
      'not named: 1, or -1 for data); overrides config.mesh.')
  flags.DEFINE_integer(
      'vocab_size', 0, 'Vocabulary size; 0: config.data.vocab_size (no '
      'tokenizer or data is read).')
  flags.mark_flags_as_required(['config'])


def apply_mesh_flag(config, text: str):
  if not text:
    return
  sizes = dict(item.split('=') for item in text.split(','))
  unknown = set(sizes) - {'data', 'fsdp', 'tensor', 'dcn_data'}
  if unknown:
    raise ValueError(f'--mesh: unknown axes {sorted(unknown)}.')
  config.mesh.data = int(sizes.get('data', -1))
  config.mesh.fsdp = int(sizes.get('fsdp', 1))
  config.mesh.tensor = int(sizes.get('tensor', 1))
  config.mesh.dcn_data = int(sizes.get('dcn_data', 1))


def _bytes_per_device(abstract_tree, sharding_tree) -> int:
  total = 0
  for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
      sharding_tree, is_leaf=lambda y: isinstance(y, jax.sharding.Sharding))):
    total += math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total


def analyze(config, vocab_size: int) -> dict:
  """Compiles the train step of `config` on the current devices; its numbers.

  The pjit step whatever config.parallelism says: pmap's is the same step
  with the state replicated, i.e. the mesh data=N.
  """
  config = config.copy_and_resolve_references()
  config.parallelism = 'pjit'
  built = build.build(config, vocab_size=vocab_size)
  row = jax.ShapeDtypeStruct((config.batch_size, config.seq_len), np.int32,
                             sharding=sharding.batch_sharding(built.mesh))
  compiled = built.train_step.lower(
      built.abstract_state, {'input_ids': row, 'segment_ids': row}).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  abstract, shardings = built.abstract_state, built.state_sharding
  return {
      'mesh': dict(built.mesh.shape),
      'num_params': built.num_params,
      'params_bytes': _bytes_per_device(abstract.params, shardings.params),
      'opt_state_bytes': _bytes_per_device(abstract.opt_state,
                                           shardings.opt_state),
      'argument_bytes': memory.argument_size_in_bytes,
      'output_bytes': memory.output_size_in_bytes,
      'alias_bytes': memory.alias_size_in_bytes,
      'temp_bytes': memory.temp_size_in_bytes,
      'flops': float(cost.get('flops', float('nan'))) if cost else float('nan'),
  }


def report(result: dict) -> str:
  gib = lambda b: f'{b / 2**30:.3f} GiB'
  return '\n'.join([
      f"mesh {result['mesh']}, {result['num_params'] / 1e6:.1f}M parameters",
      'per device:',
      f"  params + optimizer state  {gib(result['params_bytes'] + result['opt_state_bytes'])}"
      f"  (params {gib(result['params_bytes'])}, optimizer "
      f"{gib(result['opt_state_bytes'])})",
      f"  arguments                 {gib(result['argument_bytes'])}",
      f"  temporaries               {gib(result['temp_bytes'])}",
      f"  outputs                   {gib(result['output_bytes'])}"
      f"  (aliased to arguments: {gib(result['alias_bytes'])})",
      f"  FLOPs per step            {result['flops']:.4g}",
  ])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  jax.config.update('jax_platforms', 'cpu')
  jax.config.update('jax_num_cpu_devices', FLAGS.devices)
  config = FLAGS.config
  with config.unlocked():
    apply_mesh_flag(config, FLAGS.mesh)
  print(report(analyze(config, FLAGS.vocab_size or config.data.vocab_size)))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
