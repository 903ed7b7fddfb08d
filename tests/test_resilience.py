"""Nothing lost: preemption, kills, corrupt checkpoints, non-finite steps."""
import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import orbax.checkpoint as ocp

from mlm_jax import chaos
from mlm_jax import checkpoint
from mlm_jax import run_dir
from mlm_jax import train
import tiny


def _leaves_equal(a, b):
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _checkpoint_steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, 'checkpoints'))
                if n.isdigit())


@pytest.mark.slow
def test_sigterm_saves_the_step_and_exits_0(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'mlm_jax.main', '--config=configs/cpu.py',
         f'--workdir={workdir}',
         *tiny.flags(data_dir, num_steps=10_000, log_every=1,
                     eval_every=10_000, checkpoint_every=10_000)]
  proc = subprocess.Popen(cmd, cwd=tiny.ROOT, env=tiny.subprocess_env(),
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 300
  while not (os.path.exists(metrics) and os.path.getsize(metrics)):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  stopped = [line for line in stderr.splitlines() if 'SIGTERM at step' in line]
  assert len(stopped) == 1, stderr[-3000:]
  step = int(stopped[0].split('SIGTERM at step ')[1].split(':')[0])
  assert 0 < step < 10_000
  assert _checkpoint_steps(workdir) == [step]
  assert tiny.read_metrics(workdir)[-1]['step'] == step


@pytest.mark.slow
def test_chaos_check_with_five_kills_is_bit_identical(data_dir, tmp_path):
  cmd = [sys.executable, '-m', 'mlm_jax.chaos', '--config=configs/cpu.py',
         f'--workdir={tmp_path}', '--kills=5', '--kill_seed=1',
         # Long enough that every kill lands before the end, even when
         # start-ups compile from the suite's persistent cache and a
         # tiny step takes milliseconds.
         *tiny.flags(data_dir, num_steps=300, checkpoint_every=30,
                     log_every=10, eval_every=100)]
  out = subprocess.run(cmd, cwd=tiny.ROOT, env=tiny.subprocess_env(),
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  kills = [line for line in out.stdout.splitlines()
           if line.startswith('Kill ')]
  assert len(kills) == 5, out.stdout
  assert any('SIGKILL' in k for k in kills) and any('SIGTERM' in k
                                                   for k in kills)
  assert 'Verdict: IDENTICAL' in out.stdout, out.stdout
  (counted,) = [line for line in out.stdout.splitlines()
                if 'kills were followed by a resume' in line]
  assert int(counted.split(' of ')[0]) >= 3, out.stdout


def test_the_chaos_check_counts_only_kills_that_a_newer_resume_followed():
  landed = lambda befores: [(b, True) for b in befores]
  # The README's old transcript: a kill before any checkpoint, a SIGTERM
  # that saved step 11, then three kills that the next run resumed from
  # step 11 again. One kill tested resuming; the check required 3.
  assert chaos.resumed_kills(landed([0, 0, 11, 11, 11]),
                             [0, 0, 11, 11, 11, 11]) == 1
  # Kill 3 lands during start-up, before its run restores (None): kill 2
  # counts by the run after it, kill 3 not (that run restored step 101,
  # the newest when the killed run started).
  assert chaos.resumed_kills(landed([0, 30, 101, 101, 120]),
                             [0, 30, None, 101, 120, 179]) == 4
  # A run that finished by itself before its kill is no kill.
  assert chaos.resumed_kills([(0, True), (30, False)], [0, 30, 300]) == 1


def _corrupt(step_dir, how):
  files = glob.glob(os.path.join(step_dir, 'state', 'd', '*'))
  assert files
  for path in files:
    if how == 'truncated':
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 2)
    else:
      os.remove(path)


@pytest.mark.parametrize('how', ['truncated', 'missing'])
def test_a_corrupt_newest_checkpoint_is_kept_and_the_previous_one_used(
    data_dir, tmp_path, how, caplog):
  workdir = str(tmp_path / 'run')
  whole = train.train_and_evaluate(tiny.config(data_dir, eval_every=100),
                                   workdir)
  assert _checkpoint_steps(workdir) == [4, 8]
  _corrupt(os.path.join(workdir, 'checkpoints', '8'), how)
  corrupt_files = tiny.snapshot(os.path.join(workdir, 'checkpoints', '8'))
  # A half-written save (Orbax's temporary name) is never chosen either.
  os.makedirs(os.path.join(workdir, 'checkpoints',
                           '12.orbax-checkpoint-tmp-1234', 'state'))

  resumed = train.train_and_evaluate(tiny.config(data_dir, eval_every=100),
                                     workdir)
  assert 'Checkpoint 8' in caplog.text and 'Moved' in caplog.text
  kept = glob.glob(os.path.join(workdir, run_dir.CORRUPT_DIR, '8-*'))
  assert len(kept) == 1 and tiny.snapshot(kept[0]) == corrupt_files
  # Resumed from step 4, the run redid steps 5-8 exactly.
  assert int(resumed.step) == 8 and _checkpoint_steps(workdir) == [4, 8]
  assert _leaves_equal(whole.params, resumed.params)
  assert _leaves_equal(whole.opt_state, resumed.opt_state)


def test_nonfinite_stop_names_the_step_and_saves_nothing_after(data_dir,
                                                              tmp_path):
  workdir = str(tmp_path / 'run')
  # A huge learning rate: the update at step 2 overflows the next loss.
  config = tiny.config(data_dir, learning_rate=1e30, checkpoint_every=1,
                       log_every=4, eval_every=100)
  with pytest.raises(FloatingPointError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  bad = int(message.split('at step ')[1].split(';')[0])
  assert f'last good checkpoint is step {bad - 1}' in message
  assert '--config.nonfinite=skip' in message
  assert _checkpoint_steps(workdir) == list(range(1, bad))
  step, state, _ = checkpoint.read_latest(run_dir.checkpoints_dir(workdir))
  assert step == bad - 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_nonfinite_skip_counts_the_steps_and_keeps_the_state_finite(
    data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  config = tiny.config(data_dir, learning_rate=1e30, nonfinite='skip',
                       log_every=4, eval_every=100)
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 8
  skipped = [r['train/nonfinite_steps'] for r in tiny.read_metrics(workdir)
             if 'train/nonfinite_steps' in r]
  assert len(skipped) == 2 and 0 < sum(skipped) <= 8
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree.leaves(state.params))
  _, saved, _ = checkpoint.read_latest(run_dir.checkpoints_dir(workdir))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))


def test_a_resumed_run_moves_metrics_written_after_its_checkpoint_aside(
    data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(tiny.config(data_dir, eval_every=100), workdir)
  # As if killed at step 8 before its checkpoint (and mid-line).
  checkpoint_8 = os.path.join(workdir, 'checkpoints', '8')
  os.rename(checkpoint_8, checkpoint_8 + '.orbax-checkpoint-tmp-1')
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 9, "train/lo')
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = f.read().splitlines()
  train.train_and_evaluate(tiny.config(data_dir, eval_every=100), workdir)
  steps = [r['step'] for r in tiny.read_metrics(workdir)
           if 'train/loss' in r]
  assert steps == [2, 4, 6, 8]
  # Nothing deleted: the records after step 4 (6, 8 and the cut line) are
  # in a dated file beside metrics.jsonl, as they were.
  (replaced,) = glob.glob(os.path.join(workdir, 'metrics.jsonl.replaced-*'))
  with open(replaced) as f:
    moved = f.read().splitlines()
  assert moved == [line for line in lines
                   if not line.startswith(('{"step": 2,', '{"step": 4,'))]
  assert moved[0].startswith('{"step": 6, ')
  assert moved[-1] == '{"step": 9, "train/lo'


def test_a_failed_restore_stops_the_run_and_moves_nothing(data_dir, tmp_path,
                                                          monkeypatch):
  workdir = str(tmp_path / 'run')
  config = tiny.config(data_dir, eval_every=100)
  train.train_and_evaluate(config, workdir)
  before = tiny.snapshot(workdir)

  def out_of_memory(self, step, *args, **kwargs):
    raise MemoryError('host memory exhausted while restoring')

  # Every restore fails as a machine out of memory would: nothing may be set
  # aside, and the run must not start again from step 0.
  monkeypatch.setattr(ocp.CheckpointManager, 'restore', out_of_memory)
  with pytest.raises(RuntimeError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert 'Checkpoint 8' in message and 'MemoryError: host memory' in message
  assert 'Nothing was moved' in message
  assert tiny.snapshot(workdir) == before


def _main(workdir, data_dir, prelude='', **overrides):
  """Runs `python -m mlm_jax.main` on the tiny config (after PRELUDE code)."""
  argv = ['main', '--config=configs/cpu.py', f'--workdir={workdir}',
          *tiny.flags(data_dir, **overrides)]
  code = (f'import sys\n{prelude}\nfrom absl import app\n'
          f'from mlm_jax import main\nsys.argv = {argv!r}\napp.run(main.main)')
  return subprocess.run([sys.executable, '-c', code], cwd=tiny.ROOT,
                        env=tiny.subprocess_env(), capture_output=True,
                        text=True, timeout=600)


@pytest.mark.slow
def test_a_damaged_checkpoint_costs_one_log_line_and_no_traceback(
    data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  out = _main(workdir, data_dir, eval_every=100)
  assert out.returncode == 0, out.stderr[-3000:]
  clean = _main(str(tmp_path / 'clean'), data_dir, eval_every=100)
  step_dir = os.path.join(workdir, 'checkpoints', '8')
  largest = max(glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_*',
                                       'd', '*')), key=os.path.getsize)
  size = os.path.getsize(largest)
  os.truncate(largest, size // 2)

  out = _main(workdir, data_dir, eval_every=100)
  assert out.returncode == 0, out.stderr[-3000:]
  log = out.stderr.splitlines()
  for noise in ('Traceback', 'Exception ignored', 'Event loop is closed'):
    assert not any(noise in line for line in log), out.stderr[-3000:]
  about = [line for line in log if 'heckpoint 8' in line or
           run_dir.CORRUPT_DIR in line]
  # The one warning, in full: the step, its path, the cause, where it went.
  assert len(about) == 1, about
  (kept,) = glob.glob(os.path.join(workdir, run_dir.CORRUPT_DIR, '8-*'))
  assert f'Checkpoint 8 ({step_dir}) is damaged: {largest} is cut short: ' \
         f'{size // 2} bytes' in about[0]
  assert f'Moved it to {kept} (kept, not deleted)' in about[0]
  assert 'Restoring checkpoint at step 4' in out.stderr
  # Beyond that warning, the resumed run logs what a clean run logs (plus
  # the line about the metrics records it moved aside).
  assert len(log) <= len(clean.stderr.splitlines()) + 3, out.stderr[-3000:]


# Replaces checkpoint.save in a child run: once the checkpoint of step
# KILL_AT is committed, the process dies at once, as under SIGKILL.
_DIE_AFTER_SAVE = '''
import os
from mlm_jax import checkpoint
_save = checkpoint.save
def save(mngr, step, *args):
  _save(mngr, step, *args)
  if step == {step}:
    mngr.wait_until_finished()
    os._exit(9)
checkpoint.save = save
'''


@pytest.mark.slow
def test_a_kill_right_after_a_checkpoint_loses_no_record(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  # Step 4 is a log step and a checkpoint step, not an eval step.
  out = _main(workdir, data_dir, prelude=_DIE_AFTER_SAVE.format(step=4),
              eval_every=100)
  assert out.returncode == 9, out.stderr[-3000:]
  assert _checkpoint_steps(workdir) == [4]
  assert [r['step'] for r in tiny.read_metrics(workdir)] == [2, 4]
  out = _main(workdir, data_dir, eval_every=100)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'Restoring checkpoint at step 4' in out.stderr
  steps = [r['step'] for r in tiny.read_metrics(workdir) if 'train/loss' in r]
  assert steps == [2, 4, 6, 8]
