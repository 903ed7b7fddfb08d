"""A masking function plugged in by name: 'package.module:function'."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm_jax import masking
from mlm_jax.masking import strategies
from mlm_jax import train
import tiny

SPECIALS = (0, 1, 2, 3, 4)  # PAD UNK CLS SEP MASK
MASK_ID, V = 4, 100
TEMPLATE = 'experiments._template.masking:choose'
FIRST_K = '''
import jax.numpy as jnp

def choose(key, ids_L, maskable_L, word_start_L, k):
  return maskable_L & (jnp.cumsum(maskable_L) <= k)

def everything(key, ids_L, maskable_L, word_start_L, k):
  return jnp.ones_like(maskable_L)  # specials too: the Masker drops them

def word_starts(key, ids_L, maskable_L, word_start_L, k):
  return word_start_L
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
  """A module of plug-ins, importable under a name unique to the test."""
  name = f'plugins_{os.path.basename(tmp_path)}'.replace('-', '_')
  (tmp_path / f'{name}.py').write_text(FIRST_K)
  monkeypatch.syspath_prepend(str(tmp_path))
  return name


def _masker(strategy, max_predictions=4, **kw):
  return masking.Masker(SPECIALS, MASK_ID, V, max_predictions, strategy, **kw)


def test_first_k_plugin_gives_the_exact_mask(plugins):
  ids = jnp.array([[2, 10, 11, 12, 3, 13, 14, 15, 16, 17, 18, 3, 0, 0, 0, 0],
                   [2, 20, 21, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
  m = _masker(f'{plugins}:choose', mask_prob=1.0, random_prob=0.0)(
      jax.random.key(0), ids, rate=0.25)
  # Maskable: 9 and 2 tokens; k = round(0.25 * n) = 2 and 1 (half up: 0.5).
  np.testing.assert_array_equal(m.positions_BxK, [[1, 2, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(m.weights_BxK, [[1, 1, 0, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(m.targets_BxK[0, :2], [10, 11])
  assert m.targets_BxK[1, 0] == 20
  expected = np.array(ids)
  expected[0, 1:3] = MASK_ID
  expected[1, 1] = MASK_ID
  np.testing.assert_array_equal(m.inputs_BxL, expected)
  np.testing.assert_array_equal(m.maskable_B, [9, 2])
  np.testing.assert_array_equal(m.units_B, [2, 1])


def test_plugin_specials_are_dropped_and_the_first_max_predictions_kept(
    plugins):
  ids = jnp.array([[2, 10, 3, 11, 12, 13, 14, 15, 3, 0]])
  m = _masker(f'{plugins}:everything')(jax.random.key(0), ids)
  np.testing.assert_array_equal(m.positions_BxK, [[1, 3, 4, 5]])
  np.testing.assert_array_equal(m.weights_BxK, [[1, 1, 1, 1]])


def test_plugin_sees_word_starts_from_the_tokenizer(plugins):
  word_start_V = np.zeros(V, bool)
  word_start_V[[10, 12]] = True
  ids = jnp.array([[2, 10, 11, 12, 11, 3, 11, 11, 3, 0]])
  m = _masker(f'{plugins}:word_starts', word_start_V=word_start_V)(
      jax.random.key(0), ids)
  # Word-start pieces, and the first token after a special one.
  np.testing.assert_array_equal(m.positions_BxK, [[1, 3, 6, 0]])
  m = _masker(f'{plugins}:word_starts', max_predictions=8)(
      jax.random.key(0), ids)  # no word_start_V: every maskable token
  np.testing.assert_array_equal(m.positions_BxK, [[1, 2, 3, 4, 6, 7, 0, 0]])


def test_template_plugin_chooses_exactly_k_at_random(monkeypatch):
  monkeypatch.syspath_prepend(tiny.ROOT)
  ids = jax.random.randint(jax.random.key(0), (64, 32), 5, V)
  ids = ids.at[:, 0].set(2).at[:, -1].set(3)
  masker = _masker(TEMPLATE, max_predictions=5)
  m = masker(jax.random.key(1), ids)
  np.testing.assert_array_equal(m.weights_BxK.sum(1), 5)  # round(0.15 * 30)
  positions = np.asarray(m.positions_BxK)
  assert positions.min() >= 1 and positions.max() <= 30
  assert len({tuple(p) for p in positions}) > 60  # rows differ
  again = masker(jax.random.key(1), ids[::-1], jnp.arange(64)[::-1])
  np.testing.assert_array_equal(again.positions_BxK, positions[::-1])


def test_bad_plugins_are_named_before_any_work(plugins, tmp_path):
  for strategy, message in [
      ('no_such_module_xyz:choose', "cannot import module 'no_such_module_xyz'"),
      (f'{plugins}:nope', f"module '{plugins}' .* has no function 'nope'"),
      (f'{plugins}:', 'not of the form'),
      ('tokens', "choose one of .* or a plug-in 'package.module:function'")]:
    with pytest.raises(ValueError, match=message):
      strategies.check(strategy)
    with pytest.raises(ValueError, match=message):
      train.train_and_evaluate(
          tiny.config(str(tmp_path / 'data'), **{'mask.strategy': strategy}),
          str(tmp_path / 'w'))
    assert not os.path.exists(tmp_path / 'w' / 'checkpoints')
    assert not os.path.exists(tmp_path / 'data')


@pytest.mark.slow
def test_template_plugin_trains_end_to_end(data_dir, tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(tiny.ROOT)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(
      tiny.config(data_dir, **{'mask.strategy': TEMPLATE, 'num_steps': 4,
                               'eval_every': 4, 'checkpoint_every': 4}),
      workdir)
  records = tiny.read_metrics(workdir)
  first = next(r for r in records if 'train/loss' in r)
  assert np.isfinite(first['train/loss'])
  assert abs(first['train/mask_rate'] - 0.15) < 0.02  # as for 'token'
  assert first['train/special_masked'] == 0
  assert any('eval/loss' in r and r['step'] == 4 for r in records)
