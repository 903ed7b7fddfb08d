"""Text sources: the demo corpus, Wikipedia dumps, text and record files.

A source is a string: 'demo', or a comma-separated list of paths, globs and
Hugging Face `datasets` directories (saved with `save_to_disk`), local or in a
bucket (gs://: `files`). Each file's kind comes from its name:

- a name containing '.xml' is a Wikipedia pages-articles dump
  (`enwiki-...-pages-articles1.xml-p1p41242.bz2` keeps '.xml' mid-name);
- `.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.json.gz` (JSON Lines), `.parquet`,
  `.arrow`: one document per record, its text in `text_field`;
- anything else is UTF-8 text with documents separated by blank lines (BERT's
  convention), optionally `.gz`, `.bz2` or `.zst` compressed.

Every source yields documents as strings whose lines are paragraphs, with
runs of whitespace collapsed. Dumps (`wiki`) are cleaned once, in parallel,
into a cache of cleaned text that the tokenizer and the builder then read. A
build reads the source as raw `pieces` that its workers decode into
documents.
"""

from collections.abc import Iterator
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import uuid

from absl import logging

from mlm_jax.data import files as files_lib
from mlm_jax.data import parallel
from mlm_jax.data import pieces as pieces_lib
from mlm_jax.data import records
from mlm_jax.data import wiki

DEMO = 'demo'
_DEMO_FILE = ('test/test_data/enwiki-latest-pages-articles1.xml-'
              'p000000010p000030302-shortened.bz2')
# Dump bytes per cleaning task: big enough that a worker's pickling and
# logging cost nothing, small enough that a killed build loses little.
_CLEAN_CHUNK_CHARS = 1 << 18
# How a dump is cut into cleaning tasks, hence into cache parts: 1 cut parsed
# pages by their text's length (before 2026-12-07), 2 cuts the dump's bytes.
# A finished cache keeps its parts; an unfinished one resumes only parts of
# the current cut.
_CLEAN_CUT = 2



def _demo_path() -> str:
  # find_spec locates gensim without importing it (seconds of scipy imports).
  spec = importlib.util.find_spec('gensim')
  path = spec and os.path.join(spec.submodule_search_locations[0], _DEMO_FILE)
  if not path or not os.path.isfile(path):
    raise ValueError(f'The demo corpus {_DEMO_FILE} is missing: install gensim '
                     'from its wheel (pip install gensim).')
  return path


def _expand(part: str) -> list[str]:
  if files_lib.has_magic(part):
    matched = files_lib.glob(part)
    if not matched:
      raise ValueError(f'The glob {part!r} matches no file; fix the pattern '
                       "or the data.source setting (or use 'demo').")
  elif files_lib.exists(part):
    matched = [part]
  else:
    raise ValueError(f'No such file: {part!r}; fix the path in data.source '
                     "(or use 'demo').")
  files = []
  for path in matched:
    if files_lib.isdir(path):
      files += records.hf_dataset_files(path)
    else:
      files.append(path)
  return files


def resolve(source: str) -> list[str]:
  """Returns the files of `source`; raises ValueError before any long work.

  Empty files (an empty shard among good ones) are left out with a warning.
  """
  if source == DEMO:
    return [_demo_path()]
  files = []
  for part in filter(None, (p.strip() for p in source.split(','))):
    files += _expand(files_lib.expand_user(part))
  if not files:
    raise ValueError(f'Empty data.source {source!r}: give "demo", a Wikipedia '
                     'dump, or text files/globs separated by commas.')
  empty = [f for f in files if files_lib.size(f) == 0]
  if len(empty) == len(files):
    raise ValueError(f'The corpus {source!r} is empty: {files} hold no bytes.')
  if empty:
    logging.warning('Skipping %d empty file(s) of %s: %s', len(empty), source,
                    empty[:10])
  return [f for f in files if f not in set(empty)]


def fingerprint(source: str, one_doc_per_file: bool = False,
                text_field: str = 'text') -> str:
  """A short hash that changes whenever the documents of `source` may."""
  if source == DEMO:
    parts = ['demo', importlib.metadata.version('gensim'),
             os.path.getsize(_demo_path())]
  else:
    parts = []
    files = resolve(source)
    for f in files:
      parts += files_lib.identity(f)
    if any(map(records.kind, files)):
      parts.append(text_field)
  parts += [wiki.CLEAN_VERSION, one_doc_per_file]
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def check(files: list[str], text_field: str) -> None:
  """Opens every file's first record: a bad shard fails before long work."""
  for path in files:
    if records.kind(path):
      records.check(path, text_field)
      continue
    head = _head(path)
    if wiki.is_dump(path) and b'<mediawiki' not in head:
      raise ValueError(f'{path} is named like a Wikipedia dump (.xml) but does '
                       'not start with <mediawiki>; rename it or fix '
                       'data.source.')


def _head(path: str, size: int = 1 << 16) -> bytes:
  try:
    with files_lib.open_binary(path) as raw, records.open_binary(path, raw
                                                            ) as f:
      return f.read(size)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path} is corrupt or unreadable ({type(e).__name__}: '
                     f'{e}); re-download or remove it from data.source.') from e


def _pieces(files: list[str], one_doc_per_file: bool, text_field: str,
            size: int, pos: pieces_lib.Position, counts: dict[str, int]
            ) -> Iterator[pieces_lib.Piece]:
  """The pieces of `files` (the documents of dumps cleaned here: only a
  source with no cache directory comes here with a dump)."""
  for path in files:
    if wiki.is_dump(path):
      docs = (wiki.clean_page(title, text, counts)
              for piece in wiki.dump_pieces(path, size, pos)
              for title, text in wiki.piece_pages(piece, counts))
      for chunk in parallel.chunks(filter(None, docs), size):
        yield pieces_lib.Piece('docs', path, chunk)
    elif records.kind(path):
      yield from pieces_lib.record_pieces(path, text_field, size, pos)
    else:
      yield from pieces_lib.text_pieces(path, one_doc_per_file, size, pos)


def _items(files: list[str], one_doc_per_file: bool, text_field: str,
           pos: pieces_lib.Position, counts: dict[str, int]
           ) -> Iterator[pieces_lib.Piece]:
  """The 'xml' pieces of dumps, the pieces of the other files."""
  for path in files:
    if wiki.is_dump(path):
      yield from wiki.dump_pieces(path, _CLEAN_CHUNK_CHARS, pos)
    else:
      yield from _pieces([path], one_doc_per_file, text_field,
                         _CLEAN_CHUNK_CHARS, pos, counts)


def _clean(items: list[pieces_lib.Piece]
           ) -> tuple[list[str], dict, dict[str, list[int]]]:
  """Worker: cleaned pages and the documents of pieces, in order."""
  counts, tally = wiki.new_counts(), {}
  docs = []
  for item in items:
    if item.kind != 'xml':
      piece_docs, piece_tally = pieces_lib.expand([item])
      docs += piece_docs
      pieces_lib.add_tally(tally, piece_tally)
      continue
    for title, text in wiki.piece_pages(item, counts):
      doc = wiki.clean_page(title, text, counts)
      if doc is not None:
        docs.append(doc)
  return docs, counts, tally


def _report(files: list[str], text_field: str,
            tally: dict[str, list[int]]) -> None:
  """Logs, once per file, what the workers counted in its pieces."""
  for path in files:
    n, bad = tally.get(path, (0, 0))
    if bad:
      logging.warning('%s: %d invalid UTF-8 byte sequences replaced by '
                      'U+FFFD.', path, bad)
    if records.kind(path) and not n:
      logging.warning('%s holds no document (no non-blank %r).', path,
                      text_field)


def _expanded(chunks: Iterator[list[pieces_lib.Piece]], files: list[str],
              text_field: str) -> Iterator[str]:
  """The documents of `chunks`, expanded in this process."""
  tally = {}
  for chunk in chunks:
    docs, chunk_tally = pieces_lib.expand(chunk)
    pieces_lib.add_tally(tally, chunk_tally)
    yield from docs
  _report(files, text_field, tally)


def file_documents(path: str, text_field: str) -> Iterator[str]:
  """The documents of one file of a source (a Beam task's share)."""
  counts = wiki.new_counts()
  chunks = ([p] for p in _pieces([path], False, text_field,
                                 pieces_lib.PIECE_BYTES,
                                 pieces_lib.Position([path]), counts))
  yield from _expanded(chunks, [path], text_field)
  if counts['pages']:
    logging.info('Dump pages of %s: %s', path, counts)


class Documents:
  """The documents of a source: iterate as often as needed.

  `position` tracks the bytes of the source read by the latest iteration;
  `total_bytes` is the source's size on disk.
  """

  def __init__(self, source: str, cache_dir: str | None = None,
               one_doc_per_file: bool = False, text_field: str = 'text',
               workers: int = 1):
    self.files = resolve(source)
    check(self.files, text_field)
    self._one_doc_per_file = one_doc_per_file
    self._text_field = text_field
    self._workers = workers
    self._cache = None
    if cache_dir and any(map(wiki.is_dump, self.files)):
      self._cache = os.path.join(
          cache_dir,
          f'text-{fingerprint(source, one_doc_per_file, text_field)}')
    self.position = pieces_lib.Position(self.files)

  @property
  def total_bytes(self) -> int:
    return self.position.total

  def pieces(self, size: int = 0) -> Iterator[pieces_lib.Piece]:
    """The source cut into pieces of about `size` bytes (0: PIECE_BYTES),
    for workers to expand; no piece splits a document."""
    size = size or pieces_lib.PIECE_BYTES
    if self._cache is None:
      self.position.start(self.position.total)
      counts = wiki.new_counts()
      yield from _pieces(self.files, self._one_doc_per_file, self._text_field,
                         size, self.position, counts)
      if counts['pages']:
        logging.info('Dump pages of %s: %s', self.files, counts)
      return
    if not os.path.exists(os.path.join(self._cache, 'done.json')):
      self._write_cache()
    # Progress is then in bytes of the cache.
    self.position.start(sum(
        e.stat().st_size for e in os.scandir(self._cache)))
    with open(os.path.join(self._cache, 'done.json')) as f:
      done = json.load(f)
    for k in range(done['parts']):
      yield from pieces_lib.cache_pieces(
          os.path.join(self._cache, _part_name(k, done.get('cut', 1))), size,
          self.position)

  def chunks(self, size: int) -> Iterator[list[pieces_lib.Piece]]:
    """Consecutive pieces of about `size` bytes in all: a worker's task."""
    return pieces_lib.chunks(self.pieces(size), size)

  def report(self, tally: dict[str, list[int]]) -> None:
    """Logs once per file what `pieces_lib.expand` counted in its pieces."""
    _report(self.files, self._text_field, tally)

  def __iter__(self) -> Iterator[str]:
    n = 0
    for n, doc in enumerate(_expanded(([p] for p in self.pieces()),
                                      self.files, self._text_field), 1):
      yield doc
    if not n:
      raise ValueError(f'The corpus {self.files} holds no document.')

  def _write_cache(self) -> None:
    """Cleans the source into cache parts, in parallel; resumes a killed run.

    Each part is written under a temporary name then renamed, and done.json
    only after the last one, so a crash or a concurrent writer never leaves
    a truncated cache that would be read as complete; a rerun skips the parts
    already written.
    """
    cache = self._cache
    os.makedirs(cache, exist_ok=True)
    pos = pieces_lib.Position(self.files)
    counts, tally = wiki.new_counts(), {}
    items = _items(self.files, self._one_doc_per_file, self._text_field, pos,
                   counts)
    progress = parallel.Progress('Cleaning', pos)
    parts = 0
    with parallel.Pool(self._workers) as pool:
      tasks = ((_clean_part, (chunk, os.path.join(
          cache, _part_name(k, _CLEAN_CUT)))) for k, chunk in enumerate(
              pieces_lib.chunks(items, _CLEAN_CHUNK_CHARS)))
      for parts, (kept, chars, part_counts, part_tally) in enumerate(
          pool.ordered(tasks), 1):
        for k, v in part_counts.items():
          counts[k] += v
        pieces_lib.add_tally(tally, part_tally)
        progress.update(kept, chars)
    self.report(tally)
    counts.update(parts=parts, cut=_CLEAN_CUT)
    parallel.write_json_atomic(os.path.join(cache, 'done.json'), counts)
    current = {_part_name(k, _CLEAN_CUT) for k in range(parts)}
    for name in os.listdir(cache):  # parts of an older cut, never finished
      if name.startswith('part-') and name not in current:
        os.remove(os.path.join(cache, name))
    progress.finish()
    logging.info('Cached cleaned text of %s in %s: %s', self.files, cache,
                 counts)


def _part_name(k: int, cut: int) -> str:
  return f'part-{k:07d}.jsonl' if cut == 1 else f'part-c{cut}-{k:07d}.jsonl'


def _clean_part(items, path: str
                ) -> tuple[int, int, dict[str, int], dict[str, list[int]]]:
  """Worker: cleans one chunk into a part file (skipped if already there)."""
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      docs = [json.loads(line) for line in f]
    return len(docs), sum(map(len, docs)), {}, {}
  docs, counts, tally = _clean(items)
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      for doc in docs:
        f.write(json.dumps(doc) + '\n')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return len(docs), sum(map(len, docs)), counts, tally


def documents(source: str, cache_dir: str | None = None,
              one_doc_per_file: bool = False, text_field: str = 'text',
              workers: int = 1) -> Documents:
  """The documents of `source` (iterable, re-iterable, lazy).

  A bad source raises ValueError here, at the call; the reading is lazy.

  Args:
    source: 'demo', or comma-separated paths/globs/dataset directories.
    cache_dir: where to keep the cleaned text of sources with a Wikipedia
      dump, so the slow wikitext parse runs once for the tokenizer and the
      dataset builder. None parses every time.
    one_doc_per_file: text files are single documents (blank lines kept
      inside).
    text_field: the text field of JSON Lines records, the text column of
      Parquet files and datasets.
    workers: processes cleaning wikitext when the cache is built.
  """
  return Documents(source, cache_dir, one_doc_per_file, text_field, workers)
