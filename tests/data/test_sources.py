import bz2
import logging
import os

import pytest

from mlm_jax.data import sources
from mlm_jax.data import wiki

_MARKUP = ('{{', '}}', '[[', ']]', '<ref', '{|', '|}', "''", '<!--')


def test_demo_is_many_clean_articles():
  docs = list(sources.documents('demo'))
  assert len(docs) > 80
  assert all(len(d) >= wiki.MIN_PAGE_CHARS for d in docs)
  for marker in _MARKUP:
    assert not [d[:80] for d in docs if marker in d], marker
  assert docs[0].startswith('Anarchism is a political philosophy')


def test_clean_wikitext_keeps_prose_only():
  text = ("'''Foo''' is a [[bar|Bar thing]] and [[baz]].{{cite|x=1}}"
          '<ref>A ref.</ref> <!-- hidden -->\n'
          '== History ==\n'
          '{| class="wikitable"\n| cell || cell\n|}\n'
          '* An [http://x.org external] item &amp; more.\n'
          '[[File:x.jpg|thumb|A caption [[y]]]]\n'
          '[[Category:Things]]\n[[de:Foo]]')
  assert wiki.clean_wikitext(text) == (
      'Foo is a Bar thing and baz.\nAn external item & more.')


def _page(title, ns, text, redirect=False):
  return (f'<page><title>{title}</title><ns>{ns}</ns>'
          + ('<redirect title="X" />' if redirect else '')
          + f'<revision><text>{text}</text></revision></page>')


def test_dump_keeps_articles_and_caches(tmp_path, monkeypatch):
  body = 'Some [[article]] text. ' * 20
  xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
         + _page('A', 0, body) + _page('R', 0, '#REDIRECT [[A]]', True)
         + _page('W', 4, body) + _page('Tiny', 0, 'Too short.')
         + _page('B', 0, 'Other ' + body) + '</mediawiki>')
  path = tmp_path / 'wiki-pages-articles.xml.bz2'
  path.write_bytes(bz2.compress(xml.encode()))
  cache = tmp_path / 'cache'
  docs = list(sources.documents(str(path), cache_dir=str(cache)))
  clean = body.replace('[[article]]', 'article').strip()
  assert docs == [clean, 'Other ' + clean]
  assert len(os.listdir(cache)) == 1  # the temporary file was renamed
  # The second read comes from the cache: the dump is not parsed again.
  def no_parse(*args):
    raise AssertionError('the dump was parsed again')
  monkeypatch.setattr(wiki, 'page_blocks', no_parse)
  assert list(sources.documents(str(path), cache_dir=str(cache))) == docs


def test_text_files_blank_line_documents(tmp_path):
  (tmp_path / 'a.txt').write_text('One  a.\nOne b.\n\n\n Two.\n')
  (tmp_path / 'b.txt').write_text('Three.\n')
  source = f'{tmp_path}/a.txt, {tmp_path}/b*'
  assert list(sources.documents(source)) == ['One a.\nOne b.', 'Two.',
                                             'Three.']
  assert list(sources.documents(source, one_doc_per_file=True)) == [
      'One a.\nOne b.\nTwo.', 'Three.']


def test_invalid_utf8_is_replaced_and_counted(tmp_path, caplog):
  (tmp_path / 'bad.txt').write_bytes(
      b'caf\xc3\xa9 \xff\xfe ok \xef\xbf\xbd\n')  # 2 bad bytes, 1 real U+FFFD
  with caplog.at_level(logging.WARNING):
    docs = list(sources.documents(str(tmp_path / 'bad.txt')))
  assert docs == ['caf\u00e9 \ufffd\ufffd ok \ufffd']
  assert '2 invalid UTF-8' in caplog.text


@pytest.mark.parametrize('source, match', [
    ('/no/such/file.txt', "No such file: '/no/such/file.txt'"),
    ('/no/such/dir/*.txt', "glob '/no/such/dir/\\*.txt' matches no file"),
    (' , ', 'Empty data.source'),
])
def test_bad_source_fails_fast(source, match):
  with pytest.raises(ValueError, match=match):
    sources.fingerprint(source)
  with pytest.raises(ValueError, match=match):
    sources.documents(source)  # at the call, before any reading


def test_empty_corpus(tmp_path):
  (tmp_path / 'empty.txt').write_text('')
  with pytest.raises(ValueError, match='is empty'):
    sources.resolve(str(tmp_path / 'empty.txt'))
  (tmp_path / 'blank.txt').write_text('\n \n')
  with pytest.raises(ValueError, match='holds no document'):
    list(sources.documents(str(tmp_path / 'blank.txt')))


def test_fingerprint_follows_the_files(tmp_path):
  path = tmp_path / 'a.txt'
  path.write_text('Hello.\n')
  before = sources.fingerprint(str(path))
  assert sources.fingerprint(str(path)) == before
  path.write_text('Hello, world.\n')
  assert sources.fingerprint(str(path)) != before
  assert sources.fingerprint('demo') == sources.fingerprint('demo')


def test_caches_of_the_old_cut_finished_are_read_unfinished_are_redone(
    tmp_path):
  body = 'Some [[article]] text. ' * 20
  xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
         + _page('A', 0, body) + '</mediawiki>')
  path = tmp_path / 'wiki-pages-articles.xml.bz2'
  path.write_bytes(bz2.compress(xml.encode()))
  cache = tmp_path / 'cache'
  clean = body.replace('[[article]]', 'article').strip()
  assert list(sources.documents(str(path), cache_dir=str(cache))) == [clean]
  (text,) = cache.iterdir()
  assert sorted(os.listdir(text)) == ['done.json', 'part-c2-0000000.jsonl']
  # An unfinished cache of the first cut (parts cut by page text, named
  # part-NNNNNNN): its parts are not resumed but redone, then removed.
  for name in os.listdir(text):
    os.remove(text / name)
  (text / 'part-0000000.jsonl').write_text('"stale"\n')
  assert list(sources.documents(str(path), cache_dir=str(cache))) == [clean]
  assert sorted(os.listdir(text)) == ['done.json', 'part-c2-0000000.jsonl']
  # A finished cache of the first cut is still read (its rows are the same).
  for name in os.listdir(text):
    os.remove(text / name)
  (text / 'part-0000000.jsonl').write_text('"kept"\n')
  (text / 'done.json').write_text('{"pages": 1, "parts": 1}')
  assert list(sources.documents(str(path), cache_dir=str(cache))) == ['kept']
