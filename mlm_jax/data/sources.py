"""Text sources: the demo corpus, Wikipedia dumps, text and record files.

A source is a string: 'demo', or a comma-separated list of paths, globs and
Hugging Face `datasets` directories (saved with `save_to_disk`). Each file's
kind comes from its name:

- a name containing '.xml' is a Wikipedia pages-articles dump
  (`enwiki-...-pages-articles1.xml-p1p41242.bz2` keeps '.xml' mid-name);
- `.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.json.gz` (JSON Lines), `.parquet`,
  `.arrow`: one document per record, its text in `text_field`;
- anything else is UTF-8 text with documents separated by blank lines (BERT's
  convention), optionally `.gz`, `.bz2` or `.zst` compressed.

Every source yields documents as strings whose lines are paragraphs, with
runs of whitespace collapsed. Dumps are cleaned once, in parallel, into a
cache of cleaned text that the tokenizer and the builder then read. A build
reads the source as raw `pieces` that its workers decode into documents.
"""

from collections.abc import Iterator
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import uuid
import xml.etree.ElementTree as ET

from absl import logging
import mwparserfromhell
from mwparserfromhell import nodes

from mlm_jax.data import parallel
from mlm_jax.data import pieces as pieces_lib
from mlm_jax.data import records

DEMO = 'demo'
_DEMO_FILE = ('test/test_data/enwiki-latest-pages-articles1.xml-'
              'p000000010p000030302-shortened.bz2')
# Bump when the cleaning changes, so cached cleaned text and everything built
# from it is made again.
CLEAN_VERSION = 1
MIN_PAGE_CHARS = 200
# Wikitext per cleaning task: big enough that a worker's pickling and logging
# cost nothing, small enough that a killed build loses little.
_CLEAN_CHUNK_CHARS = 1 << 18

# Formatting tags whose contents are prose; every other tag (ref, table,
# math, gallery, ...) is dropped whole.
_KEEP_TAGS = frozenset(
    'b i u s em strong small big sub sup span abbr font center blockquote p '
    'poem dd dt li'.split())
_DROP_LINK_PREFIXES = frozenset(['file', 'image', 'media', 'category'])
# Interlanguage links ([[de:Foo]]) carry a language-code prefix and no text.
_LANG_PREFIX = re.compile(r'^([a-z]{2,3}(-[a-z]+)*|simple)$')
# Bold/italic quote runs, left as text by skip_style_tags below.
_QUOTES = re.compile("'{2,}")
_MAGIC_WORD = re.compile(r'__\w+__')


def _demo_path() -> str:
  # find_spec locates gensim without importing it (seconds of scipy imports).
  spec = importlib.util.find_spec('gensim')
  path = spec and os.path.join(spec.submodule_search_locations[0], _DEMO_FILE)
  if not path or not os.path.isfile(path):
    raise ValueError(f'The demo corpus {_DEMO_FILE} is missing: install gensim '
                     'from its wheel (pip install gensim).')
  return path


def _expand(part: str) -> list[str]:
  if glob.has_magic(part):
    matched = sorted(glob.glob(part))
    if not matched:
      raise ValueError(f'The glob {part!r} matches no file; fix the pattern '
                       "or the data.source setting (or use 'demo').")
  elif os.path.exists(part):
    matched = [part]
  else:
    raise ValueError(f'No such file: {part!r}; fix the path in data.source '
                     "(or use 'demo').")
  files = []
  for path in matched:
    if os.path.isdir(path):
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
    files += _expand(os.path.expanduser(part))
  if not files:
    raise ValueError(f'Empty data.source {source!r}: give "demo", a Wikipedia '
                     'dump, or text files/globs separated by commas.')
  empty = [f for f in files if os.path.getsize(f) == 0]
  if len(empty) == len(files):
    raise ValueError(f'The corpus {source!r} is empty: {files} hold no bytes.')
  if empty:
    logging.warning('Skipping %d empty file(s) of %s: %s', len(empty), source,
                    empty[:10])
  return [f for f in files if f not in set(empty)]


def is_dump(path: str) -> bool:
  return '.xml' in os.path.basename(path)


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
      st = os.stat(f)
      parts += [os.path.realpath(f), st.st_size, st.st_mtime_ns]
    if any(map(records.kind, files)):
      parts.append(text_field)
  parts += [CLEAN_VERSION, one_doc_per_file]
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def check(files: list[str], text_field: str) -> None:
  """Opens every file's first record: a bad shard fails before long work."""
  for path in files:
    if records.kind(path):
      records.check(path, text_field)
      continue
    head = _head(path)
    if is_dump(path) and b'<mediawiki' not in head:
      raise ValueError(f'{path} is named like a Wikipedia dump (.xml) but does '
                       'not start with <mediawiki>; rename it or fix '
                       'data.source.')


def _head(path: str, size: int = 1 << 16) -> bytes:
  try:
    with open(path, 'rb') as raw, records.open_binary(path, raw) as f:
      return f.read(size)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path} is corrupt or unreadable ({type(e).__name__}: '
                     f'{e}); re-download or remove it from data.source.') from e


def _strip(code) -> str:
  """Plain text of parsed wikitext: link text kept, markup and clutter gone."""
  out = []
  for node in code.nodes:
    if isinstance(node, nodes.Text):
      out.append(_QUOTES.sub('', node.value))
    elif isinstance(node, nodes.Wikilink):
      title = str(node.title).strip()
      prefix = title.split(':', 1)[0].strip().lower() if ':' in title else ''
      if prefix in _DROP_LINK_PREFIXES:
        continue
      if node.text is None and _LANG_PREFIX.match(prefix):
        continue
      out.append(_strip(node.text if node.text is not None else node.title))
    elif isinstance(node, nodes.ExternalLink):
      if node.title is not None:
        out.append(_strip(node.title))
    elif isinstance(node, nodes.Tag):
      if str(node.tag).strip().lower() in _KEEP_TAGS and node.contents:
        out.append(_strip(node.contents))
      elif node.wiki_markup in ('*', '#', ':', ';'):
        out.append('\n')  # A list item starts a line.
    elif isinstance(node, nodes.HTMLEntity):
      out.append(node.normalize())
    elif isinstance(node, nodes.Heading):
      out.append('\n')
    # Templates, comments, arguments: dropped.
  return ''.join(out)


def clean_wikitext(text: str) -> str:
  """Wiki markup to paragraphs of plain text, one per line."""
  # The parser's bold/italic handling misparses real pages (an unbalanced ''
  # inside a <ref> turns the rest of the page into raw text) and takes half
  # the time, so style tags are parsed as text and their quotes dropped.
  code = mwparserfromhell.parse(text, skip_style_tags=True)
  lines = (' '.join(line.split()) for line in _strip(code).splitlines())
  # '__NOTOC__'-style magic words are plain text to the parser.
  return '\n'.join(l for l in lines if l and not _MAGIC_WORD.fullmatch(l))


class Position:
  """Bytes of the source read so far, for progress and ETA."""

  def __init__(self, files: list[str]):
    self.start(sum(map(os.path.getsize, files)))

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
    self._raw = open(path, 'rb')
    return self._raw

  def close(self, path: str):
    self._done += os.path.getsize(path)
    self._raw = None


def _dump_pages(path: str, pos: Position, counts: dict[str, int]
                ) -> Iterator[tuple[str, str]]:
  """(title, wikitext) of the articles of a dump: no redirects, no talk."""
  raw = pos.open(path)
  pages = counts['pages']
  try:
    with raw, records.open_binary(path, raw) as f:
      root = None
      for event, elem in ET.iterparse(f, events=('start', 'end')):
        if root is None:
          root = elem
        if event != 'end' or not elem.tag.endswith('}page'):
          continue
        counts['pages'] += 1
        text = elem.findtext('{*}revision/{*}text') or ''
        article = (elem.findtext('{*}ns') == '0'
                   and elem.find('{*}redirect') is None)
        title = elem.findtext('{*}title')
        root.clear()  # Constant memory: drop every page already read.
        if article:
          yield title, text
        else:
          counts['skipped'] += 1
  except (OSError, EOFError, ET.ParseError) as e:
    raise pieces_lib.read_error(path, e) from e
  if counts['pages'] == pages:
    logging.warning('%s holds no MediaWiki <page>: is it a pages-articles '
                    'dump?', path)
  pos.close(path)


def _clean_page(title: str, text: str, counts: dict[str, int]) -> str | None:
  try:
    doc = clean_wikitext(text)
  except Exception as e:  # pylint: disable=broad-except
    # One malformed page must not stop a multi-hour parse.
    logging.warning('Skipping page %r: parse failed: %s', title, e)
    counts['failed'] += 1
    return None
  if len(doc) < MIN_PAGE_CHARS:
    counts['tiny'] += 1
    return None
  counts['kept'] += 1
  return doc


def _new_counts() -> dict[str, int]:
  return dict(pages=0, skipped=0, tiny=0, failed=0, kept=0)


def _pieces(files: list[str], one_doc_per_file: bool, text_field: str,
            size: int, pos: Position, counts: dict[str, int]
            ) -> Iterator[pieces_lib.Piece]:
  """The pieces of `files` (the documents of dumps cleaned here: only a
  source with no cache directory comes here with a dump)."""
  for path in files:
    if is_dump(path):
      docs = (_clean_page(title, text, counts)
              for title, text in _dump_pages(path, pos, counts))
      for chunk in parallel.chunks(filter(None, docs), size):
        yield pieces_lib.Piece('docs', path, chunk)
    elif records.kind(path):
      yield from pieces_lib.record_pieces(path, text_field, size, pos)
    else:
      yield from pieces_lib.text_pieces(path, one_doc_per_file, size, pos)


def _items(files: list[str], one_doc_per_file: bool, text_field: str,
           pos: Position, counts: dict[str, int]):
  """(title, wikitext) of dump pages, the pieces of the other files."""
  for path in files:
    if is_dump(path):
      yield from _dump_pages(path, pos, counts)
    else:
      yield from _pieces([path], one_doc_per_file, text_field,
                         _CLEAN_CHUNK_CHARS, pos, counts)


def _item_size(item) -> int:
  if isinstance(item, pieces_lib.Piece):
    return item.size()
  return len(item[0]) + len(item[1])


def _clean(items) -> tuple[list[str], dict, dict[str, list[int]]]:
  """Worker: cleaned pages and the documents of pieces, in order."""
  counts, tally = _new_counts(), {}
  docs = []
  for item in items:
    if isinstance(item, pieces_lib.Piece):
      piece_docs, piece_tally = pieces_lib.expand([item])
      docs += piece_docs
      pieces_lib.add_tally(tally, piece_tally)
      continue
    doc = _clean_page(*item, counts)
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
  counts = _new_counts()
  chunks = ([p] for p in _pieces([path], False, text_field,
                                 pieces_lib.PIECE_BYTES, Position([path]), counts))
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
    if cache_dir and any(map(is_dump, self.files)):
      self._cache = os.path.join(
          cache_dir,
          f'text-{fingerprint(source, one_doc_per_file, text_field)}')
    self.position = Position(self.files)

  @property
  def total_bytes(self) -> int:
    return self.position.total

  def pieces(self, size: int = 0) -> Iterator[pieces_lib.Piece]:
    """The source cut into pieces of about `size` bytes (0: PIECE_BYTES),
    for workers to expand; no piece splits a document."""
    size = size or pieces_lib.PIECE_BYTES
    if self._cache is None:
      self.position.start(self.position.total)
      counts = _new_counts()
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
      parts = json.load(f)['parts']
    for k in range(parts):
      yield from pieces_lib.cache_pieces(
          os.path.join(self._cache, _part_name(k)), size, self.position)

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
    pos = Position(self.files)
    counts, tally = _new_counts(), {}
    items = _items(self.files, self._one_doc_per_file, self._text_field, pos,
                   counts)
    progress = parallel.Progress('Cleaning', pos)
    parts = 0
    with parallel.Pool(self._workers) as pool:
      tasks = ((_clean_part, (chunk, os.path.join(cache, _part_name(k))))
               for k, chunk in enumerate(parallel.chunks(
                   items, _CLEAN_CHUNK_CHARS, size=_item_size)))
      for parts, (kept, chars, part_counts, part_tally) in enumerate(
          pool.ordered(tasks), 1):
        for k, v in part_counts.items():
          counts[k] += v
        pieces_lib.add_tally(tally, part_tally)
        progress.update(kept, chars)
    self.report(tally)
    counts.update(parts=parts)
    parallel.write_json_atomic(os.path.join(cache, 'done.json'), counts)
    progress.finish()
    logging.info('Cached cleaned text of %s in %s: %s', self.files, cache,
                 counts)


def _part_name(k: int) -> str:
  return f'part-{k:07d}.jsonl'


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
