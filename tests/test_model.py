from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from mlm_jax import model


def _cfg(**kw):
  return model.ModelConfig(**{**dict(vocab_size=97, num_layers=2,
                                     hidden_dim=32, num_heads=4, mlp_dim=64,
                                     max_len=40, dropout_rate=0.0,
                                     attention_dropout_rate=0.0), **kw})


@pytest.fixture(params=[(False, 'learned'), (True, 'learned'), (True, 'rope')],
                ids=['post_ln', 'pre_ln', 'pre_ln_rope'])
def bert(request):
  pre_ln, position = request.param
  return model.create(_cfg(pre_ln=pre_ln, position=position),
                      jax.random.key(0))


def test_sparse_head_shapes_and_dtype(bert):
  ids = jax.random.randint(jax.random.key(1), (3, 16), 5, 97)
  seg = jnp.ones_like(ids)
  pos = jnp.array([[1, 2], [3, 4], [0, 15]])
  logits = bert(ids, seg, pos)
  assert logits.shape == (3, 2, 97) and logits.dtype == jnp.float32
  h = bert.encoder(ids, seg)
  assert h.shape == (3, 16, 32)


def test_padding_does_not_change_real_positions(bert):
  ids = jax.random.randint(jax.random.key(2), (2, 12), 5, 97)
  h = bert.encoder(ids, jnp.ones_like(ids))
  padded = jnp.concatenate([ids, jnp.zeros((2, 8), ids.dtype)], axis=1)
  seg = jnp.concatenate([jnp.ones_like(ids), jnp.zeros((2, 8), ids.dtype)], 1)
  h_padded = bert.encoder(padded, seg)
  np.testing.assert_allclose(h_padded[:, :12], h, atol=1e-5)


def test_packed_segments_do_not_see_each_other(bert):
  a = jax.random.randint(jax.random.key(3), (1, 7), 5, 97)
  b = jax.random.randint(jax.random.key(4), (1, 9), 5, 97)
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.array([[1] * 7 + [2] * 9])
  h = bert.encoder(packed, seg)
  # Positions restart per segment, so each piece equals its own run.
  np.testing.assert_allclose(h[:, :7], bert.encoder(a, jnp.ones_like(a)),
                             atol=1e-5)
  np.testing.assert_allclose(h[:, 7:], bert.encoder(b, jnp.ones_like(b)),
                             atol=1e-5)


def test_rope_attention_depends_only_on_relative_position():
  x = jax.random.normal(jax.random.key(5), (1, 6, 2, 8))
  q = model.rope(x, jnp.arange(6)[None], 10_000.0)
  shifted = model.rope(x, jnp.arange(6)[None] + 11, 10_000.0)
  np.testing.assert_allclose(jnp.einsum('bqhd,bkhd->bhqk', q, q),
                             jnp.einsum('bqhd,bkhd->bhqk', shifted, shifted),
                             atol=1e-4)
  assert not np.allclose(q, shifted)


def test_rope_has_no_position_table():
  m = model.create(_cfg(position='rope'), jax.random.key(0))
  assert m.encoder.embeddings.position is None
  c = base.get_config()
  c.model.position = 'sinusoid'
  with pytest.raises(ValueError, match='model.position'):
    model.model_config(c, vocab_size=100)


def test_positions_restart_per_segment():
  seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
  np.testing.assert_array_equal(model.positions_from_segments(seg),
                                [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_every_parameter_has_logical_axis_names(bert):
  params = nnx.state(bert, nnx.Param)
  allowed = {None, 'vocab', 'embed', 'heads', 'kv', 'mlp'}
  for path, var in nnx.to_flat_state(params):
    names = var.get_metadata().get('out_sharding')
    assert names is not None and len(names) == var.value.ndim, path
    assert set(names) <= allowed, (path, names)
    assert any(n is not None for n in names), path


def test_decoder_is_tied_to_word_embeddings(bert):
  params = nnx.state(bert, nnx.Param)
  flat = {'/'.join(map(str, p)) for p, _ in nnx.to_flat_state(params)}
  assert not any('decoder' in p for p in flat)
  # Changing the word embedding changes the logits of the head.
  ids = jnp.full((1, 4), 7)
  before = bert(ids, jnp.ones_like(ids), jnp.array([[1]]))
  bert.encoder.embeddings.word.embedding[...] *= 2.0
  after = bert(ids, jnp.ones_like(ids), jnp.array([[1]]))
  assert not np.allclose(before, after)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  m = model.create(_cfg(dtype='bfloat16'), jax.random.key(0))
  ids = jnp.full((1, 4), 7)
  logits = m(ids, jnp.ones_like(ids), jnp.array([[1]]))
  assert logits.dtype == jnp.float32
  leaves = jax.tree.leaves(nnx.state(m, nnx.Param))
  assert all(x.dtype == jnp.float32 for x in leaves)
  assert m.encoder(ids, jnp.ones_like(ids)).dtype == jnp.bfloat16


@pytest.mark.parametrize('size,layers,hidden', [('tiny', 2, 128),
                                                ('base', 12, 768),
                                                ('large', 24, 1024)])
def test_size_presets_and_overrides(size, layers, hidden):
  c = base.get_config()
  c.model.size = size
  cfg = model.model_config(c, vocab_size=100)
  assert (cfg.num_layers, cfg.hidden_dim) == (layers, hidden)
  c.model.num_layers = 3
  assert model.model_config(c, vocab_size=100).num_layers == 3


def test_bad_size_and_heads_fail_clearly():
  c = base.get_config()
  c.model.size = 'huge'
  with pytest.raises(ValueError, match='model.size'):
    model.model_config(c, vocab_size=100)
  c.model.size = 'tiny'
  c.model.num_heads = 3
  with pytest.raises(ValueError, match='divisible'):
    model.model_config(c, vocab_size=100)
