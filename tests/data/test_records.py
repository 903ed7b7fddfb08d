"""JSON Lines, Parquet and HF-dataset sources; bad shards fail fast and clearly."""

import bz2
import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlm_jax import data
from mlm_jax.data import records
from mlm_jax.data import sources

DOCS = ['First  doc.\n\nIts second   paragraph.', 'Second doc.', '  ',
        'Third doc,\nin two lines.']
# As sources yields them: whitespace collapsed, blank lines and blank docs gone.
CLEAN = ['First doc.\nIts second paragraph.', 'Second doc.',
         'Third doc,\nin two lines.']


def _jsonl(path, docs, field='text', opener=open):
  with opener(path, 'wt') as f:
    for i, d in enumerate(docs):
      f.write(json.dumps({'id': i, field: d}) + '\n\n'[:1 + (i == 1)])


def _zst_open(path, mode):
  import zstandard  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  return io.TextIOWrapper(zstandard.ZstdCompressor().stream_writer(
      open(path, 'wb')), encoding='utf-8')


def _hf_dir(path, docs, field='text'):
  """The layout datasets' save_to_disk writes (checked against datasets 5.2)."""
  os.makedirs(path)
  table = pa.table({field: docs, 'id': list(range(len(docs)))})
  with pa.OSFile(str(path / 'data-00000-of-00001.arrow'), 'wb') as sink:
    with pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table, max_chunksize=2)
  (path / 'state.json').write_text(json.dumps(
      {'_data_files': [{'filename': 'data-00000-of-00001.arrow'}]}))
  (path / 'dataset_info.json').write_text('{}')


@pytest.mark.parametrize('name, write', [
    ('c.jsonl', lambda p, d: _jsonl(p, d)),
    ('c.jsonl.gz', lambda p, d: _jsonl(p, d, opener=gzip.open)),
    ('c.jsonl.zst', lambda p, d: _jsonl(p, d, opener=_zst_open)),
    ('c.parquet', lambda p, d: pq.write_table(pa.table({'text': d}), p,
                                              row_group_size=2)),
    ('hf_dataset', _hf_dir),
])
def test_record_sources(tmp_path, name, write):
  write(tmp_path / name, DOCS)
  assert list(sources.documents(str(tmp_path / name))) == CLEAN


def test_a_parquet_file_is_read_in_the_memory_of_one_batch(tmp_path):
  """Memory stays flat along a file of many row groups (pyarrow's
  pre-buffered read kept every group's bytes to the end: 33 MB here)."""
  rng = np.random.default_rng(0)
  letters = np.frombuffer(b'abcdefgh ', np.uint8)
  text = letters[rng.integers(0, 9, 40_000 * 1000)].tobytes().decode()
  docs = [text[i:i + 1000] for i in range(0, len(text), 1000)]
  path = tmp_path / 'big.parquet'
  # 40 row groups of 1 MB of text that hardly compresses.
  pq.write_table(pa.table({'text': docs}), path, row_group_size=1000)
  base, peak, rows = pa.total_allocated_bytes(), 0, 0
  for batch in records.arrow_batches(str(path), 'text', 'parquet'):
    peak = max(peak, pa.total_allocated_bytes() - base)
    rows += len(batch)
  assert rows == len(docs)
  assert peak < 10e6, f'{peak / 1e6:.1f} MB held'  # 3.8 MB measured


def test_globs_over_shards_of_every_kind_in_order(tmp_path):
  for i in range(3):
    _jsonl(tmp_path / f'web-{i}.jsonl.gz', [f'Doc {i}.'], opener=gzip.open)
  pq.write_table(pa.table({'text': ['Doc p.']}), tmp_path / 'x.parquet')
  source = f'{tmp_path}/web-*.jsonl.gz,{tmp_path}/*.parquet'
  assert list(sources.documents(source)) == ['Doc 0.', 'Doc 1.', 'Doc 2.',
                                             'Doc p.']


def test_wrong_field_names_the_file_and_the_fix(tmp_path):
  _jsonl(tmp_path / 'a.jsonl', DOCS)
  _jsonl(tmp_path / 'b.jsonl', DOCS, field='content')
  source = f'{tmp_path}/*.jsonl'
  # At the call, before any long work: every shard's first record is read.
  with pytest.raises(ValueError, match=r"b\.jsonl:1: no text field 'text' "
                     r"\(found \['content', 'id'\]\); set "
                     r'--config.data.text_field'):
    sources.documents(source)
  assert list(sources.documents(f'{tmp_path}/b.jsonl',
                                text_field='content')) == CLEAN
  pq.write_table(pa.table({'body': ['x']}), tmp_path / 'c.parquet')
  with pytest.raises(ValueError, match=r"c\.parquet: no text field 'text'"):
    sources.documents(str(tmp_path / 'c.parquet'))
  _hf_dir(tmp_path / 'hf', DOCS, field='content')
  with pytest.raises(ValueError, match=r"\.arrow: no text field 'text'"):
    sources.documents(str(tmp_path / 'hf'))


@pytest.mark.parametrize('name, content, match', [
    ('a.parquet', b'id,text\n1,hello\n', r'a\.parquet is corrupt, truncated '
     'or not a parquet file'),
    ('a.jsonl', b'id,text\n1,hello\n', r'a\.jsonl:1 is not a JSON record'),
    ('a.jsonl.gz', b'not gzip at all', r'a\.jsonl\.gz is corrupt, truncated '
     'or not a jsonl file'),
    ('enwiki-pages-articles.xml', b'<html></html>', 'does not start with '
     '<mediawiki>'),
    ('enwiki-pages-articles.xml.bz2', b'BZh9 broken', r'\.xml\.bz2 is corrupt'),
])
def test_file_of_the_wrong_kind_fails_fast(tmp_path, name, content, match):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(ValueError, match=match):
    sources.documents(str(tmp_path / name))


def test_directory_that_is_no_dataset(tmp_path):
  (tmp_path / 'd').mkdir()
  with pytest.raises(ValueError, match='not a Hugging Face dataset'):
    sources.documents(str(tmp_path / 'd'))
  (tmp_path / 'dd').mkdir()
  (tmp_path / 'dd' / 'dataset_dict.json').write_text('{}')
  (tmp_path / 'dd' / 'train').mkdir()
  with pytest.raises(ValueError, match=r"DatasetDict; point data.source at "
                     r"one of its splits: \['train'\]"):
    sources.documents(str(tmp_path / 'dd'))


def test_empty_shard_among_good_ones_is_skipped(tmp_path, caplog):
  _jsonl(tmp_path / 'a.jsonl.gz', DOCS, opener=gzip.open)
  (tmp_path / 'b.jsonl.gz').write_bytes(b'')  # an empty export shard
  with gzip.open(tmp_path / 'c.jsonl.gz', 'wt') as f:
    f.write('')  # a valid gzip holding nothing
  pq.write_table(pa.table({'text': pa.array([], pa.string())}),
                 tmp_path / 'd.parquet')
  with caplog.at_level('WARNING'):
    docs = list(sources.documents(
        f'{tmp_path}/*.jsonl.gz,{tmp_path}/d.parquet'))
  assert docs == CLEAN
  assert 'b.jsonl.gz' in caplog.text and 'c.jsonl.gz holds no document' in (
      caplog.text) and 'd.parquet holds no document' in caplog.text


def _corrupt_tail(path):
  raw = path.read_bytes()
  path.write_bytes(raw[:len(raw) // 2] + b'\0' * 64)


@pytest.mark.parametrize('kind', ['gz', 'bz2'])
def test_corrupt_shard_names_it_and_keeps_what_was_built(
    tmp_path, kind, make_docs, make_config, prepared, monkeypatch):
  from mlm_jax.data import builder  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(builder, 'CHUNK_CHARS', 2000)
  docs = make_docs(200, seed=4)
  if kind == 'gz':
    names = [f'shard-{i}.jsonl.gz' for i in range(2)]
    for name, part in zip(names, (docs[:100], docs[100:])):
      _jsonl(tmp_path / name, part, opener=gzip.open)
  else:
    names = [f'wiki-{i}-pages-articles.xml.bz2' for i in range(2)]
    for name, part in zip(names, (docs[:100], docs[100:])):
      pages = ''.join(f'<page><title>T{j}</title><ns>0</ns><revision><text>'
                      f'{d * 20}</text></revision></page>'
                      for j, d in enumerate(part))
      # 100 kB bz2 blocks: the corruption is past the first one, so it is
      # found mid-build, not by the up-front check.
      (tmp_path / name).write_bytes(bz2.compress(
          f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
          f'{pages}</mediawiki>'.encode(), compresslevel=1))
  _corrupt_tail(tmp_path / names[1])  # the header still reads fine
  tok = tmp_path / 'sp.model'
  tok.write_bytes(prepared.tokenizer.model_bytes)
  config = make_config(f'{tmp_path}/{names[0][:5]}*', str(tmp_path / 'd'),
                       tokenizer=str(tok), workers=2)
  with pytest.raises(ValueError, match=f'{names[1]} is corrupt.*remove it '
                     'from data.source'):
    data.prepare(config, 16)
  # The finished chunks (or cleaned parts) of the good shard are kept for
  # the rerun, and nothing claims to be a finished dataset.
  built = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / 'd')
           for f in fs]
  assert any(f.endswith(('.npz', '.jsonl')) for f in built), built
  assert not any(f.endswith('dataset_info.json') for f in built)
  assert not any('.tmp-' in f for f in built)
