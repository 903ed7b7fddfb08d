"""An HF tokenizer.json works wherever a SentencePiece model does."""
import os
import sys

import numpy as np
import pytest

from mlm_jax import data
from mlm_jax.data import pipeline
from mlm_jax.data import tokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
import hf_dirs  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import greedy_pack


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('hf_tok'))
  hf_dirs.tokenizer(d)
  return d


@pytest.fixture(scope='module')
def tok(hf_dir):
  return tokenizer.load(os.path.join(hf_dir, 'tokenizer.json'))


def test_bert_special_ids_come_from_the_file(tok, hf_dir):
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (
      0, 100, 101, 102, 103)
  assert tok.special_ids == (0, 100, 101, 102, 103)
  assert tok.vocab_size == len(hf_dirs.vocab())
  assert tok.kind == 'hf'
  # A directory with a tokenizer.json loads too.
  assert tokenizer.load(hf_dir).mask_id == 103


def test_encode_matches_transformers_without_specials(tok, hf_dir):
  import transformers  # pylint: disable=g-import-not-at-top
  hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
  text = 'The cats sat on the mat, and a dog barked.'
  ids = tok.encode(text)
  assert ids == hf(text, add_special_tokens=False)['input_ids']
  assert tok.cls_id not in ids and tok.sep_id not in ids
  assert tok.decode(tok.encode('the cat sat')) == 'the cat sat'
  assert tok.encode('the [MASK] sat') == [
      tok.encode('the')[0], 103, tok.encode('sat')[0]]


def test_long_text_is_not_truncated(tok):
  assert len(tok.encode('the cat ' * 2000)) == 4000


def test_wordpiece_word_starts(tok):
  mask = tok.word_start_mask()
  assert mask.shape == (tok.vocab_size,) and mask.dtype == bool
  assert not mask[list(tok.special_ids)].any()
  ids = tok.encode('cats')  # cat ##s
  assert [tok.id_to_piece(i) for i in ids] == ['cat', '##s']
  assert mask[ids[0]] and not mask[ids[1]]


def test_rejects_a_tokenizer_without_bert_specials(tmp_path):
  import tokenizers  # pylint: disable=g-import-not-at-top
  t = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {'a': 0, 'b': 1, '[UNK]': 2}, unk_token='[UNK]'))
  path = str(tmp_path / 'tokenizer.json')
  t.save(path)
  with pytest.raises(ValueError, match='no pad token'):
    tokenizer.load(path)
  (tmp_path / 'junk.json').write_text('{}')
  with pytest.raises(ValueError, match='not a Hugging Face tokenizer.json'):
    tokenizer.load(str(tmp_path / 'junk.json'))


def test_prepare_packs_with_the_hf_ids(tok, hf_dir, tmp_path, write_docs,
                                       make_config):
  words = hf_dirs.TEXT.split()
  docs = [' '.join(words[i:i + 7 + i % 5]) for i in range(40)]
  write_docs(tmp_path / 'docs.txt', docs)
  config = make_config(str(tmp_path / 'docs.txt'), str(tmp_path / 'dd'),
                       tokenizer=os.path.join(hf_dir, 'tokenizer.json'))
  prepared = data.prepare(config, 32)
  assert prepared.tokenizer.mask_id == 103
  rows = np.stack([prepared.train_source[i]['input_ids']
                   for i in range(len(prepared.train_source))])
  assert (rows[:, 0] == 101).all()  # [CLS]
  assert (rows == 102).sum() >= 30  # a [SEP] after every document
  assert not np.isin(rows, [1, 2, 3, 4]).any()  # never our SentencePiece ids
  ids, _ = next(greedy_pack.pack([[110, 111]], 6, tok.cls_id, tok.sep_id,
                             tok.pad_id))
  np.testing.assert_array_equal(ids, [101, 110, 111, 102, 0, 0])
  batch = next(pipeline.eval_batches(prepared.eval_source,
                                     len(prepared.eval_source) + 1, 0, 1,
                                     pad_id=tok.pad_id))
  assert (batch['input_ids'][-1] == tok.pad_id).all()
