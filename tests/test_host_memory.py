"""host_memory: XLA:CPU's per-call buffers stop being page-faulted anew.

Each check runs in a fresh interpreter: the settings only take effect
before JAX starts its CPU client, and they change the process for good.
"""
import json
import os
import subprocess
import sys

import tiny

# A 128 MiB buffer malloc'ed, touched and freed five times, as XLA:CPU does
# with an executable's temporaries on every call (above glibc's largest
# mmap threshold, 32 MiB): the minor page faults of rounds 3-5 tell whether
# the buffer was mapped afresh. Then a jitted function with two 64 MiB matmul
# outputs, which must not fault once memory is kept. (Whether XLA:CPU
# allocates a temporary there depends on its code generation: on the AVX2
# EPYC of 2026-12-01 it faulted 32,185-33,585 pages a call by default, on
# the AVX-512 EPYC of 2026-12-04 about 0, so only glibc's side is asserted
# for the default.)
_FAULTS = """
import ctypes, json, resource, sys
import jax, jax.numpy as jnp
from mlm_jax import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == 'keep' else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
minflt = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
malloc_faults = []
for _ in range(5):
  before = minflt()
  buffer = libc.malloc(128 << 20)
  ctypes.memset(buffer, 1, 128 << 20)
  libc.free(buffer)
  malloc_faults.append(minflt() - before)

@jax.jit
def f(x_NxD, w_DxD):
  h_NxD = jnp.tanh(x_NxD @ w_DxD)
  return jnp.sum(jnp.tanh(h_NxD @ w_DxD) * h_NxD)

x_NxD, w_DxD = jnp.full((16384, 1024), 0.01), jnp.full((1024, 1024), 1e-3)
faults = []
for _ in range(5):
  before = minflt()
  f(x_NxD, w_DxD).block_until_ready()
  faults.append(minflt() - before)
print(json.dumps({'applied': applied, 'malloc_faults': malloc_faults,
                  'faults': faults}))
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
  # By default each round faults in its 128 MiB (32,768 pages of 4 KiB).
  assert not default['applied']
  assert min(default['malloc_faults'][2:]) > 16_000, default
  assert kept['applied'], log[-2000:]
  assert max(kept['malloc_faults'][2:]) < 500, kept
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
