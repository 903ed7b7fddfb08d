"""checkpoint: damaged checkpoints are set aside, failed restores stop the run.

A small TrainState saved by the real manager (no training), so each case
takes a second; tests/test_resilience.py has the end-to-end runs.
"""
import asyncio
import gc
import glob
import json
import logging
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import async_path
import pytest
import tensorstore as ts

from mlm_jax import checkpoint
from mlm_jax import run_dir
from mlm_jax import steps
from mlm_jax import train
import tiny

SETTINGS = dict(batch_size=8, seed=0, seq_len=32, source='demo',
                source_fingerprint='abc123')


def _state(step, n=4096):
  """A TrainState of random arrays (incompressible: each in an array file)."""
  value = jax.random.normal(jax.random.key(step), (n,))
  return steps.TrainState(step=jnp.int32(step), params={'w': value},
                          opt_state={'mu': value + 1},
                          rng=jnp.zeros(2, jnp.uint32))


def _abstract():
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.
                                     SingleDeviceSharding(jax.devices()[0])),
      _state(0))


def _workdir(tmp_path, steps=(1, 2), settings=SETTINGS):
  workdir = str(tmp_path / 'run')
  mngr = checkpoint.manager(run_dir.checkpoints_dir(workdir), keep=5,
                            async_save=False)
  for step in steps:
    checkpoint.save(mngr, step, _state(step), {'next_index': step}, settings)
  checkpoint.finish(mngr)
  return workdir


def _restore(workdir, settings=SETTINGS, allow_fresh_start=False):
  mngr = checkpoint.manager(run_dir.checkpoints_dir(workdir), keep=5,
                            async_save=False)
  try:
    return checkpoint.restore_latest(mngr, _abstract(), settings,
                                     allow_fresh_start)
  finally:
    checkpoint.finish(mngr)


def _array_files(step_dir):
  return sorted(glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_*',
                                       'd', '*')), key=os.path.getsize)


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir,
                                                        'checkpoints'))
                if n.isdigit())


def _damage(step_dir, how):
  if how == 'truncated':  # the largest array file, to half
    path = _array_files(step_dir)[-1]
    os.truncate(path, os.path.getsize(path) // 2)
  elif how == 'deleted':
    os.remove(_array_files(step_dir)[-1])
  elif how == 'btree_deleted':  # the index node of the merged database
    for path in glob.glob(os.path.join(step_dir, 'state', 'd', '*')):
      os.remove(path)
  elif how == 'metadata_json':
    with open(os.path.join(step_dir, 'state', '_METADATA'), 'w') as f:
      f.write('{"tree_metadata": {')
  elif how == 'manifest_truncated':
    path = os.path.join(step_dir, 'state', 'manifest.ocdbt')
    os.truncate(path, os.path.getsize(path) // 2)
  else:
    raise ValueError(how)


@pytest.mark.parametrize('how', ['truncated', 'deleted', 'btree_deleted',
                                 'metadata_json', 'manifest_truncated'])
def test_a_damaged_checkpoint_is_set_aside_with_one_full_warning(
    tmp_path, how, caplog):
  workdir = _workdir(tmp_path)
  step_dir = os.path.join(workdir, 'checkpoints', '2')
  _damage(step_dir, how)
  damaged = tiny.snapshot(step_dir)
  with caplog.at_level(logging.WARNING):
    state, iterator_state = _restore(workdir)
  assert int(state.step) == 1 and iterator_state == {'next_index': 1}
  np.testing.assert_array_equal(state.params['w'], _state(1).params['w'])
  kept = glob.glob(os.path.join(workdir, run_dir.CORRUPT_DIR, '2-*'))
  assert len(kept) == 1 and tiny.snapshot(kept[0]) == damaged
  assert _steps(workdir) == [1]
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING]
  assert len(warnings) == 1, warnings
  (message,) = warnings
  assert '\n' not in message
  assert f'Checkpoint 2 ({step_dir}) is damaged' in message
  assert f'Moved it to {kept[0]}' in message
  cause = {'truncated': 'is cut short', 'deleted': 'is missing',
           'btree_deleted': 'is missing', 'metadata_json': 'not valid JSON',
           'manifest_truncated': 'DATA_LOSS'}[how]
  assert cause in message


def test_verify_names_the_file_and_both_sizes(tmp_path):
  workdir = _workdir(tmp_path, steps=(1,))
  step_dir = os.path.join(workdir, 'checkpoints', '1')
  assert checkpoint.verify(step_dir) == []
  path = _array_files(step_dir)[-1]
  size = os.path.getsize(path)
  os.truncate(path, size // 2)
  (problem,) = checkpoint.verify(step_dir)
  prefix = (f'{path} is cut short: {size // 2} bytes, the checkpoint index '
            'needs ')
  assert problem.startswith(prefix)
  assert size // 2 < int(problem[len(prefix):]) <= size


@pytest.mark.parametrize('error', [
    OSError(5, 'Input/output error'),
    MemoryError('host memory exhausted'),
    ValueError('UNAVAILABLE: storage backend unreachable'),
    ValueError('Requested shape: (4096,) is not compatible with the stored '
               'shape'),
], ids=['eio', 'oom', 'unavailable', 'sharding'])
def test_another_restore_error_stops_the_run_and_moves_nothing(
    tmp_path, monkeypatch, error):
  workdir = _workdir(tmp_path)
  before = tiny.snapshot(os.path.join(workdir, 'checkpoints'))
  real_restore = ocp.CheckpointManager.restore

  def failing_restore(self, step, *args, **kwargs):
    composite = kwargs.get('args')
    if composite is not None and 'state' in composite.keys():
      raise RuntimeError('Encountered error while reading array index') from (
          error)
    return real_restore(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', failing_restore)
  with pytest.raises(checkpoint.RestoreError) as e:
    _restore(workdir)
  message = str(e.value)
  step_dir = os.path.join(workdir, 'checkpoints', '2')
  assert message.startswith(f'Checkpoint 2 ({step_dir}) could not be restored')
  assert 'Nothing was moved' in message and 'run the same command' in message
  assert e.value.__cause__.__cause__ is error
  assert tiny.snapshot(os.path.join(workdir, 'checkpoints')) == before
  assert not os.path.exists(os.path.join(workdir, run_dir.CORRUPT_DIR))


def test_a_fresh_start_over_set_aside_checkpoints_needs_the_flag(tmp_path):
  workdir = _workdir(tmp_path, steps=(1,))
  _damage(os.path.join(workdir, 'checkpoints', '1'), 'truncated')
  with pytest.raises(checkpoint.RestoreError,
                     match=r'No checkpoint .* is left to resume from: 1 '
                     r'damaged one\(s\) are set aside .*'
                     r'--config.allow_fresh_start=True'):
    _restore(workdir)
  # Still refused on the next try (the damaged one is already aside) ...
  with pytest.raises(checkpoint.RestoreError, match='allow_fresh_start'):
    _restore(workdir)
  # ... and allowed with the flag, keeping what was set aside.
  assert _restore(workdir, allow_fresh_start=True) is None
  assert len(os.listdir(os.path.join(workdir, run_dir.CORRUPT_DIR))) == 1
  # A workdir without any checkpoint starts fresh without it.
  assert _restore(str(tmp_path / 'new')) is None


@pytest.mark.parametrize('key,value', [
    ('batch_size', 16), ('seed', 1), ('seq_len', 64),
    ('source_fingerprint', 'def456')])
def test_a_changed_data_setting_is_refused_with_saved_and_new_values(
    tmp_path, key, value):
  workdir = _workdir(tmp_path)
  before = tiny.snapshot(os.path.join(workdir, 'checkpoints'))
  with pytest.raises(checkpoint.ResumeSettingsError) as e:
    _restore(workdir, settings={**SETTINGS, key: value})
  message = str(e.value)
  if key == 'source_fingerprint':
    assert "saved 'demo' with fingerprint abc123" in message
    assert 'fingerprint def456' in message
  else:
    assert f'{key}: saved {SETTINGS[key]!r}, now {value!r}' in message
    assert f'--config.{key}={SETTINGS[key]}' in message
  assert 'new --workdir' in message and 'left untouched' in message
  assert tiny.snapshot(os.path.join(workdir, 'checkpoints')) == before


def test_a_checkpoint_saved_without_settings_still_loads(tmp_path, caplog):
  # As written before the settings were saved: the data item is the
  # iterator state itself.
  workdir = str(tmp_path / 'run')
  mngr = checkpoint.manager(run_dir.checkpoints_dir(workdir), keep=5,
                            async_save=False)
  mngr.save(3, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_state(3)),
      data=ocp.args.JsonSave({'next_index': 3})))
  checkpoint.finish(mngr)
  with caplog.at_level(logging.WARNING):
    state, iterator_state = _restore(workdir,
                                     settings={**SETTINGS, 'batch_size': 99})
  assert int(state.step) == 3 and iterator_state == {'next_index': 3}
  assert 'predates the record of data settings' in caplog.text


def test_the_data_item_holds_the_settings_beside_the_position(tmp_path):
  workdir = _workdir(tmp_path, steps=(1,))
  with open(os.path.join(workdir, 'checkpoints', '1', 'data',
                         'metadata')) as f:
    assert json.load(f) == {'iterator': {'next_index': 1},
                            'settings': SETTINGS}


def test_a_resume_with_another_batch_size_fails_before_training(data_dir,
                                                                tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny.config(data_dir, eval_every=100), workdir)
  before = tiny.snapshot(workdir)
  with pytest.raises(ValueError) as e:  # checkpoint.ResumeSettingsError
    train.train_and_evaluate(
        tiny.config(data_dir, eval_every=100, batch_size=16, num_steps=12),
        workdir)
  message = str(e.value)
  assert 'checkpoint at step 8' in message
  assert 'batch_size: saved 8, now 16; set --config.batch_size=8' in message
  assert tiny.snapshot(workdir) == before  # no step, record or file written


def _main(workdir, data_dir, devices, **overrides):
  env = dict(tiny.subprocess_env(),
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  cmd = [sys.executable, '-m', 'mlm_jax.main', '--config=configs/cpu.py',
         f'--workdir={workdir}', *tiny.flags(data_dir, **overrides)]
  out = subprocess.run(cmd, cwd=tiny.ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stderr


# 8 -> 2 -> 8 devices (and a data x fsdp mesh in between) against 8
# throughout: the same global batches, masks and updates; only float32 sums
# run in another order (over 8 shards of the batch, or 2 of 4 rows). The
# largest relative difference of a state leaf (norm of the difference over
# the leaf's norm) measured 6.8e-7 after 12 steps; the bound leaves 10x room
# and is still far below what a wrong data position or optimizer state gives.
TOLERANCE = 1e-5


@pytest.mark.slow
def test_a_run_resumed_on_2_devices_and_back_on_8_matches_8_throughout(
    data_dir, tmp_path):
  common = dict(num_steps=12, eval_every=4, checkpoint_every=4)
  whole = str(tmp_path / 'whole')
  _main(whole, data_dir, 8, **common)
  pieces = str(tmp_path / 'pieces')
  _main(pieces, data_dir, 8, steps_per_run=4, **common)
  log = _main(pieces, data_dir, 2, steps_per_run=4, **{'mesh.data': 1,
                                                       'mesh.fsdp': 2},
              **common)
  assert 'Restoring checkpoint at step 4' in log and 'on 2 devices' in log
  log = _main(pieces, data_dir, 8, **common)
  assert 'Restoring checkpoint at step 8' in log and 'on 8 devices' in log

  want_step, want, want_data = checkpoint.read_latest(
      run_dir.checkpoints_dir(whole))
  got_step, got, got_data = checkpoint.read_latest(
      run_dir.checkpoints_dir(pieces))
  assert want_step == got_step == 12 and want_data == got_data
  assert int(got['step']) == 12
  np.testing.assert_array_equal(got['rng'], want['rng'])
  worst = 0.0
  for a, b in zip(jax.tree.leaves((want['params'], want['opt_state'])),
                  jax.tree.leaves((got['params'], got['opt_state']))):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    worst = max(worst, np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
  print(f'largest relative difference of a state leaf: {worst:.2e}')
  assert worst < TOLERANCE
  want_records, got_records = tiny.read_metrics(whole), tiny.read_metrics(
      pieces)
  assert [r['step'] for r in want_records] == [r['step'] for r in got_records]
  for w, g in zip(want_records, got_records):
    for key in w:
      if key.startswith('eval/') or key in ('train/loss', 'train/accuracy',
                                            'train/grad_norm'):
        np.testing.assert_allclose(g[key], w[key], rtol=TOLERANCE, err_msg=key)


def _abandon_a_failed_task(coroutine):
  """Runs `coroutine` to its error as a task nobody awaits, then drops it."""
  loop = asyncio.new_event_loop()
  task = loop.create_task(coroutine)
  loop.run_until_complete(asyncio.sleep(0.05))
  loop.close()
  assert task.done()  # failed; its exception is never retrieved
  del task
  gc.collect()


class _RaisesWhenCollected:

  def __del__(self):
    raise RuntimeError('Event loop is closed')


def test_a_failed_saves_late_write_callbacks_print_no_traceback(
    tmp_path, monkeypatch):
  """After a failed save, tensorstore's writes still running complete into
  Orbax's closed event loop, each printing a traceback from a C++ thread
  (348 in the full-disk test). The manager hides exactly those."""
  seen, dropped = [], []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  checkpoint.manager(str(tmp_path / 'checkpoints'), keep=1, async_save=False)
  is_late = checkpoint._a_late_write_callback  # pylint: disable=protected-access

  def counted(unraisable):
    dropped.append(is_late(unraisable))
    return dropped[-1]

  monkeypatch.setattr(checkpoint, '_a_late_write_callback', counted)

  async def await_a_write():
    promise, write = ts.Promise.new()
    return promise, asyncio.ensure_future(write)  # its callback: this loop

  loop = asyncio.new_event_loop()
  promise, _ = loop.run_until_complete(await_a_write())
  loop.close()
  promise.set_result(None)  # the write ends after the loop
  deadline = time.monotonic() + 10
  while not dropped and time.monotonic() < deadline:
    time.sleep(0.01)
  assert dropped == [True] and not seen  # it came, and was dropped
  _RaisesWhenCollected()  # anyone else's is still reported
  assert dropped == [True, False]
  (other,) = seen
  assert other.object is not None
  assert str(other.exc_value) == 'Event loop is closed'


def test_a_failed_saves_abandoned_tasks_print_no_traceback(tmp_path, caplog):
  """A full disk during a save leaves one failed Orbax task per array
  fragment that nobody awaits; asyncio logs each with a traceback when it is
  collected, in whatever code runs then (once 336 of them, in another test).
  The manager hides those; the save's own error is raised by finish()."""
  async def not_orbax():
    raise OSError(28, 'No space left on device')

  checkpoint.finish(checkpoint.manager(str(tmp_path / 'checkpoints'), keep=1,
                                      async_save=False))  # installs the filter
  with caplog.at_level(logging.WARNING):
    _abandon_a_failed_task(async_path.read_bytes(epath.Path(
        tmp_path / 'missing')))
    assert not [r for r in caplog.records if r.name == 'asyncio']
    _abandon_a_failed_task(not_orbax())  # anyone else's is still reported
    (record,) = [r for r in caplog.records if r.name == 'asyncio']
  assert 'never retrieved' in record.getMessage()
