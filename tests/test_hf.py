"""Parity with transformers' PyTorch BERT (CPU, float32) for the same weights."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mlm_jax import hf
from mlm_jax import model
from mlm_jax import model_config

torch.manual_seed(0)

# (name, HF BertConfig overrides, our extra knobs that keep the function).
CONFIGS = [
    ('tiny', dict(vocab_size=101, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=40, type_vocab_size=2), {}),
    ('wider_gelu_tanh', dict(vocab_size=257, hidden_size=48,
                             num_hidden_layers=3, num_attention_heads=3,
                             intermediate_size=96, max_position_embeddings=64,
                             type_vocab_size=3, hidden_act='gelu_new',
                             layer_norm_eps=1e-5), {}),
    ('one_type_scan_padded_vocab', dict(
        vocab_size=130, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=40,
        max_position_embeddings=32, type_vocab_size=1),
     dict(scan_layers=True, vocab_multiple=128)),
]


def _hf_config(overrides):
  return transformers.BertConfig(hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0,
                                 **overrides)


def _randomize(torch_model):
  """Random weights everywhere (HF zero-inits biases and LayerNorm shifts)."""
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      p.normal_(mean=1.0 if name.endswith('LayerNorm.weight') else 0.0,
                std=0.2)
  return torch_model


def _ours(hf_model, hf_config, knobs):
  cfg = hf.model_config_from_hf(hf_config.to_dict(), **knobs)
  init = nnx.split(model.create(cfg, jax.random.key(1)), nnx.Param)
  state_dict = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  params, has_head = hf.from_hf_state_dict(cfg, state_dict, init[1])
  return cfg, nnx.merge(init[0], params), has_head


def _inputs(rng, cfg, batch, length):
  ids = rng.integers(0, cfg.vocab_size, (batch, length))
  lengths = rng.integers(2, length + 1, batch)
  lengths[0] = length  # one row without padding
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
  ids = np.where(mask == 1, ids, 0)
  types = rng.integers(0, cfg.type_vocab_size, (batch, length)) * mask
  return ids, mask, types


@pytest.mark.parametrize('name,overrides,knobs', CONFIGS,
                         ids=[c[0] for c in CONFIGS])
def test_masked_lm_logits_match_transformers(name, overrides, knobs):
  del name
  hf_config = _hf_config(overrides)
  hf_model = _randomize(transformers.BertForMaskedLM(hf_config)).eval()
  cfg, ours, has_head = _ours(hf_model, hf_config, knobs)
  assert has_head
  ids, mask, types = _inputs(np.random.default_rng(0), cfg, 3, 17)
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(ids),
                    attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types)).logits.numpy()
  # One document per row: segment 1 on real tokens, 0 on padding.
  positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask), positions,
                        token_types_BxL=jnp.asarray(types)))
  got = got[..., :cfg.vocab_size]
  real = mask.astype(bool)
  assert np.abs(want).max() > 1.0  # the comparison is not between zeros
  np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)
  assert np.abs(got[real] - want[real]).max() < 1e-4


@pytest.mark.parametrize('name,overrides,knobs', CONFIGS[:2],
                         ids=[c[0] for c in CONFIGS[:2]])
def test_bert_model_hidden_states_match_transformers(name, overrides, knobs):
  del name
  hf_config = _hf_config(overrides)
  hf_model = _randomize(transformers.BertModel(hf_config)).eval()
  cfg, ours, has_head = _ours(hf_model, hf_config, knobs)
  assert not has_head
  ids, mask, types = _inputs(np.random.default_rng(1), cfg, 4, 12)
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(ids),
                    attention_mask=torch.tensor(mask),
                    token_type_ids=torch.tensor(types)
                    ).last_hidden_state.numpy()
  got = np.asarray(ours.encoder(jnp.asarray(ids), jnp.asarray(mask),
                                jnp.asarray(types)))
  real = mask.astype(bool)
  assert np.abs(got[real] - want[real]).max() < 1e-4


def test_state_dict_round_trip_is_exact_and_loads_strictly():
  hf_config = _hf_config(CONFIGS[0][1])
  hf_model = _randomize(transformers.BertForMaskedLM(hf_config))
  cfg, ours, _ = _ours(hf_model, hf_config, {})
  sd = hf.to_hf_state_dict(cfg, nnx.state(ours, nnx.Param))
  want = hf_model.state_dict()
  assert set(sd) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)
  fresh = transformers.BertForMaskedLM(hf.bert_config(cfg))
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()},
                        strict=True)


def test_scan_and_padded_vocab_export_the_same_tensors():
  overrides, knobs = CONFIGS[2][1], CONFIGS[2][2]
  hf_config = _hf_config(overrides)
  hf_model = _randomize(transformers.BertForMaskedLM(hf_config))
  cfg, ours, _ = _ours(hf_model, hf_config, knobs)
  assert cfg.padded_vocab_size == 256
  sd = hf.to_hf_state_dict(cfg, nnx.state(ours, nnx.Param))
  for k, v in hf_model.state_dict().items():
    np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)


def test_variants_without_token_types_or_biases_export_exactly():
  cfg = model_config.ModelConfig(
      vocab_size=50, num_layers=2, hidden_dim=16, num_heads=2, mlp_dim=32,
      max_len=24, type_vocab_size=0, use_bias=False, dropout_rate=0.0,
      attention_dropout_rate=0.0)
  ours = model.create(cfg, jax.random.key(2))
  # Perturb every weight (fresh LayerNorm scales are all 1, the head's
  # bias 0), so the parity below is not that of an initialisation.
  params = nnx.state(ours, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  nnx.update(ours, jax.tree.unflatten(treedef, [
      x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)]))
  scales = [x for path, x in jax.tree_util.tree_leaves_with_path(
      nnx.state(ours, nnx.Param)) if 'scale' in jax.tree_util.keystr(path)]
  assert scales and all(np.abs(np.asarray(x) - 1).min() > 0 for x in scales)
  sd = hf.to_hf_state_dict(cfg, nnx.state(ours, nnx.Param))
  hf_model = transformers.BertForMaskedLM(hf.bert_config(cfg)).eval()
  hf_model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()},
                           strict=True)
  ids = np.random.default_rng(3).integers(5, 50, (2, 9))
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(ids)).logits.numpy()
  got = ours(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32),
             jnp.broadcast_to(jnp.arange(9), ids.shape))
  assert np.abs(np.asarray(got) - want).max() < 1e-4


@pytest.mark.parametrize('knob,value,message', [
    ('pre_ln', True, 'pre_ln'), ('position', 'rope', 'position'),
    ('activation', 'geglu', 'activation'), ('local_window', 8, 'local_window')])
def test_unexportable_variants_are_refused(knob, value, message):
  cfg = model_config.ModelConfig(vocab_size=50, **{knob: value})
  with pytest.raises(ValueError, match=message):
    hf.check_exportable(cfg)


def test_import_refuses_other_architectures():
  with pytest.raises(ValueError, match='model_type'):
    hf.model_config_from_hf({'model_type': 'roberta'})
  with pytest.raises(ValueError, match='position_embedding_type'):
    hf.model_config_from_hf(dict(_hf_config(CONFIGS[0][1]).to_dict(),
                                 position_embedding_type='relative_key'))


def test_an_untied_decoder_is_refused_and_a_tied_one_imports():
  overrides = dict(CONFIGS[0][1], tie_word_embeddings=False)
  untied = _randomize(transformers.BertForMaskedLM(_hf_config(overrides)))
  sd = untied.state_dict()
  word = sd['bert.embeddings.word_embeddings.weight'].numpy()
  assert not np.array_equal(sd['cls.predictions.decoder.weight'].numpy(), word)
  with pytest.raises(ValueError, match=r'untied MLM decoder .* drop the '
                     r'cls\.\* tensors'):
    _ours(untied, _hf_config(overrides), {})
  tied = _randomize(transformers.BertForMaskedLM(_hf_config(CONFIGS[0][1])))
  state_dict = {k: v.numpy() for k, v in tied.state_dict().items()}
  assert np.array_equal(state_dict['cls.predictions.decoder.weight'],
                        state_dict['bert.embeddings.word_embeddings.weight'])
  cfg = hf.model_config_from_hf(_hf_config(CONFIGS[0][1]).to_dict())
  init = nnx.split(model.create(cfg, jax.random.key(1)), nnx.Param)[1]
  hf.from_hf_state_dict(cfg, state_dict, init)
  # As safetensors stores it: the tied decoder weight once, under the
  # embeddings' name.
  del state_dict['cls.predictions.decoder.weight']
  _, has_head = hf.from_hf_state_dict(cfg, state_dict, init)
  assert has_head
