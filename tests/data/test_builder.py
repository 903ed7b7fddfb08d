import os

import numpy as np
import pytest

from mlm_jax import data
from mlm_jax.data import builder
import greedy_pack

CLS, SEP, PAD = 2, 3, 0


def _rows(source):
  rows = [source[i] for i in range(len(source))]
  return (np.stack([r['input_ids'] for r in rows]),
          np.stack([r['segment_ids'] for r in rows]))


def test_pack_exact_rows():
  rows = list(greedy_pack.pack([[5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15]],
                           seq_len=6, cls_id=CLS, sep_id=SEP, pad_id=PAD))
  assert [r[0].tolist() for r in rows] == [
      [2, 5, 6, 7, 3, 8], [2, 3, 9, 10, 11, 12], [2, 13, 14, 15, 3, 0]]
  assert [r[1].tolist() for r in rows] == [
      [1, 1, 1, 1, 1, 2], [1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0]]
  assert all(r[0].dtype == r[1].dtype == np.int32 for r in rows)


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_rows_are_well_formed(prepared, split):
  source = prepared.train_source if split == 'train' else prepared.eval_source
  ids, segs = _rows(source)
  seq_len = prepared.info['seq_len']
  assert ids.shape == segs.shape == (prepared.info[split]['rows'], seq_len)
  assert (ids[:, 0] == CLS).all() and (ids[:, 1:] != CLS).all()
  assert ((ids == PAD) == (segs == 0)).all()
  assert not (segs[:-1] == 0).any()  # only the last row is padded
  for row_ids, row_segs in zip(ids, segs):
    n = int((row_segs > 0).sum())
    assert (row_segs[n:] == 0).all()
    assert row_segs[0] == 1 and set(np.diff(row_segs[:n])) <= {0, 1}
    last = row_segs[n - 1]
    for s in range(1, last + 1):
      piece = row_ids[row_segs == s]
      if s == 1:
        piece = piece[1:]  # the row's [CLS]
      assert (piece[:-1] != SEP).all()
      # Only a piece cut by the row's end may lack its [SEP].
      if s < last or n < seq_len:
        assert piece[-1] == SEP


def _documents(source):
  """Token lists of the documents in `source`, rebuilt from its rows."""
  ids, _ = _rows(source)
  flat = ids[:, 1:][ids[:, 1:] != PAD].tolist()
  docs, cur = [], []
  for t in flat:
    if t == SEP:
      docs.append(tuple(cur))
      cur = []
    else:
      cur.append(t)
  assert not cur
  return docs


def test_splits_hold_out_whole_documents(prepared, corpus):
  tok = prepared.tokenizer
  train, valid = _documents(prepared.train_source), _documents(
      prepared.eval_source)
  assert valid and train and not set(train) & set(valid)
  expected = [tuple(tok.encode(d)) for d in corpus[1]]
  assert sorted(train + valid) == sorted(expected)
  # Both splits keep corpus order.
  assert train == [d for d in expected if d in set(train)]
  assert len(valid) == prepared.info['validation']['documents']
  assert sum(map(len, train)) == prepared.info['train']['tokens']


def _prepare(make_config, source, data_dir, **kw):
  prepared = data.prepare(make_config(source, str(data_dir), **kw), 16)
  return prepared.info['data_dir']


def test_rebuilt_when_the_source_changes(tmp_path, make_docs, write_docs,
                                         make_config):
  path = tmp_path / 'corpus.txt'
  write_docs(path, make_docs(12, seed=1))
  first = _prepare(make_config, str(path), tmp_path / 'd')
  stamp = os.stat(os.path.join(first, 'dataset_info.json')).st_mtime_ns
  assert _prepare(make_config, str(path), tmp_path / 'd') == first
  assert os.stat(os.path.join(first, 'dataset_info.json')).st_mtime_ns == stamp
  write_docs(path, make_docs(13, seed=1))
  assert _prepare(make_config, str(path), tmp_path / 'd') != first
  assert _prepare(make_config, str(path), tmp_path / 'd',
                  eval_fraction=0.5) != first


def test_crash_leaves_nothing_reusable(tmp_path, corpus, prepared):
  crash = [True]

  def documents():
    for i, doc in enumerate(corpus[1]):
      if crash[0] and i == 40:  # mid-build, after some chunks are done
        raise RuntimeError('crash')
      yield doc

  def make():
    return builder.PackedMLM(
        data_dir=str(tmp_path), documents=documents, source_fingerprint='x',
        tokenizer=prepared.tokenizer, seq_len=16, eval_fraction=0.1,
        chunk_chars=500)

  rows = make()
  # A stale temporary directory, as a killed build leaves it.
  stale = rows.data_path.parent / f'incomplete.KILLED_{rows.data_path.name}'
  stale.mkdir(parents=True)
  (stale / 'dataset_info.json').write_text('{}')
  with pytest.raises(RuntimeError, match='crash'):
    rows.download_and_prepare()
  assert not rows.data_path.exists()
  assert not make().is_prepared()
  kept = {n: os.stat(os.path.join(rows.work_dir, n)).st_mtime_ns
          for n in os.listdir(rows.work_dir)}
  assert kept and all(n.endswith('.npz') and '.tmp' not in n for n in kept)
  crash[0] = False
  rows = make()
  rows.download_and_prepare()
  # The rerun kept the finished chunks (not rewritten), and made the rows of
  # a clean build.
  assert {n: os.stat(os.path.join(rows.work_dir, n)).st_mtime_ns
          for n in kept} == kept
  clean = builder.PackedMLM(
      data_dir=str(tmp_path / 'clean'), documents=documents,
      source_fingerprint='x', tokenizer=prepared.tokenizer, seq_len=16,
      eval_fraction=0.1)
  clean.download_and_prepare()
  for split in ('train', 'validation'):
    for got, want in zip(_rows(rows.as_data_source(split)),
                         _rows(clean.as_data_source(split))):
      np.testing.assert_array_equal(got, want)


def test_given_tokenizer_and_bad_settings(tmp_path, corpus, prepared,
                                          make_config):
  tok_path = tmp_path / 'sp.model'
  tok_path.write_bytes(prepared.tokenizer.model_bytes)
  config = make_config(corpus[0], str(tmp_path / 'd'), tokenizer=str(tok_path))
  got = data.prepare(config, 16)
  assert got.tokenizer.model_bytes == prepared.tokenizer.model_bytes
  assert not os.path.exists(tmp_path / 'd' / 'tokenizers')
  with pytest.raises(ValueError, match='No tokenizer model'):
    data.prepare(make_config(corpus[0], str(tmp_path),
                             tokenizer=str(tmp_path / 'nope')), 16)
  with pytest.raises(ValueError, match='eval_fraction'):
    data.prepare(make_config(corpus[0], str(tmp_path), eval_fraction=1.0), 16)
