"""Wikipedia dumps: the articles of a pages-articles XML file, as clean text.

The main process only cuts a dump, with bytes searches (`dump_pieces`): a
dump in one bz2 stream into blocks of whole <page> elements (it reads at the
speed of bz2), a multistream dump (Wikimedia's `pages-articles-multistream`,
pbzip2's output) into spans of whole bz2 streams that it does not even
decompress. In worker processes, `piece_pages` gives a piece's articles (no
redirects, no talk or user pages) and `clean_wikitext` turns an article's
wiki markup into paragraphs of plain text, one per line (link text kept;
templates, references, tables and files dropped). `sources` caches the
result, so the slow parse runs once per dump.
"""

import bz2
from collections.abc import Iterator
import os
import re
import xml.etree.ElementTree as ET

from absl import logging
import mwparserfromhell
from mwparserfromhell import nodes

from mlm_jax.data import files as files_lib
from mlm_jax.data import pieces as pieces_lib
from mlm_jax.data import records

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
_MAGIC_WORD = re.compile(r'__\w+__')
# A page's start tag, and its end tag: what the main process cuts a dump at.
_PAGE = re.compile(rb'<page[\s>]')
_PAGE_END = b'</page>'
_PAGE_END_AT = re.compile(re.escape(_PAGE_END))
# A bz2 stream's header: 'BZh', the block size, the first block's magic. A
# stream starts at a byte boundary; inside compressed data these 10 bytes
# turn up about once per 2^80 positions.
_BZ2_STREAM = re.compile(rb'BZh[1-9]1AY&SY')
_SCAN_BYTES = 1 << 22
# bz2 packs a dump's XML about 3.6-4.5 to 1: a span of `size // 4` compressed
# bytes is a task of about `size` bytes of XML, like a block of pages.
_BZ2_RATIO = 4
_AHEAD_BYTES = 1 << 16


def is_dump(path: str) -> bool:
  return '.xml' in os.path.basename(path)


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


def page_blocks(path: str, size: int, pos: pieces_lib.Position
                ) -> Iterator[bytes]:
  """Main process: a dump's <page> elements in blocks of about `size` bytes.

  No XML parse here, only a bytes search: a block ends at the first
  `</page>` that starts `size` or more bytes into it, so the cut depends on
  the dump's bytes alone. The header before the first page and the closing
  `</mediawiki>` are left out; a worker parses a block (`block_pages`).
  """
  raw = pos.open(path)
  first, blocks, tail = True, 0, b''
  try:
    with raw, records.open_binary(path, raw) as f:
      for tail in pieces_lib.cut(f, size, _PAGE_END_AT, lead=b'<'):
        if first:  # the header (siteinfo) goes
          first = False
          start = _PAGE.search(tail)
          tail = tail[start.start():] if start else tail
        # A block ends at a `</page>`; the last one may hold several pages
        # and then `</mediawiki>`.
        end = tail.rfind(_PAGE_END)
        if end >= 0:
          end += len(_PAGE_END)
          blocks += 1
          yield tail[:end]
          tail = tail[end:]
  except (OSError, EOFError) as e:
    raise pieces_lib.read_error(path, e) from e
  if _PAGE.search(tail) or b'</mediawiki>' not in tail:
    raise pieces_lib.read_error(path, EOFError(
        'the dump ends inside a page, or before </mediawiki>'))
  if not blocks:
    logging.warning('%s holds no MediaWiki <page>: is it a pages-articles '
                    'dump?', path)
  pos.close(path)


def dump_pieces(path: str, size: int, pos: pieces_lib.Position
                ) -> Iterator[pieces_lib.Piece]:
  """Main process: a dump as 'xml' pieces of about `size` bytes of XML, for
  workers to parse (`piece_pages`): spans of whole bz2 streams of a
  multistream file (the workers decompress), else blocks of whole pages."""
  if is_multistream(path):
    for span in stream_spans(path, size // _BZ2_RATIO, pos):
      yield pieces_lib.Piece('xml', path, None, span=span)
  else:
    for block in page_blocks(path, size, pos):
      yield pieces_lib.Piece('xml', path, block)


def piece_pages(piece: pieces_lib.Piece, counts: dict[str, int]
                ) -> Iterator[tuple[str, str]]:
  """Worker: (title, wikitext) of the articles of a `dump_pieces` piece."""
  if piece.data is None:
    return span_pages(piece.path, piece.span, counts)
  return block_pages(piece.path, piece.data, counts)


def is_multistream(path: str) -> bool:
  """Whether `path` is a local bz2 file with several streams in its first
  4 MB: Wikimedia's `pages-articles-multistream` dumps (100 pages per stream)
  and pbzip2's output are; a plain bzip2 file is one stream."""
  if not path.endswith('.bz2') or files_lib.is_url(path):
    return False
  with open(path, 'rb') as f:
    head = f.read(_SCAN_BYTES)
  return head.startswith(b'BZh') and len(_BZ2_STREAM.findall(head)) >= 2


def stream_spans(path: str, size: int, pos: pieces_lib.Position
                 ) -> Iterator[tuple[int, int]]:
  """Main process: byte ranges of whole bz2 streams of a multistream file,
  `size` or more compressed bytes each (but the last), found by a bytes
  search for stream headers; nothing is decompressed here."""
  raw = pos.open(path)
  with raw:
    begin = 0
    for start in _stream_starts(raw):
      if start - begin >= size:
        yield begin, start
        begin = start
    yield begin, raw.tell()
  pos.close(path)


def _stream_starts(f) -> Iterator[int]:
  """Offsets of the stream headers of bz2 file `f` after the first."""
  keep = len(b'BZh91AY&SY') - 1  # a header may straddle two reads
  buf, offset = f.read(_SCAN_BYTES), 0
  while True:
    for m in _BZ2_STREAM.finditer(buf):
      if offset + m.start() > 0:
        yield offset + m.start()
    more = f.read(_SCAN_BYTES)
    if not more:
      return
    offset += len(buf) - keep
    buf = buf[-keep:] + more


def span_pages(path: str, span: tuple[int, int], counts: dict[str, int]
               ) -> Iterator[tuple[str, str]]:
  """Worker: the articles whose <page> tag starts in the streams of `span`.

  Reads on into the next streams only while the span's last page is
  unfinished or a tag is cut by its end: never in Wikimedia's dumps, whose
  streams hold whole pages; about one stream in a file cut anywhere.
  """
  start, end = span
  try:
    with files_lib.open_binary(path) as f:
      f.seek(start)
      data = _decompress(f.read(end - start))
      owned = len(data)  # a page is the span's if its tag starts before
      ahead = _decompressed(f)
      while _needs_more(data, owned) and (more := next(ahead, None)):
        data += more
  except (OSError, EOFError) as e:
    raise pieces_lib.read_error(path, e) from e
  starts = [m.start() for m in _PAGE.finditer(data) if m.start() < owned]
  if starts and data.find(_PAGE_END, starts[-1]) < 0:
    raise pieces_lib.read_error(path, EOFError('the dump ends inside a page'))
  # The last span: the dump ends with </mediawiki> (whose start may be in
  # the span before).
  tail = data.rstrip()
  if end == files_lib.size(path) and not (
      tail.endswith(b'</mediawiki>') or b'</mediawiki>'.endswith(tail)):
    raise pieces_lib.read_error(path, EOFError(
        'the dump ends before </mediawiki>'))
  if starts:
    close = data.find(_PAGE_END, starts[-1]) + len(_PAGE_END)
    yield from block_pages(path, data[starts[0]:close], counts)


def _needs_more(data: bytes, owned: int) -> bool:
  """Whether the span's pages need bytes past the end of its streams."""
  lt = data.rfind(b'<', max(owned - 5, 0), owned)
  if lt >= 0 and len(data) < lt + 6 and b'<page'.startswith(data[lt:lt + 5]):
    return True  # '<pa' at the end: maybe a page of ours, cut
  last = None
  for m in _PAGE.finditer(data):
    if m.start() >= owned:
      break
    last = m.start()
  return last is not None and data.find(_PAGE_END, last) < 0


def _decompress(data: bytes) -> bytes:
  """The bytes of whole bz2 streams."""
  out = []
  while data:
    d = bz2.BZ2Decompressor()
    out.append(d.decompress(data))
    if not d.eof:
      raise EOFError('a bz2 stream runs past its span: truncated, or not a '
                     'stream boundary')
    data = d.unused_data
  return b''.join(out)


def _decompressed(f) -> Iterator[bytes]:
  """The decompressed bytes of bz2 file `f` from where it is, stream after
  stream, a little at a time."""
  d = bz2.BZ2Decompressor()
  while chunk := f.read(_AHEAD_BYTES):
    while chunk:
      if out := d.decompress(chunk):
        yield out
      chunk = b''
      if d.eof:
        chunk, d = d.unused_data, bz2.BZ2Decompressor()


def block_pages(path: str, block: bytes, counts: dict[str, int]
                ) -> Iterator[tuple[str, str]]:
  """Worker: (title, wikitext) of a block's articles: no redirects, no talk."""
  try:
    pages = ET.fromstring(b'<pages>' + block + b'</pages>')
  except ET.ParseError as e:
    raise pieces_lib.read_error(path, e) from e
  for page in pages:
    counts['pages'] += 1
    if page.findtext('{*}ns') == '0' and page.find('{*}redirect') is None:
      yield (page.findtext('{*}title') or '',
             page.findtext('{*}revision/{*}text') or '')
    else:
      counts['skipped'] += 1


def clean_page(title: str, text: str, counts: dict[str, int]) -> str | None:
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


def new_counts() -> dict[str, int]:
  return dict(pages=0, skipped=0, tiny=0, failed=0, kept=0)
