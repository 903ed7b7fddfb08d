"""Curves of runs to a PNG."""
import json
import os
import subprocess
import sys

import pytest

from mlm_jax import plot
import tiny


def _fake_run(directory, losses, eval_every=2, batch_size=4, seq_len=8):
  os.makedirs(directory)
  with open(os.path.join(directory, 'metrics.jsonl'), 'w') as f:
    for step, loss in enumerate(losses, 1):
      f.write(json.dumps({'step': step, 'train/loss': loss,
                          'train/accuracy': 1 / loss}) + '\n')
      if step % eval_every == 0:
        f.write(json.dumps({'step': step, 'eval/loss': loss + 0.1,
                            'eval/accuracy': 0.9 / loss}) + '\n')
    f.write('{"step": 99, "train/lo')  # cut short by a kill: ignored
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump({'batch_size': batch_size, 'seq_len': seq_len}, f)
  return str(directory)


def test_reads_series_in_step_order_and_tokens_per_step(tmp_path):
  run = plot.read_run(_fake_run(tmp_path / 'a', [5.0, 4.0, 3.0, 2.5]))
  assert run['tokens_per_step'] == 32
  assert plot.series(run['records'], 'eval/loss') == ([2, 4], [4.1, 2.6])
  assert plot.series(run['records'], 'train/loss')[0] == [1, 2, 3, 4]


def test_cli_draws_two_runs_to_a_png(tmp_path):
  a = _fake_run(tmp_path / 'a', [5.0, 4.0, 3.0, 2.5])
  b = _fake_run(tmp_path / 'b', [5.0, 4.5, 4.0, 3.5], batch_size=8)
  out = tmp_path / 'curves.png'
  result = subprocess.run(
      [sys.executable, '-m', 'mlm_jax.plot', f'--workdir={a}',
       f'--workdir={b}', '--label=15%', '--label=30%', f'--out={out}'],
      cwd=tiny.ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  with open(out, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert os.path.getsize(out) > 20_000  # four panels with curves, not blank


def test_bad_workdirs_are_named(tmp_path):
  with pytest.raises(ValueError, match='is .* the --workdir of a training run'):
    plot.read_run(str(tmp_path / 'nothing'))
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'metrics.jsonl').write_text('')
  with pytest.raises(ValueError, match='holds no metrics'):
    plot.read_run(str(tmp_path / 'empty'))
  result = subprocess.run(
      [sys.executable, '-m', 'mlm_jax.plot', f'--workdir={tmp_path}',
       '--label=a', '--label=b'],
      cwd=tiny.ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and '2 --label for 1 --workdir' in (
      result.stderr)
