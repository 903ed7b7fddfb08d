"""Pieces of a source: what the main process reads, what a worker expands.

In a parallel build the main process is the bottleneck if it touches every
document, so it only reads bytes and cuts them at document boundaries with
C-speed searches: text at a blank line, JSON Lines at a newline, Parquet and
arrow files at a record batch (pyarrow reads those). An uncompressed local
text file is not even read: the main process seeks to each cut, reads a few
KB to find its blank line, and a worker reads its piece's byte range itself.
The workers decode, parse, check and normalize a piece into documents
(`expand`). A piece never splits a document and its cut depends only on the
file's bytes, so the documents, and the chunks a killed build resumes from,
are the same whatever the worker count; with one worker the same functions
run in-process.
"""

from collections.abc import Iterable, Iterator
import dataclasses
import json
import os
import re
from typing import Any

import numpy as np

from mlm_jax.data import files as files_lib
from mlm_jax.data import parallel
from mlm_jax.data import records

# Bytes of a file per piece when no chunk size is given.
PIECE_BYTES = 1 << 20
# A whitespace-only line: a document boundary of a text file. ASCII
# whitespace only, so the cut is a bytes search; a line of Unicode spaces is
# still a boundary to the worker, just never a cut.
_BLANK_LINE = re.compile(rb'\n[ \t\r\f\v]*\n')
_NEWLINE = re.compile(rb'\n')
_REPLACEMENT = '\ufffd'.encode()
# Bytes read at a time while looking for a cut's blank line.
_WINDOW_BYTES = 1 << 16


@dataclasses.dataclass
class Piece:
  """Whole documents of one file, still undecoded.

  kind: 'text' (UTF-8 bytes, documents separated by blank lines), 'jsonl'
  (JSON Lines bytes), 'cache' (lines of JSON strings: cleaned Wikipedia
  text), 'arrow' (a pyarrow array of the text column), 'docs' (a list of
  finished documents) or 'xml' (whole <page> elements of a dump, which
  `sources` parses and cleans).
  """
  kind: str
  path: str
  data: Any
  first_line: int = 1  # jsonl: the file's line number of the first line
  text_field: str = 'text'
  one_doc: bool = False  # text: the whole file is one document
  # With data None: the bytes [start, end) of the file, which the worker
  # reads (text: a range of lines; xml: whole bz2 streams of a dump).
  span: tuple[int, int] | None = None

  def size(self) -> int:
    if self.span is not None:
      return self.span[1] - self.span[0]
    if self.kind == 'arrow':
      return self.data.nbytes
    if self.kind == 'docs':
      return sum(map(len, self.data))
    return len(self.data)


class Position:
  """Bytes of the source read so far, for progress and ETA."""

  def __init__(self, files: list[str]):
    self.start(sum(map(files_lib.size, files)))

  def start(self, total: int) -> None:
    """A new pass over `total` bytes."""
    self.total = total
    self._done = 0
    self._raw = None

  def bytes(self) -> int:
    try:
      return self._done + (self._raw.tell() if self._raw else 0)
    except ValueError:  # closed
      return self._done

  def open(self, path: str):
    self._raw = files_lib.open_binary(path)
    return self._raw

  def close(self, path: str):
    self._done += files_lib.size(path)
    self._raw = None


def read_error(path: str, e: Exception) -> ValueError:
  return ValueError(f'{path} is corrupt or truncated ({type(e).__name__}: '
                    f'{e}); re-download or remove it from data.source. The '
                    'parts already built are kept: the next run resumes.')


def cut(f, size: int, boundary: re.Pattern, lead: bytes = b'\n'
        ) -> Iterator[bytes]:
  """`f`'s bytes in blocks: each ends at the first `boundary` that starts at
  or past `size` bytes into it (or at the end of `f`).

  Every match of `boundary` starts with the byte `lead` and holds no other
  `lead` but, maybe, its last byte (a blank line: newline, spaces, newline;
  `</page>`), so a search resumes at the last `lead` already read.
  """
  buf, start = b'', size
  while more := f.read(size):
    buf += more
    while (m := boundary.search(buf, start)) is not None:
      yield buf[:m.end()]
      buf, start = buf[m.end():], size
    last = buf.rfind(lead, start)
    start = max(start, last if last >= 0 else len(buf))
  if buf:
    yield buf


def _spans(f, size: int, boundary: re.Pattern) -> Iterator[tuple[int, int]]:
  """The byte ranges of a seekable `f` that `cut` would cut it into,
  reading only a few KB at each cut."""
  start, end_of_file = 0, f.seek(0, os.SEEK_END)
  while start < end_of_file:
    end = _boundary_end(f, start + size, boundary, end_of_file)
    yield start, end
    start = end


def _boundary_end(f, at: int, boundary: re.Pattern, end_of_file: int) -> int:
  """The end of the first `boundary` that starts at or after byte `at`."""
  if at >= end_of_file:
    return end_of_file
  f.seek(at)
  buf, offset = b'', at  # buf holds the bytes from `offset` on
  while more := f.read(_WINDOW_BYTES):
    buf += more
    if (m := boundary.search(buf)) is not None:
      return offset + m.end()
    # A boundary can only start at a newline: keep the bytes from the last.
    last = buf.rfind(b'\n')
    buf, offset = (buf[last:], offset + last) if last >= 0 else (
        b'', offset + len(buf))
  return end_of_file


def read_span(piece: Piece) -> bytes:
  """Worker: the bytes of a text piece that the main process did not read."""
  start, end = piece.span
  try:
    with files_lib.open_binary(piece.path) as f:
      f.seek(start)
      data = f.read(end - start)
  except OSError as e:
    raise read_error(piece.path, e) from e
  if len(data) != end - start:
    raise read_error(piece.path, EOFError(
        f'{end - start} bytes from byte {start} wanted, {len(data)} read: '
        'did the file change during the build?'))
  return data


def text_pieces(path: str, one_doc: bool, size: int, pos) -> Iterator[Piece]:
  raw = pos.open(path)
  try:
    with raw, records.open_binary(path, raw) as f:
      # Uncompressed and local: the workers read their spans. (A bucket's
      # file is streamed by the main process: one read, not one per span.)
      if f is raw and not files_lib.is_url(path) and raw.seekable():
        spans = ([(0, raw.seek(0, os.SEEK_END))] if one_doc
                 else _spans(raw, size, _BLANK_LINE))
        for span in spans:
          yield Piece('text', path, None, one_doc=one_doc, span=span)
      else:
        blocks = [f.read()] if one_doc else cut(f, size, _BLANK_LINE)
        for block in blocks:
          yield Piece('text', path, block, one_doc=one_doc)
  except (OSError, EOFError) as e:
    raise read_error(path, e) from e
  pos.close(path)


def _line_pieces(kind: str, path: str, text_field: str, size: int, pos
                 ) -> Iterator[Piece]:
  line = 1
  raw = pos.open(path)
  with raw, records.open_binary(path, raw) as f:
    for block in cut(f, size, _NEWLINE):
      yield Piece(kind, path, block, first_line=line, text_field=text_field)
      line += block.count(b'\n')
  pos.close(path)


def cache_pieces(path: str, size: int, pos) -> Iterator[Piece]:
  return _line_pieces('cache', path, '', size, pos)


def record_pieces(path: str, text_field: str, size: int, pos
                  ) -> Iterator[Piece]:
  k = records.kind(path)
  try:
    if k == 'jsonl':
      yield from _line_pieces('jsonl', path, text_field, size, pos)
      return
    for batch in records.arrow_batches(path, text_field, k):
      for column in _slices(batch.column(0), size):
        yield Piece('arrow', path, column, text_field=text_field)
  except records.RecordError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise records.corrupt_error(path, k, e) from e
  pos.close(path)


def _slices(column, size: int) -> Iterator[Any]:
  """Rows of a string column in runs of about `size` bytes, compacted.

  A batch can hold a whole row group (hundreds of MB of web text): cut, so a
  chunk stays small and several workers share a batch. Compacted, since a
  pickled slice would carry its parent's whole buffers.
  """
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  large = pa.types.is_large_string(column.type)
  if not (large or pa.types.is_string(column.type)) or column.nbytes <= size:
    yield column  # the worker checks the type and names the file
    return
  offsets = np.frombuffer(column.buffers()[1], np.int64 if large else np.int32
                          )[column.offset:column.offset + len(column) + 1]
  start = 0
  while start < len(column):
    end = int(np.searchsorted(offsets, offsets[start] + size))
    end = min(max(end, start + 1), len(column))
    yield pa.concat_arrays([column.slice(start, end - start)])
    start = end


def chunks(pieces: Iterable[Piece], size: int) -> Iterator[list[Piece]]:
  """Consecutive pieces of about `size` bytes in all: one worker task."""
  return parallel.chunks(pieces, size, size=Piece.size)


def normalize(text: str) -> str:
  """Whitespace runs to one space, blank lines dropped."""
  lines = (' '.join(line.split()) for line in text.splitlines())
  return '\n'.join(filter(None, lines))


def _text_docs(piece: Piece) -> tuple[list[str], int]:
  data = read_span(piece) if piece.data is None else piece.data
  text = data.decode('utf-8', errors='replace')
  # A real U+FFFD in the file is not a decoding error.
  bad = text.count('\ufffd') - data.count(_REPLACEMENT)
  docs, lines = [], []
  # '\n' only: file lines, not str.splitlines' (which also cuts at \r, \x1c).
  for line in text.split('\n'):
    line = ' '.join(line.split())
    if line:
      lines.append(line)
    elif lines and not piece.one_doc:
      docs.append('\n'.join(lines))
      lines = []
  if lines:
    docs.append('\n'.join(lines))
  return docs, bad


def _jsonl_docs(piece: Piece) -> tuple[list[str], int]:
  docs = []
  for i, line in enumerate(piece.data.split(b'\n')):
    if line.strip():
      doc = normalize(records.jsonl_text(piece.path, piece.first_line + i,
                                         line, piece.text_field))
      if doc:
        docs.append(doc)
  return docs, 0


def _cache_docs(piece: Piece) -> tuple[list[str], int]:
  return [json.loads(line) for line in piece.data.split(b'\n') if line], 0


def _arrow_docs(piece: Piece) -> tuple[list[str], int]:
  records.check_text_column(piece.path, piece.text_field, piece.data.type)
  docs = (normalize(t) for t in piece.data.to_pylist() if t is not None)
  return [d for d in docs if d], 0


_EXPAND = {'text': _text_docs, 'jsonl': _jsonl_docs, 'cache': _cache_docs,
           'arrow': _arrow_docs, 'docs': lambda piece: (piece.data, 0)}


def expand(chunk: list[Piece]) -> tuple[list[str], dict[str, list[int]]]:
  """Worker: the documents of a chunk, and per file [documents, invalid
  UTF-8 sequences] (the main process logs those once per file)."""
  docs, tally = [], {}
  for piece in chunk:
    piece_docs, bad = _EXPAND[piece.kind](piece)
    docs += piece_docs
    counts = tally.setdefault(piece.path, [0, 0])
    counts[0] += len(piece_docs)
    counts[1] += bad
  return docs, tally


def add_tally(total: dict[str, list[int]], tally: dict[str, list[int]]):
  for path, (n, bad) in tally.items():
    counts = total.setdefault(path, [0, 0])
    counts[0] += n
    counts[1] += bad
