"""Pieces: cut anywhere by size, they expand to exactly a whole-file read."""

import gzip
import io
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlm_jax.data import pieces
from mlm_jax.data import records
from mlm_jax.data import sources

SIZES = (1, 2, 3, 5, 8, 13, 40, 1 << 20)
# Blank lines of every kind (ASCII whitespace, \r\n, Unicode spaces only),
# runs of them, leading ones, invalid UTF-8 (also right before a newline and
# inside a multibyte character), a real U+FFFD and no final newline.
TRICKY = (b'\n\n  lead  doc\tone\r\nsecond line\n \t \n\n\nDoc two\xff\n'
          b'\r\n\xc2\xa0\nDoc three caf\xc3\xa9 \xe2\x82\nx\n\xe2\x80\xa8\n'
          b'\x0cDoc four \xef\xbf\xbd\x1cend\n\n\n\nlast\xc3')


def _reference(data: bytes, one_doc: bool) -> tuple[list[str], int]:
  """The line-by-line read the pieces replace (sources before pieces)."""
  docs, lines, bad = [], [], 0
  for raw_line in io.BytesIO(data):
    line = raw_line.decode('utf-8', errors='replace')
    bad += line.count('\ufffd') - raw_line.count(b'\xef\xbf\xbd')
    line = ' '.join(line.split())
    if line:
      lines.append(line)
    elif lines and not one_doc:
      docs.append('\n'.join(lines))
      lines = []
  if lines:
    docs.append('\n'.join(lines))
  return docs, bad


class _Pos:
  def open(self, path):
    return open(path, 'rb')

  def close(self, path):
    pass


def _expand_each(ps):
  docs, tally = [], {}
  for p in ps:
    d, t = pieces.expand([p])
    docs += d
    pieces.add_tally(tally, t)
  return docs, tally


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('one_doc', [False, True])
def test_text_pieces_expand_to_the_line_by_line_read(tmp_path, size, one_doc):
  path = tmp_path / 'a.txt.gz'
  path.write_bytes(gzip.compress(TRICKY))
  ps = list(pieces.text_pieces(str(path), one_doc, size, _Pos()))
  assert b''.join(p.data for p in ps) == TRICKY
  if not one_doc and size < 8:
    assert len(ps) > 3
  want_docs, want_bad = _reference(TRICKY, one_doc)
  assert want_bad == 3 and len(want_docs) == (1 if one_doc else 5)
  # Each piece on its own gives whole documents: no piece splits one.
  assert _expand_each(ps) == (want_docs, {str(path): [len(want_docs), 3]})


def test_text_cut_depends_on_the_bytes_only(tmp_path):
  path = tmp_path / 'a.txt'
  path.write_bytes(TRICKY * 50)
  cuts = {tuple(p.size() for p in pieces.text_pieces(
      str(path), False, 64, _Pos())) for _ in range(2)}
  assert len(cuts) == 1
  # Every cut but the file's end is right after a blank line.
  lens = next(iter(cuts))
  assert len(lens) > 10 and min(lens[:-1]) >= 64


@pytest.mark.parametrize('window', [1, 2, 3, 7, 1 << 16])
@pytest.mark.parametrize('size', SIZES)
def test_uncompressed_text_is_cut_as_its_stream_is(tmp_path, monkeypatch,
                                                   size, window):
  # The main process seeks and reads a window at each cut; the workers read
  # the spans. The cuts are those of the streaming read (a .gz copy of the
  # same bytes), whatever the window.
  monkeypatch.setattr(pieces, '_WINDOW_BYTES', window)
  data = TRICKY * 3 + b'\n \t\n' + TRICKY
  plain, packed = tmp_path / 'a.txt', tmp_path / 'a.txt.gz'
  plain.write_bytes(data)
  packed.write_bytes(gzip.compress(data))
  spans = list(pieces.text_pieces(str(plain), False, size, _Pos()))
  streamed = list(pieces.text_pieces(str(packed), False, size, _Pos()))
  assert all(p.data is None for p in spans)
  assert [p.size() for p in spans] == [len(p.data) for p in streamed]
  assert b''.join(map(pieces.read_span, spans)) == data
  assert len(pickle.dumps(spans[0])) < 300  # no text goes to the worker
  assert _expand_each(spans)[0] == _expand_each(streamed)[0]


def test_a_text_file_changed_under_a_build_is_named(tmp_path):
  path = tmp_path / 'a.txt'
  path.write_bytes(TRICKY * 20)
  ps = list(pieces.text_pieces(str(path), False, 64, _Pos()))
  path.write_bytes(TRICKY)  # truncated after the cuts were made
  with pytest.raises(ValueError, match=r'a\.txt is corrupt or truncated.*'
                     'change during the build'):
    pieces.expand(ps[-2:])


@pytest.mark.parametrize('size', SIZES)
def test_jsonl_pieces_keep_line_numbers(tmp_path, size):
  lines = [json.dumps({'text': f'doc  {i}\n\n x'}) for i in range(6)]
  lines[3] = ''  # a blank line still counts
  path = tmp_path / 'a.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  ps = list(pieces.record_pieces(str(path), 'text', size, _Pos()))
  assert _expand_each(ps)[0] == [f'doc {i}\nx' for i in (0, 1, 2, 4, 5)]
  path.write_text('\n'.join(lines + ['{"text": 5}']) + '\n')
  ps = list(pieces.record_pieces(str(path), 'text', size, _Pos()))
  with pytest.raises(records.RecordError,
                     match=r"a\.jsonl:7: field 'text' holds a int"):
    _expand_each(ps)


def test_arrow_pieces_check_the_column_in_the_worker(tmp_path):
  path = tmp_path / 'a.parquet'
  pq.write_table(pa.table({'text': ['a  b', None, ' ', 'c\n\nd'] * 600}),
                 path, row_group_size=700)
  # Size 1: one piece per non-empty row (an empty row joins the next).
  for size, n in ((1, 1800), (100, 54), (1 << 20, 3)):
    # Row groups (batches) are cut into pieces of about `size` bytes.
    ps = list(pieces.record_pieces(str(path), 'text', size, _Pos()))
    assert len(ps) == n and all(p.kind == 'arrow' for p in ps)
    docs, tally = _expand_each(ps)
    assert docs == ['a b', 'c\nd'] * 600
    assert tally == {str(path): [1200, 0]}
  # A piece pickles its own rows only, not its row group's buffers.
  assert len(pickle.dumps(ps[0].data)) < 2 * ps[0].data.nbytes
  bad = pieces.Piece('arrow', str(path), pa.array([1, 2]))
  with pytest.raises(records.RecordError, match='a.parquet: column .text. '
                     'holds int64, not text'):
    pieces.expand([bad])


def test_documents_equal_the_line_by_line_read(tmp_path, monkeypatch):
  (tmp_path / 'a.txt').write_bytes(TRICKY * 3)
  monkeypatch.setattr(pieces, 'PIECE_BYTES', 7)
  docs = list(sources.documents(str(tmp_path / 'a.txt')))
  assert docs == _reference(TRICKY * 3, False)[0]


def test_a_beam_task_reads_a_file_as_documents_do(tmp_path, monkeypatch):
  monkeypatch.setattr(pieces, 'PIECE_BYTES', 7)
  (tmp_path / 'a.txt').write_bytes(TRICKY * 3)
  with gzip.open(tmp_path / 'b.jsonl.gz', 'wt') as f:
    f.write(''.join(json.dumps({'t': f'd  {i}'}) + '\n' for i in range(9)))
  for name, field in (('a.txt', 'text'), ('b.jsonl.gz', 't')):
    path = str(tmp_path / name)
    assert (list(sources.file_documents(path, field))
            == list(sources.documents(path, text_field=field)))
  assert list(sources.file_documents(path, 't'))[-1] == 'd 8'
