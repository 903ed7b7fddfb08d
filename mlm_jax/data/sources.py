"""Text sources: the demo corpus, Wikipedia XML dumps and plain text files.

A source is a string: 'demo', or a comma-separated list of paths and globs.
A file whose name contains '.xml' is read as a Wikipedia pages-articles dump
(`enwiki-...-pages-articles1.xml-p1p41242.bz2` keeps '.xml' mid-name); any
other file is UTF-8 text with documents separated by blank lines (BERT's
convention). Every source yields documents as strings whose lines are
paragraphs.
"""

from collections.abc import Iterator
import bz2
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

DEMO = 'demo'
_DEMO_FILE = ('test/test_data/enwiki-latest-pages-articles1.xml-'
              'p000000010p000030302-shortened.bz2')
# Bump when the cleaning changes, so cached cleaned text and everything built
# from it is made again.
CLEAN_VERSION = 1
MIN_PAGE_CHARS = 200

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


def _demo_path() -> str:
  # find_spec locates gensim without importing it (seconds of scipy imports).
  spec = importlib.util.find_spec('gensim')
  path = spec and os.path.join(spec.submodule_search_locations[0], _DEMO_FILE)
  if not path or not os.path.isfile(path):
    raise ValueError(f'The demo corpus {_DEMO_FILE} is missing: install gensim '
                     'from its wheel (pip install gensim).')
  return path


def resolve(source: str) -> list[str]:
  """Returns the files of `source`; raises ValueError before any long work."""
  if source == DEMO:
    return [_demo_path()]
  files = []
  for part in filter(None, (p.strip() for p in source.split(','))):
    part = os.path.expanduser(part)
    if glob.has_magic(part):
      matched = sorted(p for p in glob.glob(part) if os.path.isfile(p))
      if not matched:
        raise ValueError(f'The glob {part!r} matches no file; fix the pattern '
                         "or the data.source setting (or use 'demo').")
      files += matched
    elif os.path.isfile(part):
      files.append(part)
    else:
      raise ValueError(f'No such file: {part!r}; fix the path in data.source '
                       "(or use 'demo').")
  if not files:
    raise ValueError(f'Empty data.source {source!r}: give "demo", a Wikipedia '
                     'dump, or text files/globs separated by commas.')
  if all(os.path.getsize(f) == 0 for f in files):
    raise ValueError(f'The corpus {source!r} is empty: {files} hold no bytes.')
  return files


def _is_dump(path: str) -> bool:
  return '.xml' in os.path.basename(path)


def fingerprint(source: str, one_doc_per_file: bool = False) -> str:
  """A short hash that changes whenever the documents of `source` may."""
  if source == DEMO:
    parts = ['demo', importlib.metadata.version('gensim'),
             os.path.getsize(_demo_path())]
  else:
    parts = []
    for f in resolve(source):
      st = os.stat(f)
      parts += [os.path.realpath(f), st.st_size, st.st_mtime_ns]
  parts += [CLEAN_VERSION, one_doc_per_file]
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


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
  return '\n'.join(l for l in lines if l and not re.fullmatch(r'__\w+__', l))


def _dump_documents(path: str) -> Iterator[str]:
  counts = dict(pages=0, skipped=0, tiny=0, failed=0, kept=0)
  opener = bz2.open if path.endswith('.bz2') else open
  with opener(path, 'rb') as f:
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
      if not article:
        counts['skipped'] += 1
        continue
      try:
        doc = clean_wikitext(text)
      except Exception as e:  # pylint: disable=broad-except
        # One malformed page must not stop a multi-hour parse.
        logging.warning('Skipping page %r: parse failed: %s', title, e)
        counts['failed'] += 1
        continue
      if len(doc) < MIN_PAGE_CHARS:
        counts['tiny'] += 1
        continue
      counts['kept'] += 1
      yield doc
  logging.info('Dump %s: %s', path, counts)


def _text_documents(path: str, one_doc_per_file: bool) -> Iterator[str]:
  bad = 0
  lines = []
  with open(path, 'rb') as f:
    for raw in f:
      line = raw.decode('utf-8', errors='replace')
      # A real U+FFFD in the file is not a decoding error.
      bad += line.count('\ufffd') - raw.count(b'\xef\xbf\xbd')
      line = ' '.join(line.split())
      if line:
        lines.append(line)
      elif lines and not one_doc_per_file:
        yield '\n'.join(lines)
        lines = []
  if lines:
    yield '\n'.join(lines)
  if bad:
    logging.warning('%s: %d invalid UTF-8 byte sequences replaced by U+FFFD.',
                    path, bad)


def _read(files: list[str], one_doc_per_file: bool) -> Iterator[str]:
  for path in files:
    if _is_dump(path):
      yield from _dump_documents(path)
    else:
      yield from _text_documents(path, one_doc_per_file)


def documents(source: str, cache_dir: str | None = None,
              one_doc_per_file: bool = False) -> Iterator[str]:
  """Returns an iterator over the documents of `source`.

  A bad source raises ValueError here, at the call; the reading is lazy.

  Args:
    source: 'demo', or comma-separated paths/globs.
    cache_dir: where to keep the cleaned text of sources with a Wikipedia
      dump, so the slow wikitext parse runs once for the tokenizer and the
      dataset builder. None parses every time.
    one_doc_per_file: text files are single documents (blank lines kept
      inside).
  """
  files = resolve(source)
  cache = None
  if cache_dir and any(map(_is_dump, files)):
    cache = os.path.join(
        cache_dir, f'text-{fingerprint(source, one_doc_per_file)}.jsonl')
  return _documents(files, one_doc_per_file, cache)


def _documents(files: list[str], one_doc_per_file: bool,
               cache: str | None) -> Iterator[str]:
  if cache is None:
    docs = _read(files, one_doc_per_file)
  else:
    if not os.path.exists(cache):
      _write_cache(_read(files, one_doc_per_file), cache)
    docs = _read_cache(cache)
  n = 0
  for n, doc in enumerate(docs, 1):
    yield doc
  if not n:
    raise ValueError(f'The corpus {files} holds no document.')


def _write_cache(docs: Iterator[str], path: str) -> None:
  # Write then rename: a crash or a concurrent writer never leaves a
  # truncated cache that would be read as complete.
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      for doc in docs:
        f.write(json.dumps(doc) + '\n')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  logging.info('Cached cleaned text in %s', path)


def _read_cache(path: str) -> Iterator[str]:
  with open(path, encoding='utf-8') as f:
    for line in f:
      yield json.loads(line)
