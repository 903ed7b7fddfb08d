"""mlm_jax.aot compiles the train step for a mesh and reports its memory."""
import subprocess
import sys

import jax

from mlm_jax import aot
import tiny


def _config(mesh):
  c = tiny.config('/nonexistent')  # nothing is read from the data dir
  aot.apply_mesh_flag(c, mesh)
  return c


def test_fsdp_divides_state_memory_by_the_devices():
  assert jax.device_count() == 8
  replicated = aot.analyze(_config('data=8'), 1000)
  sharded = aot.analyze(_config('fsdp=8'), 1000)
  assert sharded['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  state = lambda r: r['params_bytes'] + r['opt_state_bytes']
  # About 1/8: vectors without an fsdp axis (the decoder bias over the
  # vocabulary, MLP biases) stay whole; in this tiny model that is 1/6.7.
  assert state(replicated) / 8 < state(sharded) < state(replicated) / 6
  assert sharded['opt_state_bytes'] > sharded['params_bytes']  # Adam: 2x
  assert sharded['argument_bytes'] >= state(sharded)
  assert sharded['flops'] > 0 and sharded['temp_bytes'] > 0


def test_command_line_prints_memory_and_flops():
  out = subprocess.run(
      [sys.executable, '-m', 'mlm_jax.aot', '--config=configs/cpu.py',
       '--devices=2', '--mesh=fsdp=2', '--vocab_size=1000',
       *[f for f in tiny.flags('/nonexistent') if 'data_dir' not in f]],
      cwd=tiny.ROOT, env=tiny.subprocess_env(), capture_output=True,
      text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "mesh {'data': 1, 'fsdp': 2, 'tensor': 1}" in out.stdout
  for line in ('params + optimizer state', 'temporaries', 'FLOPs per step'):
    assert line in out.stdout, out.stdout
