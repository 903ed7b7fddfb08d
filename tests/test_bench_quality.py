"""The time-to-quality benchmark: one eval for all, its bookkeeping, a tiny race."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlm_jax import bench_quality
from mlm_jax import bench_quality_peers as peers
from mlm_jax import data
from mlm_jax import hf
from mlm_jax import model_config
import tiny

PAD, CLS, SEP = peers.PAD, peers.CLS, peers.SEP
SEQ = 32


def _config(data_dir, name='mlm_jax_bert'):
  c = peers.contender_config(
      name, size='tiny', batch=8, seq_len=SEQ, learning_rate=3e-3,
      num_steps=20, warmup_frac=0.1, seed=0,
      data_config=tiny.config(data_dir).data)
  c.model.update(num_layers=1, hidden_dim=32, num_heads=2, mlp_dim=64)
  return c


@pytest.fixture(scope='module')
def prepared(data_dir):
  return data.prepare(tiny.config(data_dir).data, SEQ)


@pytest.fixture(scope='module')
def eval_rows(prepared):
  return bench_quality.eval_set(prepared.eval_source, prepared.tokenizer, SEQ,
                                64, seed=0)


def test_same_weights_give_the_same_eval_loss_through_every_contender(
    data_dir, prepared, eval_rows):
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import modeling_flax_pytorch_utils  # pylint: disable=g-import-not-at-top
  config = _config(data_dir)
  ours = peers.make('mlm_jax_bert', config, prepared)
  for _ in range(3):  # trained weights, not just the initial ones
    ours.step()
  ours.sync()
  mcfg = model_config.from_config(config, prepared.tokenizer.vocab_size)
  state_dict = {k: torch.from_numpy(v) for k, v in
                hf.to_hf_state_dict(mcfg, ours.state.params).items()}
  theirs = peers.make('hf_torch', config, prepared)
  flax = peers.make('hf_flax', config, prepared)
  before = bench_quality.score(theirs.logits, eval_rows)
  theirs.model.load_state_dict(state_dict, strict=True)
  flax_model = flax.state.apply_fn.__self__
  flax.state = flax.state.replace(
      params=modeling_flax_pytorch_utils.convert_pytorch_state_dict_to_flax(
          dict(state_dict), flax_model))
  got = {name: bench_quality.score(c.logits, eval_rows)
         for name, c in (('ours', ours), ('hf_torch', theirs),
                         ('hf_flax', flax))}
  for name in ('hf_torch', 'hf_flax'):
    for key in ('loss', 'mask_loss'):
      assert abs(got[name][key] - got['ours'][key]) < 1e-5, (name, key, got)
    for key in ('accuracy', 'mask_accuracy'):
      assert abs(got[name][key] - got['ours'][key]) < 1e-3, (name, key, got)
  # The check can tell weights apart: HF's own initial weights score far off.
  assert abs(before['loss'] - got['ours']['loss']) > 1e-2


def test_eval_set_is_one_document_per_row_masked_once(prepared, eval_rows):
  ev = eval_rows
  tok = prepared.tokenizer
  assert ev['inputs_BxL'].shape == (64, SEQ)
  assert ev['positions_BxK'].shape == ev['targets_BxK'].shape
  real_BxL = ev['attention_BxL'].astype(bool)
  # One document per row: [CLS] first, real tokens a prefix, at most one [SEP].
  assert (ev['inputs_BxL'][:, 0] == CLS).all()
  assert (np.diff(real_BxL.astype(int), axis=1) <= 0).all()
  assert ((ev['inputs_BxL'] == SEP) & real_BxL).sum(1).max() <= 1
  assert (ev['inputs_BxL'][~real_BxL] == tok.pad_id).all()
  # Targets are real non-special tokens at real positions; about 15%.
  w = ev['weights_BxK'] > 0
  assert not np.isin(ev['targets_BxK'][w], tok.special_ids).any()
  rows = np.arange(64)[:, None].repeat(w.shape[1], 1)
  assert real_BxL[rows[w], ev['positions_BxK'][w]].all()
  maskable = real_BxL.sum() - 2 * 64
  assert 0.12 < w.sum() / maskable < 0.18
  at_mask = w & (ev['kinds_BxK'] == 0)
  assert (ev['inputs_BxL'][rows[at_mask], ev['positions_BxK'][at_mask]]
          == tok.mask_id).all()
  # Fixed: made again, the same arrays.
  again = bench_quality.eval_set(prepared.eval_source, tok, SEQ, 64, seed=0)
  for k, v in ev.items():
    np.testing.assert_array_equal(v, again[k])


def test_hf_blocks_regroup_the_documents_as_run_mlm_flax():
  docs = [np.arange(10, 10 + n, dtype=np.int32) for n in (5, 9, 3, 12)]
  stream = np.concatenate([np.append(d, SEP) for d in docs])
  L = 8
  rows = []
  for start in range(0, len(stream), L - 1):
    chunk = stream[start:start + L - 1]
    rows.append(np.concatenate([[CLS], chunk, [PAD] * (L - 1 - len(chunk))]))
  source = [{'input_ids': np.asarray(r, np.int32)} for r in rows]
  want = np.concatenate([np.concatenate([[CLS], d, [SEP]]) for d in docs])
  want = want[:len(want) // L * L].reshape(-1, L)
  np.testing.assert_array_equal(peers.hf_blocks(source, L), want)


def _curve(points):
  return [{'train_s': t, 'tokens': 10 * t, 'loss': l} for t, l in points]


def test_target_is_the_worst_best_loss_and_times_interpolate():
  contenders = {
      'mlm_jax_best': {'runs': {
          '0.001': {'lr': 1e-3, 'best_loss': 5.0, 'compile_s': 1.0,
                    'curve': _curve([(0, 9), (10, 6), (20, 5)])},
          '0.002': {'lr': 2e-3, 'best_loss': 5.5, 'compile_s': 1.0,
                    'curve': _curve([(0, 9), (10, 7), (20, 5.5)])}}},
      'hf_torch': {'runs': {
          '0.001': {'lr': 1e-3, 'best_loss': 7.0, 'compile_s': 0.0,
                    'curve': _curve([(0, 9), (10, 8), (20, 7)])}}},
  }
  s = bench_quality.summarize(contenders)
  assert s['slowest'] == 'hf_torch' and s['target_loss'] == 7.0
  assert contenders['mlm_jax_best']['best_lr'] == 1e-3
  # 9 -> 6 over 0..10 s crosses 7 at 2/3 of the way.
  assert contenders['mlm_jax_best']['time_to_target_s'] == pytest.approx(
      20 / 3)
  assert contenders['mlm_jax_best']['tokens_to_target'] == pytest.approx(
      200 / 3)
  assert contenders['hf_torch']['time_to_target_s'] == 20
  assert s['ratios'] == {'mlm_jax_best/hf_torch': pytest.approx(1 / 3)}
  assert s['ratios_with_compile'] == {
      'mlm_jax_best/hf_torch': pytest.approx((20 / 3 + 1) / 20)}
  assert bench_quality.time_to(_curve([(0, 9), (5, 8)]), 7.0) is None


def _bench(args, timeout):
  return subprocess.run(
      [sys.executable, '-m', 'mlm_jax.bench', 'quality', *args],
      cwd=tiny.ROOT, capture_output=True, text=True, timeout=timeout,
      env=tiny.subprocess_env(), check=False)


@pytest.mark.parametrize('bad,message', [
    ('--quality_sizes=huge', 'quality_sizes'),
    ('--quality_lrs=1e-3,2e-3', 'as many'),
    ('--quality_contenders=mlm_jax,hf_torch', 'quality_contenders'),
    ('--quality_lrs=fast,1e-3,2e-3', 'not a number'),
])
def test_bad_flags_fail_before_any_work(bad, message, tmp_path):
  run = _bench([bad, f'--quality_data_dir={tmp_path}'], timeout=120)
  assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]
  assert not os.listdir(tmp_path)  # no data prepared


def test_a_race_of_seconds_writes_the_json_and_the_plot(data_dir, tmp_path):
  out, png = tmp_path / 'quality.json', tmp_path / 'quality.png'
  run = _bench(['--quality_sizes=tiny', '--quality_budget_s=1.5',
                '--quality_evals=2', '--quality_lrs=1e-3',
                '--quality_best_lrs=2e-3', f'--quality_seq={SEQ}',
                '--quality_batch=8', '--quality_vocab_size=1000',
                f'--quality_data_dir={data_dir}', '--quality_eval_rows=32',
                f'--json={out}', f'--quality_png={png}'], timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'time to target' in run.stdout
  result = json.loads(out.read_text())
  assert png.stat().st_size > 10_000
  for key in ('budget_s', 'batch', 'seq_len', 'load_before', 'load_after',
              'commit', 'cpu', 'cores', 'date_utc', 'versions', 'eval'):
    assert key in result, key
  assert result['eval']['rows'] == 32 and result['eval']['predictions'] > 0
  size = result['sizes']['tiny']
  assert set(size['contenders']) == set(peers.NAMES)
  assert set(size['ratios']) == {f'{a}/{b}' for a in ('mlm_jax_best',
                                                      'mlm_jax_bert')
                                 for b in ('hf_flax', 'hf_torch')}
  worst = size['contenders'][size['slowest']]
  assert size['target_loss'] == min(r['best_loss']
                                    for r in worst['runs'].values())
  for c in size['contenders'].values():
    assert c['time_to_target_s'] is not None
    assert c['calibration']['step_s'] > 0
    (run_,) = c['runs'].values()
    assert run_['lr'] == c['best_lr'] and run_['steps'] >= 1
    curve = run_['curve']
    assert len(curve) >= 2 and curve[0]['train_s'] == 0
    assert all(a['train_s'] < b['train_s'] and a['tokens'] < b['tokens']
               for a, b in zip(curve, curve[1:]))
    # Only training time is on the clock: it stops within a step of budget.
    assert curve[-1]['train_s'] <= 1.5 + 3.0
    for p in curve:
      assert 0 < p['loss'] < 10 and 0 <= p['mask_accuracy'] <= 1
      assert p['load'] >= 0
  assert size['ratios']['mlm_jax_best/hf_torch'] > 0
