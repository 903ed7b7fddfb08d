"""A tiny run config on the real demo corpus, shared by end-to-end tests."""
import json
import os

from configs import cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny overrides of the demo config: a real corpus, a very small model.
TINY = {
    'num_steps': 8, 'batch_size': 8, 'seq_len': 32, 'warmup_steps': 2,
    'log_every': 2, 'eval_every': 4, 'eval_batches': 2,
    'checkpoint_every': 4,
    'model.num_layers': 1, 'model.hidden_dim': 32, 'model.num_heads': 2,
    'model.mlp_dim': 64, 'model.max_len': 32,
    'data.vocab_size': 1000,
}


def config(data_dir, **overrides):
  """The demo config with TINY, the data dir and `overrides` applied."""
  c = cpu.get_config()
  for key, value in {**TINY, 'data.data_dir': data_dir, **overrides}.items():
    section = c
    *parents, leaf = key.split('.')
    for p in parents:
      section = section[p]
    section[leaf] = value
  return c


def flags(data_dir, **overrides):
  """The same as command-line flags for `python -m mlm_jax.main`."""
  return [f'--config.{k}={v}'
          for k, v in {**TINY, 'data.data_dir': data_dir, **overrides}.items()]


def subprocess_env():
  """The environment for a child run: one CPU device, like a user's shell."""
  return {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def snapshot(directory):
  """{relative path: bytes} of every file under DIRECTORY."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out
