"""Sources in a bucket (gs://): globbed, read and built as local files are.

No bucket is reachable here, so `bucket` serves gs:// from a local directory
through a stand-in for gcsfs: a real fsspec filesystem registered under
gcsfs's protocol, reached through etils.epath exactly as gcsfs would be.
"""

import gzip
import importlib
import json
import shutil

from etils import epath
from fsspec.implementations import dirfs
from fsspec.implementations import local
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlm_jax import data
from mlm_jax.data import files
from mlm_jax.data import sources


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The local directory that gs://... names."""
  root = tmp_path / 'gcs'
  root.mkdir()

  class FakeGCS(dirfs.DirFileSystem):
    protocol = ('gcs', 'gs')

    def __init__(self, *args, **kwargs):
      del args, kwargs  # gcsfs's options
      super().__init__(path=str(root), fs=local.LocalFileSystem())

  registry = importlib.import_module('fsspec.registry')._registry  # pylint: disable=protected-access
  monkeypatch.setitem(registry, 'gcs', FakeGCS)
  monkeypatch.setattr(files, '_READERS', {'gs': 'fsspec'})
  monkeypatch.setattr(epath.gpath, '_is_tf_installed', lambda: False)
  epath.backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield root
  epath.backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def _corpus(directory, docs):
  """Three shards of three kinds: text, JSON Lines (gzip), Parquet."""
  directory.mkdir(parents=True)
  (directory / 'part-0.txt').write_text('\n\n'.join(docs[:20]) + '\n')
  with gzip.open(directory / 'part-1.jsonl.gz', 'wt') as f:
    for d in docs[20:40]:
      f.write(json.dumps({'text': d}) + '\n')
  pq.write_table(pa.table({'text': docs[40:]}), directory / 'part-2.parquet',
                 row_group_size=7)


def _rows(source):
  return np.stack([np.stack([source[i]['input_ids'], source[i]['segment_ids']])
                   for i in range(len(source))])


def test_a_bucket_source_builds_the_rows_of_its_local_copy(
    tmp_path, bucket, make_docs, make_config):
  docs = make_docs(60, seed=11)
  _corpus(tmp_path / 'local', docs)
  shutil.copytree(tmp_path / 'local', bucket / 'b' / 'corpus')
  remote = 'gs://b/corpus/part-*'
  assert files.glob(remote) == [f'gs://b/corpus/part-{i}{ext}' for i, ext in
                                enumerate(['.txt', '.jsonl.gz', '.parquet'])]
  assert list(sources.documents(remote)) == list(
      sources.documents(str(tmp_path / 'local' / 'part-*')))
  for name in ('part-1.jsonl.gz', 'part-2.parquet'):  # a Beam task's read
    assert list(sources.file_documents(f'gs://b/corpus/{name}', 'text')) == (
        list(sources.file_documents(str(tmp_path / 'local' / name), 'text')))
  got = data.prepare(make_config(remote, str(tmp_path / 'd1'), workers=2), 32)
  want = data.prepare(
      make_config(str(tmp_path / 'local' / 'part-*'), str(tmp_path / 'd2')), 32)
  for split in ('train_source', 'eval_source'):
    np.testing.assert_array_equal(_rows(getattr(got, split)),
                                  _rows(getattr(want, split)))
  # A changed object is a changed source: it builds anew.
  before = sources.fingerprint(remote)
  (bucket / 'b' / 'corpus' / 'part-0.txt').write_text('Other text.\n')
  assert sources.fingerprint(remote) != before


def test_bucket_errors_say_what_to_do(tmp_path, bucket, monkeypatch, make_config,
                                     prepared):
  with pytest.raises(ValueError, match="glob 'gs://b/none/\\*.txt' matches no"):
    sources.documents('gs://b/none/*.txt')
  with pytest.raises(ValueError, match="No such file: 'gs://b/a.txt'"):
    sources.documents('gs://b/a.txt')
  with pytest.raises(ValueError, match='`\\*\\*` is not supported'):
    sources.documents('gs://b/**/*.txt')
  with pytest.raises(ValueError, match='ftp:// is not supported'):
    sources.documents('ftp://host/a.txt')
  (bucket / 'b').mkdir()
  (bucket / 'b' / 'a.jsonl').write_text('{"body": "x"}\n')
  with pytest.raises(ValueError, match="gs://b/a.jsonl:1: no text field 'text'"):
    sources.documents('gs://b/a.jsonl')
  # A local build does not write into a bucket, nor trains a tokenizer there.
  (bucket / 'b' / 'a.txt').write_text('Some text.\n')
  config = make_config('gs://b/a.txt', 'gs://b/data')
  with pytest.raises(ValueError, match='is in a bucket: give data.tokenizer'):
    data.prepare(config, 32)
  config.tokenizer = str(tmp_path / 'sp.model')
  (tmp_path / 'sp.model').write_bytes(prepared.tokenizer.model_bytes)
  with pytest.raises(ValueError, match='No dataset yet under data.data_dir='
                     "'gs://b/data'.*data.beam_runner"):
    data.prepare(config, 32)
  assert not (bucket / 'b' / 'data').exists()
  # Without gcsfs (nor TensorFlow) nothing reads gs://: say what to install.
  monkeypatch.setattr(files, '_READERS', {'gs': 'gcsfs_not_installed'})
  monkeypatch.setattr(files, '_TENSORFLOW', 'tensorflow_not_installed')
  with pytest.raises(ValueError, match='needs gcsfs_not_installed or '
                     'tensorflow.*".\\[gcs\\]"'):
    sources.documents('gs://b/a.jsonl')
