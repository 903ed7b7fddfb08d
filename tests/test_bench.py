"""The benchmark tool: its token rows, its HF tokenizer, one tiny real run."""
import json
import os
import subprocess
import sys

import numpy as np

from mlm_jax import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_packed_rows_look_like_the_builders():
  ids = bench.packed_rows(np.random.default_rng(0), 64, 48, 1000)
  assert ids.dtype == np.int32 and ids.shape == (64, 48)
  assert (ids[:, 0] == bench.CLS).all()
  body = ids[:, 1:]
  assert ((body >= len(bench.SPECIAL_IDS)) | (body == bench.SEP) |
          (body == bench.PAD)).all() and body.max() < 1000
  assert (ids == bench.SEP).sum() > 64  # several documents per row
  padded = (ids == bench.PAD).any(axis=1)
  assert 0 < padded.sum() < 64
  for row in ids[padded]:
    # [PAD]s only as a suffix, right after a [SEP].
    first = int(np.argmax(row == bench.PAD))
    assert (row[first:] == bench.PAD).all() and row[first - 1] == bench.SEP


def test_hf_tokenizer_has_our_special_ids():
  tokenizer = bench.bert_tokenizer(100)
  assert len(tokenizer) == 100
  assert sorted(tokenizer.all_special_ids) == sorted(bench.SPECIAL_IDS)
  assert tokenizer.mask_token_id == bench.MASK


def test_masking_bench_reports_both_contenders(tmp_path):
  out = tmp_path / 'masking.json'
  cmd = [sys.executable, '-m', 'mlm_jax.bench', 'masking', '--batch_size=8',
         '--seq_len=32', '--repeats=4', '--warmup=1', '--block=2',
         f'--json={out}']
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       check=False,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'speedup' in run.stdout
  result = json.loads(out.read_text())
  assert result['batch_shape'] == [8, 32] and result['repeats'] == 4
  assert result['block'] == 2
  assert set(result['contenders']) == {'mlm_jax', 'hf'}
  for c in result['contenders'].values():
    assert c['median_s'] > 0 and c['tokens_per_s'] > 0
  ours = result['contenders']['mlm_jax']
  assert 0 < ours['host_median_s'] <= ours['max_s']
  assert result['speedup_ours_over_hf'] > 0


def test_contenders_take_turns_of_block_calls():
  calls = []
  contenders = {name: (lambda step, name=name: calls.append((name, step)))
                for name in ('a', 'b')}
  times = bench._time_interleaved(contenders, warmup=1, repeats=5, block=2)
  assert {name: len(t) for name, t in times.items()} == {'a': 5, 'b': 5}
  # Warmup alternates; then turns of 2 (the last turn short), each turn
  # started by the contender that went second in the turn before.
  assert ''.join(name for name, _ in calls) == 'ab' + 'aabb' + 'bbaa' + 'ab'
  assert [step for name, step in calls if name == 'a'] == [0, 1, 2, 3, 4, 5]


def test_unknown_subcommand_is_a_usage_error():
  run = subprocess.run([sys.executable, '-m', 'mlm_jax.bench', 'nope'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
  assert run.returncode != 0 and 'Usage' in run.stderr
