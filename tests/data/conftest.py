"""A tiny synthetic corpus and its prepared dataset, shared by data tests."""

import random

import ml_collections
import pytest

from mlm_jax import data

SEQ_LEN = 32
VOCAB_SIZE = 320


def _make_docs(n: int, seed: int) -> list[str]:
  """Documents as sources returns them: sentences, one paragraph a line."""
  rng = random.Random(seed)
  syllables = 'ka lo mi ne ru ta so vi de pa zu ho gri ble tor'.split()
  words = [''.join(rng.choices(syllables, k=rng.randint(1, 3)))
           for _ in range(300)]
  docs = []
  for _ in range(n):
    lines = []
    for _ in range(rng.randint(1, 3)):
      sentence = ' '.join(rng.choices(words, k=rng.randint(5, 60)))
      lines.append(sentence.capitalize() + '.')
    docs.append('\n'.join(lines))
  return docs


def _write_docs(path, docs) -> None:
  path.write_text('\n\n'.join(docs) + '\n', encoding='utf-8')


def _make_config(source: str, data_dir: str, **overrides):
  config = ml_collections.ConfigDict(dict(
      source=source, data_dir=data_dir, tokenizer='', vocab_size=VOCAB_SIZE,
      eval_fraction=0.1, text_field='text', workers=1, beam_runner='',
      beam_options=''))
  config.update(overrides)
  return config


@pytest.fixture(scope='session')
def make_docs():
  """make_docs(n, seed): n synthetic documents."""
  return _make_docs


@pytest.fixture(scope='session')
def write_docs():
  """write_docs(path, docs): a text file of blank-line separated documents."""
  return _write_docs


@pytest.fixture(scope='session')
def make_config():
  """make_config(source, data_dir, **overrides): a data config."""
  return _make_config


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
  """(source glob, its documents in order) over two text files."""
  root = tmp_path_factory.mktemp('corpus')
  docs = _make_docs(60, seed=0)
  _write_docs(root / 'a.txt', docs[:30])
  _write_docs(root / 'b.txt', docs[30:])
  return str(root / '*.txt'), docs


@pytest.fixture(scope='session')
def prepared(corpus, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('data_dir')
  return data.prepare(_make_config(corpus[0], str(data_dir)), SEQ_LEN)
