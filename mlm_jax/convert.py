"""Hugging Face BERT checkpoints to and from mlm_jax.

Import a local BertForMaskedLM or BertModel directory (config.json,
model.safetensors or pytorch_model.bin, tokenizer files), then continue
pretraining it:

  python -m mlm_jax.convert from_hf --hf_dir=DIR --workdir=OUT
  python -m mlm_jax.main --config=OUT/config.py --workdir=RUN \
      --config.data.source=TEXT

OUT holds `params/` (a params-only Orbax checkpoint), `tokenizer/` (the HF
tokenizer files), `config.py` (base config + the model's knobs, the
tokenizer and `init_from=OUT/params`) and `config.json` (the same config, so
`fill_mask` and `to_hf` work on OUT itself). A BertModel has no MLM head: it
is initialised from `config.seed` and the log says so.

Export a training run (its newest checkpoint) or an import:

  python -m mlm_jax.convert to_hf --workdir=RUN --hf_dir=OUT

OUT then loads with `transformers.BertForMaskedLM.from_pretrained(OUT)` and
the fill-mask pipeline. Variants HF's BERT cannot express (pre-LN, RoPE,
GeGLU, local attention) are refused before anything is read or written.

Must not: lay out or load a run directory itself (run_dir.py does, for
every tool alike).
"""
import json
import os
import pprint
import shutil
import tempfile

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import numpy as np

from configs import base
from mlm_jax import checkpoint
from mlm_jax import data
from mlm_jax import hf
from mlm_jax import model
from mlm_jax import model_config
from mlm_jax import run_dir
from mlm_jax.data import tokenizer as tokenizer_lib

# Tokenizer files an HF model directory may hold; all are carried over.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json', 'vocab.txt', 'added_tokens.json')
# The model keys an import sets; the rest keep base.py's defaults.
_MODEL_KEYS = ('num_layers', 'hidden_dim', 'num_heads', 'mlp_dim', 'max_len',
               'type_vocab_size', 'dropout_rate', 'attention_dropout_rate',
               'layer_norm_eps', 'initializer_range', 'activation')


def read_hf_weights(hf_dir: str) -> dict[str, np.ndarray]:
  """name -> float32 array of a model directory (safetensors or torch .bin)."""
  def shards(index_name):
    with open(os.path.join(hf_dir, index_name)) as f:
      return sorted(set(json.load(f)['weight_map'].values()))

  files = {name: os.path.join(hf_dir, name) for name in os.listdir(hf_dir)}
  if 'model.safetensors' in files:
    names, kind = ['model.safetensors'], 'safetensors'
  elif 'model.safetensors.index.json' in files:
    names, kind = shards('model.safetensors.index.json'), 'safetensors'
  elif 'pytorch_model.bin' in files:
    names, kind = ['pytorch_model.bin'], 'torch'
  elif 'pytorch_model.bin.index.json' in files:
    names, kind = shards('pytorch_model.bin.index.json'), 'torch'
  else:
    raise ValueError(f'No weights in {hf_dir}: expected model.safetensors or '
                     'pytorch_model.bin (or their sharded index).')
  weights = {}
  for name in names:
    path = os.path.join(hf_dir, name)
    if kind == 'safetensors':
      from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
      part = st.load_file(path)
    else:
      try:
        import torch  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ValueError(f'{path} is a PyTorch pickle and torch is not '
                         'installed; install torch or convert it to '
                         'safetensors.') from e
      part = {k: v.float().numpy()
              for k, v in torch.load(path, map_location='cpu',
                                     weights_only=True).items()}
    weights.update({k: np.asarray(v, np.float32) for k, v in part.items()})
  return weights


def _copy_tokenizer(hf_dir: str, out_dir: str) -> str:
  """HF tokenizer files -> out_dir; returns the tokenizer.json path there."""
  os.makedirs(out_dir, exist_ok=True)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copy(os.path.join(hf_dir, name), out_dir)
  path = os.path.join(out_dir, 'tokenizer.json')
  if not os.path.isfile(path):
    # An older checkpoint (vocab.txt only): let transformers build the fast
    # tokenizer, and keep its tokenizer.json.
    import transformers  # pylint: disable=g-import-not-at-top
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir, use_fast=True)
    if not tok.is_fast:
      raise ValueError(f'{hf_dir} has no tokenizer.json and transformers '
                       'cannot build a fast tokenizer from its files.')
    tok.backend_tokenizer.save(path)
  return path


def from_hf(hf_dir: str, workdir: str, seq_len: int = 128, seed: int = 0):
  """Imports an HF BERT directory into WORKDIR (see the module docstring)."""
  hf_dir, workdir = os.path.abspath(hf_dir), os.path.abspath(workdir)
  with open(os.path.join(hf_dir, 'config.json')) as f:
    hf_config = json.load(f)
  mcfg = hf.model_config_from_hf(hf_config)  # refuses other architectures
  weights = read_hf_weights(hf_dir)
  tok_path = _copy_tokenizer(hf_dir,
                             os.path.join(workdir, run_dir.TOKENIZER_DIR))
  tok = tokenizer_lib.load(tok_path)
  if tok.vocab_size != mcfg.vocab_size:
    raise ValueError(f'The tokenizer has {tok.vocab_size} tokens but the '
                     f'model {mcfg.vocab_size} word embeddings.')

  config = base.get_config()
  config.model.size = 'base'  # every size knob is set below
  config.model.update({k: getattr(mcfg, k) for k in _MODEL_KEYS})
  config.seq_len = min(seq_len, mcfg.max_len)
  config.seed = seed
  config.data.tokenizer = tok_path
  config.init_from = os.path.join(workdir, run_dir.PARAMS_DIR)
  mcfg = model_config.from_config(config, tok.vocab_size)

  fresh = model.create(mcfg, jax.random.split(jax.random.key(seed))[0])
  graphdef, init_params = nnx.split(fresh, nnx.Param)
  params, has_head = hf.from_hf_state_dict(mcfg, weights, init_params)
  if not has_head:
    logging.warning('%s has no MLM head (a BertModel): the head is '
                    'initialised at random (seed %d); fine-tune or continue '
                    'pretraining before predicting with it.', hf_dir, seed)
  del graphdef
  checkpoint.save_params(config.init_from, params)
  run_dir.write_config(workdir, config)
  with open(os.path.join(workdir, 'config.py'), 'w') as f:
    f.write(_config_py(hf_dir, workdir, config))
  n = sum(x.size for x in jax.tree.leaves(params))
  logging.info('Imported %s (%.2fM parameters, MLM head %s) into %s.', hf_dir,
               n / 1e6, 'imported' if has_head else 'initialised', workdir)
  return dict(params=n, has_head=has_head, config=config)


def _config_py(hf_dir, workdir, config) -> str:
  knobs = pprint.pformat({k: config.model[k] for k in ('size',) + _MODEL_KEYS},
                         indent=4, sort_dicts=False)
  return f'''"""Continue pretraining {hf_dir} (written by mlm_jax.convert from_hf).

  python -m mlm_jax.main --config={workdir}/config.py --workdir=RUN \\
      --config.data.source=TEXT_FILES_OR_DUMP
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.model.update(
{knobs})
  c.seq_len = {config.seq_len}
  c.seed = {config.seed}
  c.data.tokenizer = {config.data.tokenizer!r}
  c.init_from = {config.init_from!r}
  return c
'''


def to_hf(workdir: str, hf_dir: str):
  """Exports a run or an import as an HF BertForMaskedLM directory."""
  config = run_dir.read_config(workdir)
  # Refuse before reading any weights: a config check needs no vocabulary.
  hf.check_exportable(model_config.from_config(config, vocab_size=1))
  config, mcfg, tok, bert, step = run_dir.load(workdir)
  state_dict = hf.to_hf_state_dict(mcfg, nnx.state(bert, nnx.Param))
  # HF ties the decoder to the word embeddings on load; it stores neither.
  for tied in ('cls.predictions.decoder.weight', 'cls.predictions.decoder.bias'):
    state_dict.pop(tied)
  os.makedirs(hf_dir, exist_ok=True)
  from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
  st.save_file(state_dict, os.path.join(hf_dir, 'model.safetensors'),
               metadata={'format': 'pt'})
  hf.bert_config(mcfg, pad_token_id=tok.pad_id).save_pretrained(hf_dir)
  _save_tokenizer(tok, data.tokenizer_path(config.data), hf_dir,
                  mcfg.max_len)
  logging.info('Exported %s (step %d) to %s.', workdir, step, hf_dir)


def _save_tokenizer(tok, path: str, hf_dir: str, max_len: int):
  """Writes an HF fast tokenizer that splits text as `tok` does."""
  import transformers  # pylint: disable=g-import-not-at-top
  source_dir = os.path.dirname(os.path.abspath(path))
  if tok.kind == 'hf' and os.path.isfile(
      os.path.join(source_dir, 'tokenizer_config.json')):
    for name in TOKENIZER_FILES:  # an import: its own files, unchanged
      if os.path.isfile(os.path.join(source_dir, name)):
        shutil.copy(os.path.join(source_dir, name), hf_dir)
    return
  if tok.kind == 'hf':
    backend = tok.tokenizer
  else:
    backend = _sentencepiece_backend(tok)
  piece = tok.id_to_piece
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, model_max_length=max_len,
      pad_token=piece(tok.pad_id), unk_token=piece(tok.unk_id),
      cls_token=piece(tok.cls_id), sep_token=piece(tok.sep_id),
      # The mask takes the space before it, as a masked word's piece does.
      mask_token=transformers.AddedToken(piece(tok.mask_id), lstrip=True,
                                         special=True))
  fast.save_pretrained(hf_dir)


def _sentencepiece_backend(tok):
  """A `tokenizers.Tokenizer` equal to our SentencePiece model, with the
  [CLS] ... [SEP] template BERT's pipelines expect."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  # The submodule by path: `transformers.convert_slow_tokenizer` can also be
  # the function of that name, depending on what was imported before.
  from transformers.convert_slow_tokenizer import SpmConverter  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'sp.model')
    with open(path, 'wb') as f:
      f.write(tok.model_bytes)

    class _Slow:  # what SpmConverter reads of a slow tokenizer
      vocab_file = path
      legacy = True
      add_prefix_space = True

    class _Converter(SpmConverter):
      handle_byte_fallback = True  # our models fall back to byte pieces

    backend = _Converter(_Slow()).converted()
  cls, sep = tok.id_to_piece(tok.cls_id), tok.id_to_piece(tok.sep_id)
  backend.post_processor = tokenizers.processors.TemplateProcessing(
      single=f'{cls} $A {sep}', pair=f'{cls} $A {sep} $B:1 {sep}:1',
      special_tokens=[(cls, tok.cls_id), (sep, tok.sep_id)])
  return backend


def main(argv):
  args = flags.FLAGS
  if len(argv) != 2 or argv[1] not in ('from_hf', 'to_hf'):
    raise app.UsageError('Usage: python -m mlm_jax.convert from_hf|to_hf '
                         '--hf_dir=DIR --workdir=DIR')
  if not args.hf_dir or not args.workdir:
    raise app.UsageError('--hf_dir and --workdir are both required.')
  if argv[1] == 'from_hf':
    from_hf(args.hf_dir, args.workdir, args.seq_len, args.seed)
    print(f'Imported {args.hf_dir} into {args.workdir}. Continue pretraining '
          'with:\n  python -m mlm_jax.main '
          f'--config={os.path.abspath(args.workdir)}/config.py '
          '--workdir=RUN --config.data.source=TEXT')
  else:
    to_hf(args.workdir, args.hf_dir)
    print(f'Exported {args.workdir} to {args.hf_dir}.')


if __name__ == '__main__':
  # Defined only when run as a tool: importing the module (fill_mask, tests,
  # the trainer) must not add these flags.
  flags.DEFINE_string('hf_dir', None, 'The Hugging Face model dir.')
  flags.DEFINE_string('workdir', None, 'The mlm_jax run / import dir.')
  flags.DEFINE_integer('seq_len', 128, 'from_hf: seq_len of the written '
                       'config (capped at the max positions).')
  flags.DEFINE_integer('seed', 0, 'from_hf: seed of the written config and '
                       'of a missing MLM head.')
  app.run(main)
