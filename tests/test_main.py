"""End-to-end: the real entry point, resume, and sharding over 8 devices."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mlm_jax import train
import tiny

ROOT = tiny.ROOT
_config = tiny.config
_flags = tiny.flags
_read_metrics = tiny.read_metrics


@pytest.mark.slow
def test_main_trains_writes_metrics_and_resumes(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  env = tiny.subprocess_env()
  cmd = [sys.executable, '-m', 'mlm_jax.main', '--config=configs/cpu.py',
         f'--workdir={workdir}', *_flags(data_dir)]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  records = _read_metrics(workdir)
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert train_steps == [2, 4, 6, 8]
  last_eval = [r for r in records if 'eval/loss' in r][-1]
  assert last_eval['step'] == 8
  for key in ('eval/accuracy', 'eval/mask_accuracy', 'eval/baseline_accuracy'):
    assert 0.0 <= last_eval[key] <= 1.0
  first = next(r for r in records if 'train/loss' in r)
  for key in ('train/learning_rate', 'train/grad_norm',
              'train/tokens_per_second', 'train/mask_accuracy',
              'train/frac_mask', 'train/frac_random', 'train/frac_kept',
              'train/mean_span_length'):
    assert np.isfinite(first[key])
  assert all(r['train/special_masked'] == 0 for r in records
             if 'train/loss' in r)
  # round(0.15 * ~31 maskable tokens) = 5 per row of 32: about 0.16.
  assert abs(first['train/mask_rate'] - 0.15) < 0.02
  for key in ('eval/random_accuracy', 'eval/kept_accuracy'):
    assert key in last_eval
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  assert 'ETA' in out.stderr
  # CPU only, so glibc keeps XLA's freed buffers (host_memory.py).
  assert 'glibc keeps freed memory' in out.stderr

  # The same command with more steps resumes from step 8, never from 0.
  more = [c for c in cmd if not c.startswith('--config.num_steps')]
  out = subprocess.run(more + ['--config.num_steps=10'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Restoring checkpoint at step 8' in out.stderr
  steps = [r['step'] for r in _read_metrics(workdir) if 'train/loss' in r]
  assert steps == [2, 4, 6, 8, 10]


def test_a_misspelt_config_key_fails(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'mlm_jax.main', '--config=configs/cpu.py',
       f'--workdir={tmp_path}', '--config.learnig_rate=1e-3'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert 'learnig_rate' in out.stderr


def test_bad_settings_fail_before_any_work(tmp_path):
  for overrides, message in [({'seq_len': 64}, 'model.max_len'),
                             ({'batch_size': 12}, 'divisible'),
                             ({'mask.max_predictions': 2}, 'max_predictions'),
                             ({'data.source': str(tmp_path / 'nope.txt')},
                              'nope.txt')]:
    with pytest.raises(ValueError, match=message):
      train.train_and_evaluate(_config(str(tmp_path), **overrides),
                               str(tmp_path / 'w'))
    assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


@pytest.mark.slow
@pytest.mark.parametrize('strategy', ['whole_word', 'span'])
def test_word_strategies_and_a_rate_schedule_train(data_dir, tmp_path,
                                                   strategy):
  train.train_and_evaluate(
      _config(data_dir, **{'mask.strategy': strategy, 'mask.rate': 0.4,
                           'mask.schedule': 'linear', 'mask.final_rate': 0.2,
                           'num_steps': 4, 'log_every': 1}),
      str(tmp_path))
  records = [r for r in _read_metrics(str(tmp_path)) if 'train/loss' in r]
  rates = [r['train/mask_rate'] for r in records]
  # The rate falls from 0.4 towards 0.2 (whole words may leave a little
  # budget unused, so allow a few points below).
  assert 0.33 < rates[0] <= 0.41 and rates[-1] < rates[0]
  assert all(r['train/special_masked'] == 0 for r in records)
  assert records[-1]['train/mean_span_length'] >= 1.0


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(data_dir, tmp_path):
  assert jax.device_count() == 8  # the batch is sharded over 8 devices
  overrides = {'model.dropout_rate': 0.1, 'eval_every': 100}
  whole = train.train_and_evaluate(_config(data_dir, **overrides),
                                   str(tmp_path / 'whole'))
  for _ in range(3):  # steps 0-3, 3-6, 6-8, each in a fresh call
    pieces = train.train_and_evaluate(
        _config(data_dir, steps_per_run=3, **overrides),
        str(tmp_path / 'pieces'))
  assert int(whole.step) == int(pieces.step) == 8
  for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(pieces.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  for a, b in zip(jax.tree.leaves(whole.opt_state),
                  jax.tree.leaves(pieces.opt_state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # A different number of steps in one go would differ: the test can fail.
  shorter = train.train_and_evaluate(_config(data_dir, num_steps=7,
                                             **overrides),
                                     str(tmp_path / 'shorter'))
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(whole.params), jax.tree.leaves(shorter.params)))
