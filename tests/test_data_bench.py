"""`python -m mlm_jax.bench data` at a tiny size: it runs and reports."""

import json
import os
import subprocess
import sys

import pytest

from mlm_jax import bench_data
from mlm_jax.data import sources
from mlm_jax.data import wiki


def test_corpus_copies_are_distinct_documents(tmp_path):
  demo = list(sources.documents(sources.DEMO))
  size_mb = 1.5 * sum(map(len, demo)) / 1e6  # a copy and a half
  path = bench_data.make_corpus('text', size_mb, str(tmp_path))
  docs = list(sources.documents(path))
  assert sum(map(len, docs)) >= size_mb * 1e6
  assert len(set(docs)) == len(docs) > len(demo)  # the copies differ
  assert docs[:3] != demo[:3]  # each copy has its own order
  assert bench_data.make_corpus('text', size_mb, str(tmp_path)) == path


@pytest.mark.slow
def test_bench_data_reports_every_format_and_worker_count(tmp_path):
  out = tmp_path / 'r.json'
  run = subprocess.run(
      [sys.executable, '-m', 'mlm_jax.bench', 'data', '--data_mb=0.3',
       '--data_workers=1,2', f'--data_root={tmp_path}', f'--json={out}'],
      env=dict(os.environ, PYTHONPATH=os.getcwd()), capture_output=True,
      text=True, check=True, timeout=900)
  result = json.loads(out.read_text())
  runs = {(r['format'], r['workers']): r for r in result['runs']}
  assert set(runs) == {(f, w) for f in ('text', 'xml', 'jsonl', 'parquet')
                       for w in (1, 2)}
  for (fmt, workers), r in runs.items():
    assert r['mb'] >= 0.3 and r['tokens'] > 0 and r['mb_per_s'] > 0
    assert r['peak_rss_tree_mb'] >= r['peak_rss_main_mb'] > 50
    assert r['speedup'] > 0
    # The same corpus gives the same rows whatever the worker count.
    assert r['rows'] == runs[fmt, 1]['rows'] and r['tokens'] == runs[
        fmt, 1]['tokens']
  # Two workers: the workers' memory is counted too.
  assert runs['text', 2]['peak_rss_tree_mb'] > runs['text', 2][
      'peak_rss_main_mb']
  assert 'speed-up' in run.stdout and 'parquet' in run.stdout


def _run(workers, repeat, seconds, alongside=1):
  return dict(format='text', workers=workers, resolved_workers=workers or 2,
              repeat=repeat, alongside=alongside, mb=100.0, seconds=seconds,
              cpu_s=seconds, peak_rss_tree_mb=100.0,
              speedup=None)


def test_summary_takes_medians_over_repeats_and_the_hosts_ceiling():
  runs = [_run(1, 0, 40.0), _run(0, 0, 20.0), _run(1, 1, 60.0),
          _run(0, 1, 40.0), _run(1, 2, 44.0), _run(0, 2, 24.0),
          # Two serial builds at once, per repeat: the slower one counts.
          _run(1, 0, 42.0, 2), _run(1, 0, 44.0, 2),
          _run(1, 2, 48.0, 2), _run(1, 2, 55.0, 2)]
  rows = {r['workers']: r for r in bench_data.summarize(runs)}
  assert rows[1]['median_s'] == 44.0 and rows[1]['speedup'] == 1.0
  assert rows[0]['median_s'] == 24.0 and rows[0]['builds'] == 3
  assert rows[0]['speedup'] == pytest.approx(44 / 24)  # of the medians
  assert (rows[0]['min_s'], rows[0]['max_s']) == (20.0, 40.0)
  ceiling = rows['side by side']
  assert ceiling['builds'] == 2  # repeat 1 ran none
  assert ceiling['pair_speedups'] == pytest.approx([2 * 40 / 44, 2 * 44 / 55])
  assert ceiling['ceiling'] == pytest.approx((80 / 44 + 88 / 55) / 2)


def test_the_multistream_corpus_holds_the_dumps_pages(tmp_path):
  one = bench_data.make_corpus('xml', 0.3, str(tmp_path))
  many = bench_data.make_corpus('xml-ms', 0.3, str(tmp_path))
  assert not wiki.is_multistream(one) and wiki.is_multistream(many)
  assert list(sources.documents(many)) == list(sources.documents(one))


@pytest.mark.timeout(120)
def test_a_build_that_logs_a_lot_does_not_block(monkeypatch):
  """A child's log is not a pipe we would have to drain while polling."""
  monkeypatch.setattr(bench_data, '_CHILD', (
      'import json, sys\n'
      'sys.stderr.write("x" * (1 << 20))\n'  # 16 pipe buffers
      'print("RESULT " + json.dumps(dict(seconds=1.5)))\n'))
  (result,) = bench_data.builds([{}], dict(os.environ))
  assert result['seconds'] == 1.5 and result['peak_rss_tree'] >= 0


def test_a_bad_format_fails_before_any_work(tmp_path):
  run = subprocess.run(
      [sys.executable, '-m', 'mlm_jax.bench', 'data', '--data_formats=xmlms',
       f'--data_root={tmp_path / "root"}'],
      env=dict(os.environ, PYTHONPATH=os.getcwd()), capture_output=True,
      text=True)
  assert run.returncode != 0
  assert "Unknown --data_formats ['xmlms']; choose from" in run.stderr
  assert not (tmp_path / 'root').exists()  # no tokenizer trained, no corpus
