"""Parallel builds: the serial build's rows, bounded work in flight, resumable."""

import bz2
import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlm_jax import data
from mlm_jax.data import builder
from mlm_jax.data import packing
from mlm_jax.data import parallel
from mlm_jax.data import sources
from mlm_jax.data import tokens
import greedy_pack


def _rows(source):
  return np.stack([np.stack([source[i]['input_ids'], source[i]['segment_ids']])
                   for i in range(len(source))])


@pytest.fixture
def small_pieces(monkeypatch):
  """Many chunks and shards from a small corpus."""
  monkeypatch.setattr(builder, 'CHUNK_CHARS', 700)
  monkeypatch.setattr(tokens, '_MIN_SHARD_ROWS', 8)
  monkeypatch.setattr(tokens, '_BLOCK_ROWS', 5)


def _dump(path, docs, streams=False):
  """A dump in one bz2 stream, or (streams) a stream per page: Wikimedia's
  multistream layout."""
  pages = [f'<page><title>T{i}</title><ns>0</ns><revision><text>'
           f"'''{d.split()[0]}''' [[link|{d}]]{{{{cite|x=1}}}}"
           f'</text></revision></page>' for i, d in enumerate(docs)]
  parts = ['<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">',
           *pages, '</mediawiki>']
  if not streams:
    parts = [''.join(parts)]
  path.write_bytes(b''.join(bz2.compress(p.encode()) for p in parts))


def _jsonl_gz(path, docs):
  with gzip.open(path, 'wt') as f:
    for d in docs:
      f.write(json.dumps({'text': d}) + '\n')


@pytest.mark.parametrize('kind', ['text', 'dump', 'multistream', 'jsonl',
                                  'parquet'])
def test_parallel_rows_equal_serial_rows(tmp_path, kind, make_docs, write_docs,
                                         make_config, prepared, small_pieces,
                                         monkeypatch):
  docs = [d * 4 for d in make_docs(90, seed=5)]  # over MIN_PAGE_CHARS
  if kind == 'text':
    write_docs(tmp_path / 'a.txt', docs[:50])
    write_docs(tmp_path / 'b.txt', docs[50:])
    source = f'{tmp_path}/*.txt'
  elif kind == 'jsonl':
    _jsonl_gz(tmp_path / 'a.jsonl.gz', docs[:50])
    _jsonl_gz(tmp_path / 'b.jsonl.gz', docs[50:])
    source = f'{tmp_path}/*.jsonl.gz'
  elif kind == 'parquet':
    # One row group: the workers share it only if it is cut into pieces.
    pq.write_table(pa.table({'text': docs}), tmp_path / 'a.parquet')
    source = f'{tmp_path}/a.parquet'
  else:
    # Several cleaning tasks per dump: page blocks, or spans of streams.
    monkeypatch.setattr(sources, '_CLEAN_CHUNK_CHARS', 2000)
    _dump(tmp_path / 'w1-pages-articles.xml.bz2', docs[:50],
          streams=kind == 'multistream')
    _dump(tmp_path / 'w2-pages-articles.xml.bz2', docs[50:])
    source = f'{tmp_path}/w*.xml.bz2'
  tok = tmp_path / 'sp.model'
  tok.write_bytes(prepared.tokenizer.model_bytes)
  built = {w: data.prepare(make_config(source, str(tmp_path / f'd{w}'),
                                       tokenizer=str(tok), workers=w), 16)
           for w in (1, 2)}
  for split in ('train', 'validation'):
    assert built[1].info[split] == built[2].info[split]
  for attr in ('train_source', 'eval_source'):
    np.testing.assert_array_equal(_rows(getattr(built[1], attr)),
                                  _rows(getattr(built[2], attr)))
  # Many chunks and several shards were made, and the reference greedy
  # packing of the documents' tokens gives the same training rows.
  info = built[2].train_source
  shards = [f for f in os.listdir(built[2].info['data_dir'])
            if '.array_record-' in f]
  assert len(shards) > 2, shards
  texts = list(sources.documents(source))
  lowest = min(map(packing.doc_hash, texts))
  train = [prepared.tokenizer.encode(d) for d in texts
           if not packing.is_eval(np.array([packing.doc_hash(d)]), 0.1,
                                  lowest)[0]]
  want = list(greedy_pack.pack([t for t in train if t], 16, 2, 3, 0))
  np.testing.assert_array_equal(
      _rows(info), np.stack([np.stack(r) for r in want]))
  # Record sources give back their documents as written.
  if kind in ('jsonl', 'parquet'):
    assert texts == docs


def test_parallel_build_logs_and_names_lines_once_per_file(
    tmp_path, make_config, prepared, small_pieces, caplog):
  tok = tmp_path / 'sp.model'
  tok.write_bytes(prepared.tokenizer.model_bytes)
  text = ''.join(f'Document {i} caf\xc3\xa9 \xff and more words.\n\n'
                 for i in range(200)).encode('latin-1')
  (tmp_path / 'bad.txt').write_bytes(text)
  with caplog.at_level(logging.WARNING):
    data.prepare(make_config(str(tmp_path / 'bad.txt'), str(tmp_path / 'd'),
                             tokenizer=str(tok), workers=2), 16)
  # Counted by the workers over many pieces, logged once by the build.
  assert caplog.text.count('invalid UTF-8') == 1
  assert 'bad.txt: 200 invalid UTF-8' in caplog.text
  lines = [json.dumps({'text': f'Doc {i} ' * 20}) for i in range(300)]
  lines[250] = json.dumps({'body': 'no text'})
  with gzip.open(tmp_path / 'c.jsonl.gz', 'wt') as f:
    f.write('\n'.join(lines) + '\n')
  # The record is far into the file, in a worker's piece: still named.
  with pytest.raises(ValueError, match=r"c\.jsonl\.gz:251: no text field 'text' "
                     r"\(found \['body'\]\)"):
    data.prepare(make_config(str(tmp_path / 'c.jsonl.gz'),
                             str(tmp_path / 'e'), tokenizer=str(tok),
                             workers=2), 16)


def test_packing_rows_equal_greedy_pack():
  rng = np.random.default_rng(0)
  for seq_len in (2, 3, 6, 16):
    for _ in range(50):
      docs = [list(rng.integers(5, 70000, rng.integers(0, 3 * seq_len)))
              for _ in range(rng.integers(1, 12))]
      want = list(greedy_pack.pack([d for d in docs if d], seq_len, 2, 3, 0))
      ids, ends = packing.stream(
          np.array([t for d in docs for t in d], np.int32),
          np.array([len(d) for d in docs], np.int32),
          np.ones(len(docs), bool), 3)
      if not want:
        assert not len(ids)
        continue
      got = packing.rows(ids, ends, seq_len, 2, 0)
      np.testing.assert_array_equal(got[0], np.stack([w[0] for w in want]))
      np.testing.assert_array_equal(got[1], np.stack([w[1] for w in want]))


def test_fast_serializer_writes_what_tfds_writes():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  row = tfds.features.Tensor(shape=(64,), dtype=np.int32)
  reference = packing.tfds_serializer(
      tfds.features.FeaturesDict({'input_ids': row, 'segment_ids': row}))
  rng = np.random.default_rng(1)
  for high in (300, 70_000, 2**31 - 1):  # 1-2, 3 and 5 varint bytes
    ids = rng.integers(0, high, (20, 64)).astype(np.int32)
    ids[0, :6] = [0, 127, 128, 16383, 16384, high - 1]
    segs = np.sort(rng.integers(0, 200, (20, 64)), axis=1).astype(np.int32)
    assert packing.same_examples(packing.Serializer()(ids, segs),
                                 reference(ids, segs))
    segs %= 128  # all one byte: the fast path
    assert packing.same_examples(packing.Serializer()(ids, segs),
                                 reference(ids, segs))


def test_ordered_keeps_order_and_bounds_work_in_flight():
  pulled = []

  def tasks():
    for i in range(40):
      pulled.append(i)
      yield pow, (i, 2)

  with parallel.Pool(2) as pool:
    got = []
    for r in pool.ordered(tasks()):
      got.append(r)
      # The source is read at most 2 * workers + 1 tasks ahead.
      assert len(pulled) <= len(got) + 2 * 2 + 1
  assert got == [i * i for i in range(40)]


_MAIN = """
import os, sys
with open(sys.argv[1], 'a') as f:  # once per process that imports this
  f.write(f'{os.getpid()}\\n')
from mlm_jax.data import parallel
import slow
if __name__ == '__main__':
  with parallel.Pool(2) as pool:
    print(len(set(pool.ordered([(slow.pid, ())] * 12))))
"""


def test_workers_do_not_import_the_parents_main(tmp_path):
  """Under `python -m mlm_jax.main` that would be jax and the trainer, in
  every worker, also in those the pool starts after the first task."""
  (tmp_path / 'main.py').write_text(_MAIN)
  (tmp_path / 'slow.py').write_text(
      # 12 x 0.5 s: the second worker has seconds to start and take tasks.
      'import os, time\ndef pid():\n  time.sleep(0.5)\n  return os.getpid()\n')
  log = tmp_path / 'imports.log'
  out = subprocess.run(
      [sys.executable, str(tmp_path / 'main.py'), str(log)],
      env=dict(os.environ, PYTHONPATH=f'{os.getcwd()}:{tmp_path}'),
      capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ['2']  # both workers ran tasks
  assert len(log.read_text().split()) == 1  # the parent alone


def test_a_worker_that_dies_is_an_error_not_a_hang():
  """The OOM killer ending a worker must stop the build with what to do
  (multiprocessing.Pool would wait for the lost result forever)."""
  start = time.monotonic()
  # Tasks of 1 MiB, as a build's chunks are: more than a pipe holds, so one
  # is part-way into a worker's pipe when the worker dies.
  chunk = b'x' * (1 << 20)
  tasks = [(len, (chunk,))] * 6 + [(os._exit, (3,))] + [(len, (chunk,))] * 12
  with pytest.raises(RuntimeError, match=r'data worker process died.*'
                     r'Lower data.workers'):
    with parallel.Pool(2) as pool:
      # os._exit ends the worker at once, as a SIGKILL would.
      list(pool.ordered(tasks))
  assert time.monotonic() - start < 60


def test_progress_logs_documents_mb_tokens_and_eta(tmp_path, corpus, prepared,
                                                   make_config, monkeypatch,
                                                   caplog, small_pieces):
  monkeypatch.setattr(parallel, '_LOG_EVERY_S', 0.0)
  tok = tmp_path / 'sp.model'
  tok.write_bytes(prepared.tokenizer.model_bytes)
  with caplog.at_level(logging.INFO):
    data.prepare(make_config(corpus[0], str(tmp_path / 'd'),
                             tokenizer=str(tok)), 16)
  lines = [r.getMessage() for r in caplog.records
           if r.getMessage().startswith('Tokenizing:')]
  assert len(lines) > 3
  assert ' documents, ' in lines[-1] and ' MB (100%), ' in lines[-1]
  assert ' MB/s, ' in lines[-1] and 'M tokens/s, ETA 0h00m00s' in lines[-1]


_BUILD = """
import hashlib, sys
from absl import logging
import numpy as np
from configs import base
from mlm_jax import data
from mlm_jax.data import builder
builder.CHUNK_CHARS = 3000
logging.set_verbosity(logging.INFO)
c = base.get_config().data
c.update(dict(source=sys.argv[1], data_dir=sys.argv[2], tokenizer=sys.argv[3],
              vocab_size=320, eval_fraction=0.1, workers=2))
p = data.prepare(c, 16)
h = hashlib.sha256()
for src in (p.train_source, p.eval_source):
  for i in range(len(src)):
    h.update(np.stack([src[i]['input_ids'], src[i]['segment_ids']]).tobytes())
print('ROWS', h.hexdigest())
"""


@pytest.mark.slow
def test_killed_build_resumes_from_its_finished_chunks(tmp_path, make_docs,
                                                       write_docs, prepared):
  write_docs(tmp_path / 'a.txt', make_docs(4000, seed=6))
  tok = tmp_path / 'sp.model'
  tok.write_bytes(prepared.tokenizer.model_bytes)

  def build(data_dir, **kw):
    return subprocess.Popen(
        [sys.executable, '-c', _BUILD, str(tmp_path / 'a.txt'),
         str(tmp_path / data_dir), str(tok)],
        env=dict(os.environ, PYTHONPATH=os.getcwd()), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **kw)

  child = build('d', start_new_session=True)
  found = []
  deadline = time.monotonic() + 120
  while time.monotonic() < deadline and child.poll() is None:
    found = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / 'd')
             for f in fs if f.endswith('.npz') and '.tmp' not in f]
    if len(found) >= 5:
      break
    time.sleep(0.01)
  assert len(found) >= 5 and child.poll() is None, 'it ended before the kill'
  os.killpg(child.pid, signal.SIGKILL)  # the build and its workers, at once
  child.communicate(timeout=60)
  work = os.path.dirname(found[0])
  kept = [f for f in os.listdir(work) if f.endswith('.npz') and '.tmp' not in f]
  assert not [f for _, _, fs in os.walk(tmp_path / 'd') for f in fs
              if f == 'dataset_info.json']  # nothing looks finished
  out, err = build('d').communicate(timeout=300)
  # The rerun read the finished chunks back instead of tokenizing them again,
  # removed them once the dataset was complete...
  assert f'({len(kept)} kept from an earlier run)' in err, err[-2000:]
  assert not os.path.exists(work)
  # ...and made the rows of a build that was never killed.
  clean, _ = build('clean').communicate(timeout=300)
  assert 'ROWS ' in out and out.split()[-1] == clean.split()[-1]


@pytest.mark.parametrize('workers, shard_tokens, want', [
    (2, 96, [4, 1]),    # train 3 shards by size -> 4; validation stays 1
    (2, 1000, [2, 1]),  # train: one per worker; validation too small to split
    (3, 96, [3, 1]),    # train 3 by size: already a whole round
    (1, 96, [3, 1]),    # serial: by size alone
])
def test_shards_come_in_whole_rounds_of_workers(monkeypatch, workers,
                                                shard_tokens, want):
  """Past one shard per worker, a split's shard count is a multiple of the
  workers (3 shards on 2 workers would leave one idle while the last is
  written); the shards still cover every row once, in order."""
  monkeypatch.setattr(tokens, '_SHARD_TOKENS', shard_tokens)
  monkeypatch.setattr(tokens, '_MIN_SHARD_ROWS', 2)
  # 12 chunks of 3 train documents of 5 tokens (a stream of 216 tokens: 72
  # rows of 4, 288 row tokens); validation: one document, in chunk 0.
  chunks = [tokens.ChunkStats(
      path=f'c{i}', documents=3 + (i == 0), chars=100,
      min_hash=0.05 if i == 0 else 0.5,
      counts={'train': (3, 15, 18),
              'validation': (1, 5, 6) if i == 0 else (0, 0, 0)},
      at_min=(1, 5, 6)) for i in range(12)]
  plans = tokens.plan(chunks, eval_fraction=0.1, seq_len=4,
                      workers=workers)
  assert plans['train'].rows == 72 and plans['validation'].rows == 2
  assert [len(plans[s].shards) for s in tokens.SPLITS] == want
  for p in plans.values():
    bounds = [(a, b) for a, b, _ in p.shards]
    assert bounds[0][0] == 0 and bounds[-1][1] == p.rows
    assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
