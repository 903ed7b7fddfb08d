"""wiki: the main process cuts a dump by bytes, workers parse the blocks."""

import bz2
import logging
import xml.etree.ElementTree as ET

import pytest

from mlm_jax.data import pieces
from mlm_jax.data import wiki

_HEAD = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" '
         'version="0.10">\n  <siteinfo>\n    <sitename>Wikipedia</sitename>\n'
         '    <namespaces><namespace key="0" case="first-letter" />'
         '</namespaces>\n  </siteinfo>\n')


def _page(title, ns, text, redirect=False, space='\n  '):
  return (f'{space}<page>\n    <title>{title}</title>\n    <ns>{ns}</ns>'
          + ('<redirect title="X" />' if redirect else '')
          + f'\n    <revision><id>1</id><text xml:space="preserve">{text}'
          '</text></revision>\n  </page>')


# Escaped markup that looks like the cut's tags, entities, an empty text,
# a redirect, a talk page, attributes on <page>'s neighbours, no blank
# between two pages.
PAGES = [
    _page('A &amp; B', 0, 'x &lt;/page&gt; y &lt;page&gt; &amp;amp; ' * 30),
    _page('Redirect', 0, '#REDIRECT [[A]]', redirect=True),
    _page('Talk:A', 1, 'talk ' * 50),
    _page('Empty', 0, ''),
    _page('Caf\u00e9', 0, 'caf\u00e9 \u2028 text\n\nmore ' * 40, space=''),
    _page('Last', 0, '[[link]] text ' * 10),
]
DUMP = (_HEAD + ''.join(PAGES) + '\n</mediawiki>\n').encode()


class _Pos:
  def open(self, path):
    return open(path, 'rb')

  def close(self, path):
    pass


def _reference(data: bytes) -> list[tuple[str, str]]:
  """Articles as a full parse of the whole dump sees them."""
  root = ET.fromstring(data)
  return [(p.findtext('{*}title'), p.findtext('{*}revision/{*}text') or '')
          for p in root if p.tag.endswith('}page')
          and p.findtext('{*}ns') == '0'
          and p.find('{*}redirect') is None]


@pytest.mark.parametrize('size', [1, 7, 100, 700, 1 << 20])
def test_blocks_of_any_size_parse_to_the_whole_dumps_pages(tmp_path, size):
  path = tmp_path / 'x-pages-articles.xml.bz2'
  path.write_bytes(bz2.compress(DUMP))
  blocks = list(wiki.page_blocks(str(path), size, _Pos()))
  if size == 1:
    assert len(blocks) == len(PAGES)
  if size == 1 << 20:
    assert len(blocks) == 1
  counts = wiki.new_counts()
  pages = [p for b in blocks for p in wiki.block_pages(str(path), b, counts)]
  assert pages == _reference(DUMP)
  assert pages[0][0] == 'A & B' and '</page> y <page> &amp;' in pages[0][1]
  assert counts['pages'] == len(PAGES) and counts['skipped'] == 2
  # Nothing but whole pages: the header and </mediawiki> stay out.
  assert all(b.lstrip().startswith(b'<page>') and b.endswith(b'</page>')
             for b in blocks)


@pytest.mark.parametrize('cut', [
    len(DUMP) - 200,  # inside the last page
    DUMP.rindex(b'</page>') + len('</page>'),  # after it, no </mediawiki>
])
def test_a_truncated_dump_is_named(tmp_path, cut):
  path = tmp_path / 'x-pages-articles.xml.bz2'
  path.write_bytes(bz2.compress(DUMP[:cut]))
  with pytest.raises(ValueError, match=r'x-pages-articles\.xml\.bz2 is '
                     'corrupt or truncated.*ends inside a page'):
    list(wiki.page_blocks(str(path), 100, _Pos()))


def test_a_malformed_block_is_named_by_the_worker():
  with pytest.raises(ValueError, match=r'd\.xml is corrupt.*ParseError'):
    list(wiki.block_pages('d.xml', b'<page><title>x</page>',
                          wiki.new_counts()))


def test_a_dump_without_pages_warns(tmp_path, caplog):
  path = tmp_path / 'x-pages-articles.xml'
  path.write_bytes((_HEAD + '</mediawiki>\n').encode())
  with caplog.at_level(logging.WARNING):
    assert not list(wiki.page_blocks(str(path), 10, pieces.Position(
        [str(path)])))
  assert 'holds no MediaWiki <page>' in caplog.text


def _multistream(data: bytes, cuts) -> bytes:
  """`data` compressed as one bz2 stream per piece between `cuts`."""
  bounds = [0, *cuts, len(data)]
  return b''.join(bz2.compress(data[a:b]) for a, b in zip(bounds, bounds[1:])
                  if b > a)


def _wikimedia_cuts() -> list[int]:
  """Like Wikimedia's multistream dumps: the header, then two pages per
  stream, then </mediawiki>."""
  ends = [DUMP.index(b'<page>')]
  page_ends = [i + len(b'</page>') for i in range(len(DUMP))
               if DUMP.startswith(b'</page>', i)]
  return ends + page_ends[1::2]


def _span_pages(path, size):
  spans = list(wiki.stream_spans(str(path), size, _Pos()))
  assert spans[0][0] == 0 and spans[-1][1] == path.stat().st_size
  assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
  counts = wiki.new_counts()
  pages = [p for s in spans for p in wiki.span_pages(str(path), s, counts)]
  return spans, pages, counts


@pytest.mark.parametrize('size', [1, 150, 1 << 20])
@pytest.mark.parametrize('cut', ['wikimedia', 5, 37, 200])
def test_streams_cut_anywhere_give_the_whole_dumps_pages(tmp_path, cut, size):
  # Streams of whole pages (Wikimedia's), and streams cut every `cut`
  # bytes (pbzip2's: inside tags, '<pa|ge>', '</pag|e>', text): each page
  # comes once, from the span where its tag starts.
  cuts = (_wikimedia_cuts() if cut == 'wikimedia'
          else range(cut, len(DUMP), cut))
  path = tmp_path / 'x-pages-articles-multistream.xml.bz2'
  path.write_bytes(_multistream(DUMP, cuts))
  assert wiki.is_multistream(str(path))
  spans, pages, counts = _span_pages(path, size)
  assert pages == _reference(DUMP)
  assert counts['pages'] == len(PAGES) and counts['skipped'] == 2
  if size == 1:
    assert len(spans) == len(list(cuts)) + 1  # one stream each


def test_only_a_local_bz2_of_several_streams_is_multistream(tmp_path):
  one = tmp_path / 'a-pages-articles.xml.bz2'
  one.write_bytes(bz2.compress(DUMP))
  plain = tmp_path / 'b-pages-articles.xml'
  plain.write_bytes(DUMP)
  assert not wiki.is_multistream(str(one))
  assert not wiki.is_multistream(str(plain))


@pytest.mark.parametrize('damage', ['no_footer', 'cut_stream', 'cut_page'])
def test_a_truncated_multistream_dump_is_named(tmp_path, damage):
  cuts = _wikimedia_cuts()
  path = tmp_path / 'x-pages-articles-multistream.xml.bz2'
  data = _multistream(DUMP, cuts)
  if damage == 'no_footer':  # the last stream (</mediawiki>) is gone
    data = _multistream(DUMP[:cuts[-1]], cuts[:-1])
  elif damage == 'cut_stream':
    data = data[:-20]
  else:  # a stream boundary inside the last page, and nothing after it
    data = _multistream(DUMP[:len(DUMP) - 30], cuts)
  path.write_bytes(data)
  with pytest.raises(ValueError, match=r'multistream\.xml\.bz2 is corrupt '
                     'or truncated'):
    _span_pages(path, 100)
