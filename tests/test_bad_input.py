"""Bad input fails with a message that names the problem and the fix, before
the train step is compiled, and leaves every earlier checkpoint byte-identical.
"""
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from mlm_jax import checkpoint
from mlm_jax import run_dir
from mlm_jax import steps
from mlm_jax import train
import tiny


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A workdir with the checkpoint of a 4-step tiny run."""
  workdir = str(tmp_path_factory.mktemp('trained') / 'run')
  train.train_and_evaluate(tiny.config(data_dir, num_steps=4, eval_every=100),
                           workdir)
  return workdir


@pytest.fixture
def never_compiled(monkeypatch):
  """Fails the test if the train step is traced (i.e. compilation started)."""
  def train_step(*args, **kwargs):
    raise AssertionError('the train step was compiled before the error')
  monkeypatch.setattr(steps, 'train_step', train_step)


def _copy(trained, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  return workdir


@pytest.mark.parametrize('overrides, message', [
    # A different model over the same workdir: the differing keys are named.
    ({'model.hidden_dim': 64},
     r'made by a different model:\n  \S+/value: checkpoint has \(32,\) '
     r'float32, the model needs \(64,\) float32'),
    # A tokenizer whose vocabulary does not match the checkpointed model.
    ({'data.vocab_size': 1200},
     r'word/embedding/value: checkpoint has \(1000, 32\) float32, the model '
     r'needs \(1200, 32\)'),
    ({'seq_len': 64}, r'seq_len=64 exceeds model.max_len=32'),
    ({'batch_size': 12}, r'batch_size=12 must be divisible by the 8'),
    ({'nonfinite': 'ignore'}, r"nonfinite='ignore' must be 'stop' or 'skip'"),
])
def test_bad_settings_over_an_existing_run(trained, tmp_path, never_compiled,
                                           overrides, message, data_dir):
  del never_compiled
  workdir = _copy(trained, tmp_path)
  before = tiny.snapshot(os.path.join(workdir, 'checkpoints'))
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(
        tiny.config(data_dir, num_steps=8, **overrides), workdir)
  assert tiny.snapshot(os.path.join(workdir, 'checkpoints')) == before


def test_missing_and_empty_data(trained, tmp_path, never_compiled, data_dir):
  del never_compiled
  workdir = _copy(trained, tmp_path)
  before = tiny.snapshot(os.path.join(workdir, 'checkpoints'))
  missing = str(tmp_path / 'nope.txt')
  with pytest.raises(ValueError, match=f'No such file.*{missing}'):
    train.train_and_evaluate(tiny.config(data_dir, **{'data.source': missing}),
                             workdir)
  empty = tmp_path / 'empty.txt'
  empty.write_text('')
  with pytest.raises(ValueError, match='empty'):
    train.train_and_evaluate(
        tiny.config(data_dir, **{'data.source': str(empty)}), workdir)
  assert tiny.snapshot(os.path.join(workdir, 'checkpoints')) == before


def test_init_from_a_different_model(trained, tmp_path, never_compiled,
                                     data_dir):
  del never_compiled
  params = str(tmp_path / 'params')
  _, state, _ = checkpoint.read_latest(run_dir.checkpoints_dir(trained))
  checkpoint.save_params(params, state['params'])
  with pytest.raises(ValueError,
                     match=r'does not fit the model:\n  \S+/value: checkpoint '
                     r'has \(32,\) float32, the model needs \(64,\)'):
    train.train_and_evaluate(
        tiny.config(data_dir, init_from=params, **{'model.hidden_dim': 64}),
        str(tmp_path / 'w'))


def test_a_mistyped_key_is_named(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  before = tiny.snapshot(os.path.join(workdir, 'checkpoints'))
  out = subprocess.run(
      [sys.executable, '-m', 'mlm_jax.main', '--config=configs/cpu.py',
       f'--workdir={workdir}', '--config.model.hiden_dim=64'],
      cwd=tiny.ROOT, env=tiny.subprocess_env(), capture_output=True,
      text=True, timeout=120)
  assert out.returncode != 0
  assert 'hiden_dim' in out.stderr and 'hidden_dim' in out.stderr
  assert tiny.snapshot(os.path.join(workdir, 'checkpoints')) == before


@pytest.fixture
def small_disk(tmp_path):
  """A 4 MiB tmpfs: a real full disk, with ENOSPC from the kernel."""
  mount = tmp_path / f'disk-{uuid.uuid4().hex[:6]}'
  mount.mkdir()
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs',
                         str(mount)], capture_output=True, text=True)
  if done.returncode:
    pytest.skip(f'cannot mount a tmpfs here (needs root): {done.stderr}')
  yield str(mount)
  subprocess.run(['umount', str(mount)], check=False)


# The failed save's hundreds of late write callbacks print nothing.
@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_a_full_disk_during_a_save_surfaces_and_keeps_earlier_checkpoints(
    trained, small_disk, data_dir):
  workdir = os.path.join(small_disk, 'run')
  shutil.copytree(trained, workdir)
  before = tiny.snapshot(os.path.join(workdir, 'checkpoints'))
  # Fill the disk, leaving room for metrics but not for a checkpoint.
  stat = os.statvfs(small_disk)
  filler = stat.f_bavail * stat.f_frsize - 96 * 1024
  with open(os.path.join(small_disk, 'filler'), 'wb') as f:
    f.write(b'\0' * filler)
  with pytest.raises(Exception) as e:
    train.train_and_evaluate(tiny.config(data_dir, num_steps=8,
                                         eval_every=100), workdir)
  assert 'No space left on device' in repr(e.value) or (
      'RESOURCE_EXHAUSTED' in repr(e.value)), repr(e.value)
  os.remove(os.path.join(small_disk, 'filler'))
  assert tiny.snapshot(os.path.join(workdir, 'checkpoints'))  # still there
  kept = {k: v for k, v in tiny.snapshot(
      os.path.join(workdir, 'checkpoints')).items() if k.startswith('4/')}
  assert kept == before
  # And the next run resumes from it.
  state = train.train_and_evaluate(
      tiny.config(data_dir, num_steps=8, eval_every=100), workdir)
  assert int(state.step) == 8
