"""host_memory: XLA:CPU's per-call buffers stop being page-faulted anew.

Each check runs in a fresh interpreter: the settings only take effect
before JAX starts its CPU client, and they change the process for good.
"""
import json
import os
import subprocess
import sys

import tiny

# A jitted function whose two 64 MiB matmul outputs live in XLA's temporary
# buffer (above glibc's largest mmap threshold, 32 MiB): the minor page
# faults of calls 3-5 tell whether the buffer was mapped afresh.
_FAULTS = """
import json, resource, sys
import jax, jax.numpy as jnp
from mlm_jax import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else False

@jax.jit
def f(x_NxD, w_DxD):
  h_NxD = jnp.tanh(x_NxD @ w_DxD)
  return jnp.sum(jnp.tanh(h_NxD @ w_DxD) * h_NxD)

x_NxD, w_DxD = jnp.full((16384, 1024), 0.01), jnp.full((1024, 1024), 1e-3)
faults = []
for _ in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x_NxD, w_DxD).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({'applied': applied, 'faults': faults}))
"""


def _run(code, *args, **env):
  out = subprocess.run(
      [sys.executable, '-c', code, *args], cwd=tiny.ROOT, capture_output=True,
      text=True, timeout=300, env={**tiny.subprocess_env(), **env})
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_kept_memory_is_not_faulted_again_on_later_calls():
  default, _ = _run(_FAULTS, 'default', JAX_PLATFORMS='cpu')
  kept, log = _run(_FAULTS, 'keep', JAX_PLATFORMS='cpu')
  # Without it, each call faults in its 128 MiB of temporaries (32,768 pages
  # of 4 KiB; measured 32,185-33,585 here).
  assert not default['applied']
  assert min(default['faults'][2:]) > 16_000, default
  assert kept['applied'], log[-2000:]
  assert max(kept['faults'][2:]) < 500, kept


def test_too_late_once_the_backend_has_started():
  code = """
import json, jax
from mlm_jax import host_memory
jax.devices()
print(json.dumps([host_memory.keep_freed_memory(), host_memory.applied()]))
"""
  result, log = _run(code, JAX_PLATFORMS='cpu')
  assert result == [False, False]
  assert 'already started its CPU client' in log


def test_only_for_cpu_only_processes():
  code = """
import json
from mlm_jax import host_memory
print(json.dumps([host_memory.cpu_only(), host_memory.keep_freed_memory(),
                  host_memory.applied()]))
"""
  # JAX_PLATFORMS decides when set.
  assert _run(code, JAX_PLATFORMS='cpu')[0] == [True, True, True]
  assert _run(code, JAX_PLATFORMS='cuda,cpu')[0] == [False, False, False]
  # Unset: this machine has no accelerator plugin, so CPU only.
  env = {k: v for k, v in tiny.subprocess_env().items()
         if k != 'JAX_PLATFORMS'}
  out = subprocess.run([sys.executable, '-c', code], cwd=tiny.ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  has_plugin = any(
      os.path.isdir(os.path.join(p, 'jax_plugins')) or
      os.path.isdir(os.path.join(p, 'libtpu')) for p in sys.path if p)
  assert json.loads(out.stdout.strip().splitlines()[-1])[0] == (
      not has_plugin)
