"""The benchmark tool: its token rows, its HF tokenizer, one tiny real run."""
import json
import os
import subprocess
import sys

import numpy as np

from mlm_jax import bench
from mlm_jax import bench_peers
from mlm_jax import metrics
from mlm_jax import model
from mlm_jax import model_config

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
  tokenizer = bench_peers.bert_tokenizer(100)
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


def _run_bench(*args, timeout=300):
  """`python -m mlm_jax.bench ARGS` on one CPU device, as a user runs it."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  run = subprocess.run([sys.executable, '-m', 'mlm_jax.bench', *args],
                       cwd=ROOT, env=env, capture_output=True, text=True,
                       check=False, timeout=timeout)
  assert run.returncode == 0, run.stderr[-3000:]
  return run


def test_train_flops_by_hand_for_our_sparse_head_and_hfs_dense_head():
  cfg = model_config.ModelConfig(
      vocab_size=100, num_layers=2, hidden_dim=8, num_heads=2, mlp_dim=16)
  batch, seq_len, k = 2, 16, 2
  # Per token per layer: Q, K, V, O (4 x 8 x 8) and the MLP (2 x 8 x 16)
  # multiply-adds, and attention over all 16 keys: scores and values
  # (2 x 16 x 8); 2 FLOPs per multiply-add; backward is twice forward.
  per_token = 2 * (2 * (4 * 64 + 2 * 128) + 2 * (2 * 16 * 8))
  # Per prediction: the head's dense transform (8 x 8) and decoder (8 x 100).
  per_prediction = 2 * (64 + 8 * 100)
  tokens = batch * seq_len
  # Ours: layer 1 at every token; layer 2 only its keys and values (2 x 8
  # x 8) there, and the rest (Q, O, MLP, attention) at the 2 x k slots.
  keys_values = 2 * 2 * 64
  assert metrics.train_flops(cfg, seq_len, tokens, batch * k) == (
      3 * (tokens * (per_token // 2 + keys_values) +
           batch * k * (per_prediction + per_token // 2 - keys_values)))
  # HF: every layer and the dense head run at every position.
  assert metrics.train_flops(cfg, seq_len, tokens, tokens,
                             sparse_last_layer=False) == (
      3 * tokens * (per_token + per_prediction))


def test_segment_ids_number_the_pieces_between_seps():
  ids = np.array([[bench.CLS, 9, bench.SEP, 9, 9, bench.SEP, bench.PAD]])
  np.testing.assert_array_equal(bench.segment_ids_of(ids),
                                [[1, 1, 1, 2, 2, 2, 0]])


def test_train_bench_times_all_contenders(tmp_path):
  out = tmp_path / 'train.json'
  run = _run_bench('train', '--model=tiny', '--batch=2', '--seq=16',
                   '--vocab_size=200', '--repeats=2', '--warmup=1',
                   '--threads=1', f'--json={out}')
  assert 'MFU' in run.stdout
  r = json.loads(out.read_text())
  assert set(r['contenders']) == {'mlm_jax', 'hf_flax', 'hf_torch'}
  assert r['peak_source'].startswith('measured') and r['peak_flops_per_s'] > 0
  assert r['real_tokens_per_step'] == 2 * 16
  # A CPU-only process: glibc keeps XLA's freed buffers for every contender.
  assert r['keep_freed_memory'] is True
  for c in r['contenders'].values():
    assert c['median_s'] > 0 and c['tokens_per_s'] > 0
    assert 0 < c['mfu'] <= 1
  # What each executes, by hand (the tiny preset: 2 layers, width 128, MLP
  # 512; 16 tokens per row): per token per layer, 2 FLOPs per multiply-add
  # of Q, K, V, O and the MLP, and attention over all 16 keys; per
  # prediction, the head's transform and its 200-way decoder; backward is
  # twice forward.
  d, f, seq, vocab = 128, 512, 16, 200
  layer = 2 * (4 * d * d + 2 * d * f) + 2 * (2 * seq * d)
  head = 2 * (d * d + d * vocab)
  keys_values = 2 * (2 * d * d)
  # Ours: layer 1 at all 32 tokens, layer 2's keys and values there too, the
  # rest of layer 2 and the head at 2 slots per row (round(0.15 x 16)).
  assert r['contenders']['mlm_jax']['flops_per_step'] == 3 * (
      32 * (layer + keys_values) + 4 * (layer - keys_values + head))
  # HF: both layers and its dense head at every position.
  for peer in ('hf_flax', 'hf_torch'):
    assert r['contenders'][peer]['flops_per_step'] == 3 * 32 * (2 * layer +
                                                                head)


def test_e2e_bench_reports_the_loop_the_bare_step_and_packing(tmp_path,
                                                              data_dir):
  out = tmp_path / 'e2e.json'
  _run_bench('e2e', '--model=tiny', '--batch=4', '--seq=32', '--steps=4',
             '--warmup=1', f'--data_dir={data_dir}', '--data_vocab_size=1000',
             f'--json={out}')
  r = json.loads(out.read_text())
  assert 0.9 < r['packing_efficiency'] <= 1
  assert r['bare_tokens_per_s'] > 0 and r['loop_tokens_per_s'] > 0
  assert len(r['loop_window_tokens_per_s']) >= 2
  # One batch of 4 demo rows of 32: all real tokens but for a padded tail.
  assert 0.9 * 4 * 32 < r['bare_tokens_per_batch'] <= 4 * 32


def test_fast_dropout_drops_at_the_rate_and_rescales():
  # Speed work: model.Dropout draws 16-bit numbers, two per random word.
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  x = jax.numpy.ones((64, 256, 33))  # an odd last axis
  drop = model.Dropout(0.1)
  out = np.asarray(drop(x, deterministic=False,
                        rngs=nnx.Rngs(dropout=jax.random.key(0))))
  assert abs((out == 0).mean() - 0.1) < 0.003  # 540k draws: sd 0.0004
  np.testing.assert_allclose(out[out != 0], 1 / 0.9, rtol=1e-6)
  again = drop(x, deterministic=False, rngs=nnx.Rngs(dropout=jax.random.key(1)))
  assert (np.asarray(again) != out).any()
  assert drop(x, deterministic=True) is x
