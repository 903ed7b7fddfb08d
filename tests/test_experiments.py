"""The committed experiments: configs load, and report.py rebuilds each table."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

import tiny

EXPERIMENTS = {
    '2026-11-27_mask_rate': ['rate15', 'rate30', 'rate40'],
    '2026-11-27_mask_strategy': ['token', 'whole_word', 'span'],
    '2026-11-27_bert_vs_modern': ['bert', 'modern'],
}


def _load_config(folder):
  path = os.path.join(tiny.ROOT, 'experiments', folder, 'config.py')
  spec = importlib.util.spec_from_file_location('exp_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('folder', sorted(EXPERIMENTS))
def test_report_rebuilds_the_readme_table_from_the_stored_runs(folder,
                                                               tmp_path):
  arms = EXPERIMENTS[folder]
  exp = os.path.join(tiny.ROOT, 'experiments', folder)
  out = subprocess.run(
      [sys.executable, 'experiments/report.py', os.path.join(exp, 'runs'),
       f'--arms={",".join(arms)}', f'--plot={tmp_path / "curves.png"}'],
      cwd=tiny.ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [line for line in out.stdout.splitlines() if line.startswith('| ')]
  with open(os.path.join(exp, 'README.md')) as f:
    readme = f.read()
  for row in rows:  # the header and one row per arm, exactly as committed
    assert row in readme, f'{folder}/README.md lacks the table row {row!r}'
  assert len(rows) == 1 + len(arms)
  assert (tmp_path / 'curves.png').stat().st_size > 10_000
  assert os.path.exists(os.path.join(exp, 'curves.png'))


def _flat(tree, prefix=''):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


@pytest.mark.parametrize('folder', sorted(EXPERIMENTS))
def test_each_arm_config_is_its_stored_run(folder):
  """config.py's arms still produce the configs the stored runs used.

  Every key of a stored run's config.json must still exist with the same
  value: a renamed or removed key fails here. Keys added since (absent from
  the stored run) are allowed; their defaults must keep old runs' meaning.
  """
  import json  # pylint: disable=g-import-not-at-top
  module = _load_config(folder)
  for arm in EXPERIMENTS[folder]:
    with open(os.path.join(tiny.ROOT, 'experiments', folder, 'runs', arm,
                           'config.json')) as f:
      stored = _flat(json.load(f))
    made = _flat(module.get_config(arm).to_dict())
    missing = sorted(set(stored) - set(made))
    assert not missing, (folder, arm, 'keys of the stored run that the '
                         'config no longer has (renamed or removed?)', missing)
    changed = {k: (stored[k], made[k]) for k in stored if stored[k] != made[k]}
    assert not changed, (folder, arm, changed)
    assert re.fullmatch(r'\w+', arm)
