"""A run on disk: its layout, its config.json, and loading it for inference.

A run directory (WORKDIR) holds:

  config.json            the config that made it (`write_config`)
  checkpoints/STEP/      training checkpoints (checkpoint.py's format)
  checkpoints.corrupt/   damaged checkpoints set aside on resume
  metrics.jsonl, tensorboard/

A `convert from_hf` output has the same config.json, and `params/` (a
params-only checkpoint) and `tokenizer/` (the HF tokenizer files) instead of
checkpoints. The training loop writes the config here and resumes from
`checkpoints_dir`; `load` gives convert, fill_mask and finetune the newest
weights, the tokenizer and the model config the same way.

Must not: know the checkpoint format (checkpoint.py), build steps or
shardings (build.py), or train.
"""
import json
import os
from typing import Any, NamedTuple

from flax import nnx
import jax
import ml_collections

from configs import base
from mlm_jax import checkpoint
from mlm_jax import data
from mlm_jax import model
from mlm_jax import model_config
from mlm_jax.data import sources
from mlm_jax.data import tokenizer as tokenizer_lib

CONFIG_FILE = 'config.json'
CHECKPOINTS_DIR = 'checkpoints'
CORRUPT_DIR = CHECKPOINTS_DIR + checkpoint.CORRUPT_SUFFIX
PARAMS_DIR = 'params'        # an import's weights (checkpoint.save_params)
TOKENIZER_DIR = 'tokenizer'  # an import's copy of the HF tokenizer files


def checkpoints_dir(workdir: str) -> str:
  """The absolute path of WORKDIR's training checkpoints."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR)


def has_weights(workdir: str) -> bool:
  """Whether WORKDIR has a checkpoints/ or params/ directory to load."""
  return any(os.path.isdir(os.path.join(workdir, d))
             for d in (CHECKPOINTS_DIR, PARAMS_DIR))


def write_config(workdir: str, config: ml_collections.ConfigDict):
  """WORKDIR/config.json: what made the run, for tools that reload it."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(path + '.tmp', path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of a run (WORKDIR/config.json) over base.py's defaults."""
  if not workdir or not os.path.isdir(workdir):
    raise ValueError(f'--workdir={workdir!r} is not a directory: give a '
                     'training run or a `convert from_hf` output.')
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise ValueError(f'No {path}: --workdir must be a training run or a '
                     '`convert from_hf` output.')
  with open(path) as f:
    try:
      saved = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      raise ValueError(f'{path} is not valid JSON ({e}).') from e
  if not isinstance(saved, dict):
    raise ValueError(f'{path} holds a JSON {type(saved).__name__}, not the '
                     'object of a run config.')

  def merge(cfg, values):
    for k, v in values.items():
      if isinstance(v, dict) and k in cfg:
        merge(cfg[k], v)
      else:
        cfg[k] = v

  config = base.get_config()
  merge(config, saved)
  return config


def data_settings(config: ml_collections.ConfigDict) -> dict:
  """checkpoint.DATA_SETTINGS of a run config, and its data source.

  Saved beside each checkpoint's data position and checked on resume.
  """
  return dict(batch_size=config.batch_size, seed=config.seed,
              seq_len=config.seq_len, source=config.data.source,
              source_fingerprint=sources.fingerprint(config.data.source))


class Run(NamedTuple):
  """What `load` gives: a run's config, model config, tokenizer, model, step."""
  config: ml_collections.ConfigDict
  model_config: Any  # model_config.ModelConfig
  tokenizer: Any     # tokenizer_lib.Tokenizer
  model: Any         # model.Bert with the loaded params
  step: int


def load(workdir: str, *, model_cfg=None) -> Run:
  """The newest weights of a run or an import, with what is needed to use them.

  The params are those of the newest training checkpoint (the params only,
  not the optimizer state), or an import's `params/`. `model_cfg` (a
  ModelConfig) skips building it from the run config.
  """
  config = read_config(workdir)
  if not has_weights(workdir):  # before loading anything
    raise ValueError(f'{workdir} has no checkpoint ({CHECKPOINTS_DIR}/ or '
                     f'{PARAMS_DIR}/): train it, or `convert from_hf` into it.')
  tok = tokenizer_lib.load(data.tokenizer_path(config.data))
  mcfg = model_cfg or model_config.from_config(config, tok.vocab_size)
  abstract = nnx.eval_shape(lambda: model.create(mcfg, jax.random.key(0)))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  latest = checkpoint.latest_params(checkpoints_dir(workdir), abstract_params)
  if latest is not None:
    step, params = latest
  elif os.path.isdir(os.path.join(workdir, PARAMS_DIR)):
    step, params = 0, checkpoint.restore_params(
        os.path.join(workdir, PARAMS_DIR), abstract_params)
  else:
    raise ValueError(f'{workdir} has no checkpoint ({CHECKPOINTS_DIR}/ or '
                     f'{PARAMS_DIR}/).')
  return Run(config, mcfg, tok, nnx.merge(graphdef, params), step)
