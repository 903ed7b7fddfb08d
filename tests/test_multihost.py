"""Two local processes x 4 CPU devices train like one process x 8 devices.

The processes coordinate through jax.distributed on 127.0.0.1 (the real
multi-controller runtime, as on a pod): each reads only its half of every
global batch, checkpoints are written collectively, and only process 0
writes metrics.
"""
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mlm_jax import checkpoint
from mlm_jax import run_dir
from mlm_jax import train
import tiny

# Sums over devices in another order: float32 agreement to 1e-5 relative.
RTOL = 1e-5
_COMPARED = ('train/loss', 'train/accuracy', 'train/grad_norm',
             'train/mask_rate', 'eval/loss', 'eval/accuracy')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_two_processes(data_dir, workdir, overrides):
  port = _free_port()
  env = tiny.subprocess_env()
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
  env['JAX_PLATFORMS'] = 'cpu'
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'mlm_jax.main', '--config=configs/cpu.py',
       f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
       '--num_processes=2', f'--process_id={i}',
       *tiny.flags(data_dir, **overrides)],
      cwd=tiny.ROOT, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  errs = []
  try:
    for p in procs:
      errs.append(p.communicate(timeout=400)[1])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
  return errs


@pytest.mark.slow
def test_two_processes_match_one_process(data_dir, tmp_path):
  assert jax.device_count() == 8
  overrides = {'num_steps': 4, 'eval_every': 4, 'checkpoint_every': 4,
               'mesh.fsdp': 2}
  one = str(tmp_path / 'one')
  train.train_and_evaluate(tiny.config(data_dir, **overrides), one)
  two = str(tmp_path / 'two')
  errs = _run_two_processes(data_dir, two, overrides)
  assert 'JAX process 1/2' in errs[1] and 'JAX process 0/2' in errs[0]

  want, got = tiny.read_metrics(one), tiny.read_metrics(two)
  assert [r['step'] for r in got] == [r['step'] for r in want]
  for w, g in zip(want, got):
    for key in _COMPARED:
      if key in w:
        np.testing.assert_allclose(g[key], w[key], rtol=RTOL, err_msg=key)
  step_one, state_one, data_one = checkpoint.read_latest(
      run_dir.checkpoints_dir(one))
  step_two, state_two, data_two = checkpoint.read_latest(
      run_dir.checkpoints_dir(two))
  assert step_one == step_two == 4
  # The same global data order: the iterator positions agree too.
  assert data_one == data_two
  for a, b in zip(jax.tree.leaves(state_one), jax.tree.leaves(state_two)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
