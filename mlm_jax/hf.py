"""Hugging Face interop: BERT configs and weights, to and from our model.

Our parameters (an nnx.State of nnx.Param) map one to one onto the state dict
of transformers' `BertForMaskedLM` (names below); `BertModel` is the same
without the `bert.` prefix and without the MLM head (`cls.*`). Torch's Linear
stores [out, in] where ours is [in, out], so kernels are transposed. Arrays
cross as numpy float32, so nothing here imports torch; transformers is
imported only by the functions that build its config.

A variant HF's BERT cannot express (pre-LN, RoPE, GeGLU, sliding-window
attention) is refused by `check_exportable`. Variants it can express with
zeros are exported exactly: no token types -> one all-zero token-type row; no
biases -> zero biases; a padded vocabulary -> the real rows only.
"""
from collections.abc import Mapping

from flax import nnx
import jax
import numpy as np

from mlm_jax import model_config

# Our per-layer parameter path -> HF's name under `encoder.layer.{i}.`, and
# whether the tensor is a torch Linear weight (transposed).
_LAYER = {
    'attention/query/kernel': ('attention.self.query.weight', True),
    'attention/query/bias': ('attention.self.query.bias', False),
    'attention/key/kernel': ('attention.self.key.weight', True),
    'attention/key/bias': ('attention.self.key.bias', False),
    'attention/value/kernel': ('attention.self.value.weight', True),
    'attention/value/bias': ('attention.self.value.bias', False),
    'attention/out/kernel': ('attention.output.dense.weight', True),
    'attention/out/bias': ('attention.output.dense.bias', False),
    'attention_norm/scale': ('attention.output.LayerNorm.weight', False),
    'attention_norm/bias': ('attention.output.LayerNorm.bias', False),
    'mlp_in/kernel': ('intermediate.dense.weight', True),
    'mlp_in/bias': ('intermediate.dense.bias', False),
    'mlp_out/kernel': ('output.dense.weight', True),
    'mlp_out/bias': ('output.dense.bias', False),
    'mlp_norm/scale': ('output.LayerNorm.weight', False),
    'mlp_norm/bias': ('output.LayerNorm.bias', False),
}
# Our embedding paths (under encoder/embeddings/) -> HF's (under embeddings.).
_EMBED = {
    'word/embedding': 'word_embeddings.weight',
    'position/embedding': 'position_embeddings.weight',
    'token_type/embedding': 'token_type_embeddings.weight',
    'norm/scale': 'LayerNorm.weight',
    'norm/bias': 'LayerNorm.bias',
}
# Our MLM head paths (under mlm_head/) -> HF's (BertForMaskedLM only).
_HEAD = {
    'transform/kernel': ('cls.predictions.transform.dense.weight', True),
    'transform/bias': ('cls.predictions.transform.dense.bias', False),
    'norm/scale': ('cls.predictions.transform.LayerNorm.weight', False),
    'norm/bias': ('cls.predictions.transform.LayerNorm.bias', False),
    'bias': ('cls.predictions.bias', False),
}
# HF hidden_act names we read, and the one we write, per activation.
_HF_ACT_IN = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh',
              'gelu_pytorch_tanh': 'gelu_tanh'}
_HF_ACT_OUT = {'gelu': 'gelu', 'gelu_tanh': 'gelu_new'}


def check_exportable(cfg: model_config.ModelConfig) -> None:
  """Raises ValueError naming every knob HF's BertForMaskedLM cannot express."""
  problems = []
  if cfg.pre_ln:
    problems.append('pre_ln=True (HF BERT is post-LN)')
  if cfg.position != 'learned':
    problems.append(f"position={cfg.position!r} (HF BERT has learned "
                    "absolute positions)")
  if cfg.activation not in _HF_ACT_OUT:
    problems.append(f"activation={cfg.activation!r} (HF BERT's MLP has no "
                    'gate)')
  if cfg.local_window:
    problems.append(f'local_window={cfg.local_window} (HF BERT attends '
                    'globally in every layer)')
  if problems:
    raise ValueError('This model cannot be exported to transformers.'
                     'BertForMaskedLM: ' + '; '.join(problems) + '. Only the '
                     'BERT-compatible variants (configs/bert_base.py) export.')


def model_config_from_hf(hf_config: Mapping, **overrides) -> model_config.ModelConfig:
  """Our ModelConfig for an HF BertConfig (as a dict, e.g. config.json)."""
  c = dict(hf_config)
  if c.get('model_type', 'bert') != 'bert':
    raise ValueError(f"model_type={c.get('model_type')!r}: only BERT "
                     '(BertForMaskedLM / BertModel) checkpoints import.')
  pos = c.get('position_embedding_type', 'absolute')
  if pos != 'absolute':
    raise ValueError(f'position_embedding_type={pos!r}: only absolute '
                     'positions import.')
  act = c.get('hidden_act', 'gelu')
  if act not in _HF_ACT_IN:
    raise ValueError(f'hidden_act={act!r}: only {sorted(_HF_ACT_IN)} import.')
  kwargs = dict(
      vocab_size=c['vocab_size'], num_layers=c['num_hidden_layers'],
      hidden_dim=c['hidden_size'], num_heads=c['num_attention_heads'],
      mlp_dim=c['intermediate_size'],
      max_len=c.get('max_position_embeddings', 512),
      type_vocab_size=c.get('type_vocab_size', 2),
      dropout_rate=c.get('hidden_dropout_prob', 0.1),
      attention_dropout_rate=c.get('attention_probs_dropout_prob', 0.1),
      layer_norm_eps=c.get('layer_norm_eps', 1e-12),
      initializer_range=c.get('initializer_range', 0.02),
      activation=_HF_ACT_IN[act])
  kwargs.update(overrides)
  return model_config.ModelConfig(**kwargs)


def hf_config_dict(cfg: model_config.ModelConfig, pad_token_id: int = 0) -> dict:
  """The BertConfig fields (config.json) of an exportable ModelConfig."""
  check_exportable(cfg)
  return dict(
      architectures=['BertForMaskedLM'], model_type='bert',
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.mlp_dim, hidden_act=_HF_ACT_OUT[cfg.activation],
      hidden_dropout_prob=cfg.dropout_rate,
      attention_probs_dropout_prob=cfg.attention_dropout_rate,
      max_position_embeddings=cfg.max_len,
      type_vocab_size=max(cfg.type_vocab_size, 1),
      initializer_range=cfg.initializer_range,
      layer_norm_eps=cfg.layer_norm_eps, pad_token_id=pad_token_id,
      position_embedding_type='absolute', tie_word_embeddings=True)


def bert_config(cfg: model_config.ModelConfig, pad_token_id: int = 0):
  """A transformers.BertConfig for an exportable ModelConfig."""
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.BertConfig(**hf_config_dict(cfg, pad_token_id))


def _flat(params) -> dict[str, np.ndarray]:
  return {'/'.join(map(str, path)): np.asarray(jax.device_get(var.get_value()))
          for path, var in nnx.to_flat_state(params)}


def _layers(cfg, flat) -> list[dict[str, np.ndarray]]:
  """Per-layer {path under the block: array}, stacked (scan) or not."""
  out = [{} for _ in range(cfg.num_layers)]
  for name, value in flat.items():
    if not name.startswith('encoder/blocks/'):
      continue
    rest = name[len('encoder/blocks/'):]
    if cfg.scan_layers:
      for i in range(cfg.num_layers):
        out[i][rest] = value[i]
    else:
      i, rest = rest.split('/', 1)
      out[int(i)][rest] = value
  return out


def to_hf_state_dict(cfg: model_config.ModelConfig, params
                     ) -> dict[str, np.ndarray]:
  """BertForMaskedLM's state dict (float32 numpy) for our params.

  Includes the tied `cls.predictions.decoder.weight/.bias`, as torch's
  `state_dict()` does, so `load_state_dict(strict=True)` accepts it.
  """
  check_exportable(cfg)
  flat = _flat(params)
  v, d = cfg.vocab_size, cfg.hidden_dim
  # A writable C-order copy: torch wants writable arrays, safetensors C order.
  f32 = lambda x: np.array(x, np.float32, order='C')
  sd = {}
  for ours, theirs in _EMBED.items():
    key = 'encoder/embeddings/' + ours
    if key in flat:
      sd['bert.embeddings.' + theirs] = f32(flat[key])
  sd['bert.embeddings.word_embeddings.weight'] = f32(
      flat['encoder/embeddings/word/embedding'][:v])
  if not cfg.type_vocab_size:
    sd['bert.embeddings.token_type_embeddings.weight'] = np.zeros((1, d),
                                                                  np.float32)
  if not cfg.use_bias:
    sd['bert.embeddings.LayerNorm.bias'] = np.zeros((d,), np.float32)
  for i, layer in enumerate(_layers(cfg, flat)):
    for ours, (theirs, transpose) in _LAYER.items():
      if ours in layer:
        value = layer[ours].T if transpose else layer[ours]
      else:  # a bias of a bias-free model
        value = _zero_bias(layer, ours)
      sd[f'bert.encoder.layer.{i}.{theirs}'] = f32(value)
  for ours, (theirs, transpose) in _HEAD.items():
    key = 'mlm_head/' + ours
    if key in flat:
      value = flat[key].T if transpose else flat[key]
    else:  # a bias of a bias-free model
      value = np.zeros((d,), np.float32)
    sd[theirs] = f32(value[:v] if ours == 'bias' else value)
  sd['cls.predictions.decoder.weight'] = sd[
      'bert.embeddings.word_embeddings.weight']
  sd['cls.predictions.decoder.bias'] = sd['cls.predictions.bias']
  return sd


def _zero_bias(layer, bias_path):
  """Zeros shaped like the output of the layer that has no `bias_path`."""
  stem = bias_path[:-len('bias')]
  ref = layer.get(stem + 'kernel', layer.get(stem + 'scale'))
  return np.zeros(ref.shape[-1:], np.float32)


def _strip_prefix(state_dict: Mapping) -> tuple[dict, bool]:
  """(encoder tensors under BertModel's names, whether an MLM head is there)."""
  sd = {}
  for k, v in state_dict.items():
    k = k.removeprefix('bert.')
    sd[k] = np.asarray(v, np.float32)
  return sd, 'cls.predictions.transform.dense.weight' in state_dict


def from_hf_state_dict(cfg: model_config.ModelConfig, state_dict: Mapping,
                       init_params):
  """Our params from a BertForMaskedLM or BertModel state dict.

  Args:
    cfg: the ModelConfig (from `model_config_from_hf`, maybe with knobs such
      as scan_layers or vocab_multiple that do not change the function).
    state_dict: name -> array (numpy or anything np.asarray takes).
    init_params: freshly initialised params of `cfg`: their MLM head is kept
      when the checkpoint has none (a BertModel), and padded vocabulary rows
      come from them.

  Returns:
    (params, has_head): an nnx.State like `init_params`, and whether the
    state dict held the MLM head.
  """
  sd, has_head = _strip_prefix(state_dict)
  flat = _flat(init_params)
  new = {}
  for ours, theirs in _EMBED.items():
    key = 'encoder/embeddings/' + ours
    if key in flat:
      new[key] = sd['embeddings.' + theirs]
  word = sd['embeddings.word_embeddings.weight']
  if word.shape[0] != cfg.vocab_size:
    raise ValueError(f'The checkpoint has {word.shape[0]} word embeddings but '
                     f'vocab_size is {cfg.vocab_size}.')
  padded = flat['encoder/embeddings/word/embedding'].copy()
  padded[:cfg.vocab_size] = word
  new['encoder/embeddings/word/embedding'] = padded
  layers = []
  for i in range(cfg.num_layers):
    layer = {}
    for ours, (theirs, transpose) in _LAYER.items():
      value = sd[f'encoder.layer.{i}.{theirs}']
      layer[ours] = value.T if transpose else value
    layers.append(layer)
  for ours in layers[0]:
    if cfg.scan_layers:
      new['encoder/blocks/' + ours] = np.stack([l[ours] for l in layers])
    else:
      for i, layer in enumerate(layers):
        new[f'encoder/blocks/{i}/{ours}'] = layer[ours]
  if has_head:
    _check_tied(state_dict, word)
    for ours, (theirs, transpose) in _HEAD.items():
      value = np.asarray(state_dict[theirs], np.float32)
      new['mlm_head/' + ours] = value.T if transpose else value
    bias = flat['mlm_head/bias'].copy()
    bias[:cfg.vocab_size] = new['mlm_head/bias']
    new['mlm_head/bias'] = bias
  return _replace(init_params, flat, new), has_head


def _check_tied(state_dict: Mapping, word_VxD: np.ndarray) -> None:
  """Refuses an MLM head whose decoder is not the word embeddings.

  Our decoder is tied to the word embeddings (model.MLMHead), so an untied
  one cannot be held; importing it tied would silently change the model.
  A tied checkpoint may lack the decoder weight (safetensors stores a tied
  tensor once); that is fine.
  """
  name = 'cls.predictions.decoder.weight'
  if name not in state_dict:
    return
  decoder_VxD = np.asarray(state_dict[name], np.float32)
  same_shape = decoder_VxD.shape == word_VxD.shape
  if same_shape and np.array_equal(decoder_VxD, word_VxD):
    return
  detail = (f'max abs difference {np.abs(decoder_VxD - word_VxD).max():.3g}'
            if same_shape else f'shape {decoder_VxD.shape} vs {word_VxD.shape}')
  raise ValueError(
      f'{name} differs from bert.embeddings.word_embeddings.weight ({detail}): '
      'the checkpoint has an untied MLM decoder (tie_word_embeddings=False), '
      'and our model ties the decoder to the word embeddings, so it cannot '
      'import it as it is. To keep the encoder only, drop the cls.* tensors '
      '(load it as a transformers BertModel and save that): the MLM head is '
      'then initialised at random.')


def _replace(template, flat, new: dict[str, np.ndarray]):
  """`template` (an nnx.State) with the arrays of `new` where named."""
  pairs = []
  for path, var in nnx.to_flat_state(template):
    name = '/'.join(map(str, path))
    if name in new:
      value = new.pop(name)
      if value.shape != flat[name].shape:
        raise ValueError(f'{name}: the checkpoint has shape {value.shape}, '
                         f'the model {flat[name].shape}.')
      var = var.replace(value=jax.numpy.asarray(value, var.get_value().dtype))
    pairs.append((path, var))
  if new:
    raise ValueError(f'Parameters the model does not have: {sorted(new)}; '
                     'the model config does not match the checkpoint.')
  return nnx.from_flat_state(pairs)
