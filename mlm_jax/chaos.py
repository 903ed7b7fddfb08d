"""Chaos check: kill training at random moments, resume, compare.

  python -m mlm_jax.chaos --config=configs/cpu.py --workdir=/tmp/chaos \
      --kills=5 [--config.num_steps=200 ...]

Runs `mlm_jax.main` once without interruption (WORKDIR/reference), then again
in WORKDIR/chaos, killing it KILLS times with SIGKILL or SIGTERM (both kinds,
in random order) and rerunning the same command each time, then once more to
the end. A quarter of the kills land during start-up (or as training starts,
if the start-up is over first); the others while training, at a random
moment after the run has committed a checkpoint newer than the one it
started from, so that the kill costs it progress it must resume from.

A kill counts only if the next run that got as far as restoring (read from
its log) restored a newer checkpoint than the newest one when the killed run
started: a kill that the next run starts over from the same place tests
nothing about resuming. The
verdict compares the two final checkpoints (parameters, optimizer state,
step, RNG, data position) bit for bit, and the eval metrics at every eval
step. Exit status 0 if identical, 1 if not, 2 (inconclusive) if fewer than
--min_resumed kills counted.

The `--config` and `--config.*` flags are passed to `mlm_jax.main` as given.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from mlm_jax import checkpoint
from mlm_jax import run_dir

# Parsed here so that a typo fails at once; passed on to mlm_jax.main as given.
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/cpu.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Holds reference/ and chaos/.')
_KILLS = flags.DEFINE_integer('kills', 5, 'How many times to kill the run.')
_SEED = flags.DEFINE_integer('kill_seed', 0, 'Seeds the kill moments and signals.')
_STARTUP = flags.DEFINE_float(
    'startup_seconds', 10.0, 'A start-up kill lands within this many seconds '
    'of the start.')
_TIMEOUT = flags.DEFINE_float('timeout', 3600, 'Seconds allowed per run.')
_MIN_RESUMED = flags.DEFINE_integer(
    'min_resumed', 3, 'Kills after which the run resumed from a newer '
    'checkpoint needed for a verdict.')
flags.mark_flags_as_required(['config', 'workdir'])


def _main_command(workdir: str) -> list[str]:
  forwarded = [a for a in sys.argv[1:] if a.startswith('--config')]
  return [sys.executable, '-m', 'mlm_jax.main', f'--workdir={workdir}',
          *forwarded]


def _run_to_end(cmd, log_path) -> float:
  start = time.time()
  with open(log_path, 'a') as log:
    rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                        timeout=_TIMEOUT.value, check=False).returncode
  if rc:
    raise RuntimeError(f'{" ".join(cmd)} exited {rc}; see {log_path}.')
  return time.time() - start


def _log_time(line: str) -> float:
  """Seconds since midnight of an absl log line (`I1127 21:00:30.664 ...`)."""
  hours, minutes, seconds = line.split()[1].split(':')
  return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def _seconds_per_step(log_path: str) -> float:
  """Training seconds per step of a finished run, from its log.

  Measured between the first and last progress lines (`step N/M ...`), so
  the first step's compilation is left out: a later run may compile from
  the persistent cache, or not at all, and must not be timed by it.
  """
  with open(log_path) as f:
    lines = f.read().splitlines()
  progress = [(_log_time(x), int(m.group(1))) for x in lines
              for m in [re.search(r'\] step (\d+)/\d+ ', x)] if m]
  if len(progress) < 2:  # too few windows: the whole training phase
    start = next(x for x in lines if 'Training steps' in x)
    end = next(x for x in reversed(lines) if 'Stopped at step' in x)
    progress = [
        (_log_time(start),
         int(start.split('Training steps ')[1].split('..')[0])),
        (_log_time(end),
         int(end.split('Stopped at step ')[1].split('/')[0]))]
  (t0, s0), (t1, s1) = progress[0], progress[-1]
  return max(t1 - t0, 0.0) / max(s1 - s0, 1)


def _wait_for(condition, proc, deadline: float = float('inf')) -> bool:
  """Waits until condition() (True), or the process ends or the time.time()
  DEADLINE passes (False)."""
  while proc.poll() is None and time.time() < deadline:
    if condition():
      return True
    time.sleep(0.05)
  return False


def _log_has(log_path: str, offset: int, text: str):
  """A condition: TEXT appears in the log after OFFSET."""
  def has() -> bool:
    with open(log_path) as f:
      f.seek(offset)
      return text in f.read()
  return has


def _resumed_from(log_path: str, offset: int):
  """The step a run (its log from OFFSET) restored: 0 for a fresh start,
  None if it was killed before it got that far."""
  with open(log_path) as f:
    f.seek(offset)
    log = f.read()
  m = re.search(r'Restoring checkpoint at step (\d+)', log)
  return int(m.group(1)) if m else (0 if 'Training steps' in log else None)


def resumed_kills(kills: list[tuple[int, bool]], restored: list) -> int:
  """How many kills were followed by a resume from a newer checkpoint.

  `kills`: per killed run, (its newest checkpoint when it started, 0 if
  none; whether the kill landed before the run finished). `restored`: per
  run, the killed ones then the final one, the step it restored (0: fresh;
  None: killed before restoring). Kill i counts if it landed and the next
  run that got as far as restoring restored a newer step than `before`.
  """
  count = 0
  for i, (before, landed) in enumerate(kills):
    after = next(r for r in restored[i + 1:] if r is not None)
    count += landed and after > before
  return count


def _newest_step(workdir: str):
  directory = run_dir.checkpoints_dir(workdir)
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if (
      os.path.isdir(directory)) else []
  return max(steps, default=None)


def _eval_records(workdir: str) -> dict:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return {r['step']: {k: v for k, v in r.items() if k.startswith('eval/')}
          for r in records if any(k.startswith('eval/') for k in r)}


def _compare_states(a, b) -> list[str]:
  flat = lambda t: {jax.tree_util.keystr(p): x for p, x in
                    jax.tree_util.tree_flatten_with_path(t)[0]}
  a, b = flat(a), flat(b)
  problems = [f'{k}: only in one run' for k in sorted(a.keys() ^ b.keys())]
  for k in sorted(a.keys() & b.keys()):
    x, y = np.asarray(a[k]), np.asarray(b[k])
    if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
      diff = (float(np.max(np.abs(x.astype(np.float64) - y)))
              if x.shape == y.shape else 'shape')
      problems.append(f'{k}: differs (max abs difference {diff})')
  return problems


def main(argv):
  del argv
  checkpoint.quiet_orbax_logs()
  root = os.path.abspath(_WORKDIR.value)
  reference, chaos = os.path.join(root, 'reference'), os.path.join(root,
                                                                   'chaos')
  if os.path.exists(chaos):
    raise app.UsageError(f'{chaos} exists: give a new --workdir (the chaos '
                         'run must start from nothing).')
  os.makedirs(root, exist_ok=True)
  rng = random.Random(_SEED.value)

  ref_cmd = _main_command(reference)
  print(f'Reference run: {" ".join(ref_cmd)}', flush=True)
  seconds = _run_to_end(ref_cmd, os.path.join(root, 'reference.log'))
  print(f'  finished in {seconds:.1f} s at step {_newest_step(reference)}.',
        flush=True)
  per_step = _seconds_per_step(os.path.join(root, 'reference.log'))
  num_steps = _CONFIG.value.num_steps

  cmd = _main_command(chaos)
  log_path = os.path.join(root, 'chaos.log')
  kinds = ([signal.SIGKILL, signal.SIGTERM] * _KILLS.value)[:_KILLS.value]
  rng.shuffle(kinds)
  landed, kills, restored = 0, [], []
  checkpoint_every = _CONFIG.value.checkpoint_every
  for i, sig in enumerate(kinds, 1):
    before = _newest_step(chaos)
    with open(log_path, 'a') as log:
      log.write(f'\n=== start {i} ===\n')
      log.flush()
      offset = os.path.getsize(log_path)
      start = time.time()
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
      started = _log_has(log_path, offset, 'Training steps')
      # A quarter of the kills land during start-up (imports, data, restore),
      # the rest while training, after a new checkpoint.
      if rng.random() < 0.25:
        # At a random moment of the first --startup_seconds, or as training
        # starts if that comes first (a start-up can be quicker than that
        # window, e.g. with a warm compilation cache): it always lands.
        moment, wait = 'during start-up', 0.0
        if _wait_for(started, proc, start + rng.uniform(0, _STARTUP.value)):
          moment = 'as training started'
      else:
        _wait_for(lambda: (_newest_step(chaos) or 0) > (before or 0), proc)
        moment = 'after a new checkpoint'
        left = num_steps - (_newest_step(chaos) or 0)
        wait = rng.uniform(0, 0.9 * min(left, checkpoint_every) * per_step)
      try:
        rc = proc.wait(timeout=wait)
        what = f'finished by itself (exit {rc}) before the {sig.name}'
      except subprocess.TimeoutExpired:
        proc.send_signal(sig)
        rc = proc.wait(timeout=_TIMEOUT.value)
        landed += 1
        what = (f'{sig.name} {moment}, {time.time() - start:.1f} s after the '
                f'start, exit {rc}')
    kills.append((before or 0, what.startswith(sig.name)))
    restored.append(_resumed_from(log_path, offset))
    start_of_run = ('it was killed before restoring' if restored[-1] is None
                    else f'it had restored step {restored[-1]}')
    print(f'Kill {i}/{len(kinds)}: {what}; {start_of_run}; newest '
          f'checkpoint: step {before} -> {_newest_step(chaos)}.', flush=True)
    if sig == signal.SIGTERM and rc not in (0, -signal.SIGTERM):
      raise RuntimeError(f'The run exited {rc} after SIGTERM; see {log_path}.')

  offset = os.path.getsize(log_path)
  seconds = _run_to_end(cmd, log_path)
  restored.append(_resumed_from(log_path, offset))
  print(f'Final resume: from step {restored[-1]}, finished in {seconds:.1f} s '
        f'at step {_newest_step(chaos)}.', flush=True)
  resumed = resumed_kills(kills, restored)
  print(f'{resumed} of {len(kinds)} kills were followed by a resume from a '
        'newer checkpoint than the killed run had when it started.',
        flush=True)

  ref_step, ref_state, ref_data = checkpoint.read_latest(
      run_dir.checkpoints_dir(reference))
  got_step, got_state, got_data = checkpoint.read_latest(
      run_dir.checkpoints_dir(chaos))
  problems = []
  if ref_step != got_step:
    problems.append(f'final checkpoint steps differ: {ref_step} vs {got_step}')
  if ref_data != got_data:
    problems.append(f'data positions differ: {ref_data} vs {got_data}')
  problems += _compare_states(ref_state, got_state)
  ref_evals, got_evals = _eval_records(reference), _eval_records(chaos)
  if ref_evals != got_evals:
    problems.append(f'eval metrics differ: {ref_evals} vs {got_evals}')
  leaves = len(jax.tree.leaves(ref_state))
  if problems:
    print('Verdict: DIFFERENT\n  ' + '\n  '.join(problems), flush=True)
    sys.exit(1)
  if resumed < _MIN_RESUMED.value:
    print(f'Verdict: INCONCLUSIVE. The runs agree, but only {resumed} kills '
          f'({landed} landed) were followed by a resume from a newer '
          f'checkpoint; {_MIN_RESUMED.value} are needed. Raise num_steps or '
          'lower checkpoint_every.', flush=True)
    sys.exit(2)
  print(f'Verdict: IDENTICAL. After {landed} kills, {resumed} of them resumed '
        f'from a newer checkpoint, the final checkpoint '
        f'(step {got_step}, {leaves} arrays: parameters, optimizer state, '
        f'RNG; data position {got_data}) is bit-identical to the '
        f'uninterrupted run, and so are the eval metrics at steps '
        f'{sorted(got_evals)}.', flush=True)


if __name__ == '__main__':
  app.run(main)
