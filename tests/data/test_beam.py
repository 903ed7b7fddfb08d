"""The Beam build (DirectRunner) makes the local build's rows, in order."""

import json

import numpy as np
import pytest

from mlm_jax import data

pytest.importorskip('apache_beam')


def _rows(source):
  return np.stack([np.stack([source[i]['input_ids'], source[i]['segment_ids']])
                   for i in range(len(source))])


def test_beam_rows_equal_local_rows(tmp_path, make_docs, write_docs,
                                    make_config, prepared):
  # Three files of three kinds, so rows straddle files and chunks.
  docs = make_docs(80, seed=3)
  write_docs(tmp_path / 'a.txt', docs[:30])
  with open(tmp_path / 'b.jsonl', 'w') as f:
    for d in docs[30:55]:
      f.write(json.dumps({'text': d}) + '\n')
  write_docs(tmp_path / 'c.txt', docs[55:])
  source = f'{tmp_path}/a.txt,{tmp_path}/b.jsonl,{tmp_path}/c.txt'
  tok = tmp_path / 'sp.model'
  tok.write_bytes(prepared.tokenizer.model_bytes)
  local = data.prepare(make_config(source, str(tmp_path / 'local'),
                                   tokenizer=str(tok), workers=2), 16)
  beam = data.prepare(make_config(source, str(tmp_path / 'beam'),
                                  tokenizer=str(tok),
                                  beam_runner='DirectRunner'), 16)
  for split in ('train', 'validation'):
    assert beam.info[split] == local.info[split]
  np.testing.assert_array_equal(_rows(beam.train_source),
                                _rows(local.train_source))
  np.testing.assert_array_equal(_rows(beam.eval_source),
                                _rows(local.eval_source))


def test_beam_needs_a_tokenizer(tmp_path, corpus, make_config):
  with pytest.raises(ValueError, match='needs data.tokenizer'):
    data.prepare(make_config(corpus[0], str(tmp_path),
                             beam_runner='DirectRunner'), 16)
