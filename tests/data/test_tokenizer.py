import pytest
import sentencepiece as spm

from mlm_jax.data import tokenizer


@pytest.fixture(scope='module')
def tok(prepared):
  return prepared.tokenizer


def test_special_ids_are_fixed(tok):
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (
      0, 1, 2, 3, 4)
  assert tok.special_ids == (0, 1, 2, 3, 4)
  assert [tok.id_to_piece(i) for i in tok.special_ids] == [
      '[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  assert tok.vocab_size == 320


def test_mask_text_encodes_to_mask_id(tok):
  assert tok.encode('[MASK]')[-1] == 4
  ids = tok.encode('Kalo [MASK] mine.')
  assert ids.count(4) == 1
  assert tok.decode(ids) == 'Kalo [MASK] mine.'


def test_round_trip_with_byte_fallback(tok):
  text = 'Kalomi ne, zürich 東京!'  # characters the corpus never had
  ids = tok.encode(text)
  assert tok.unk_id not in ids
  assert tok.decode(ids) == text
  assert tok.cls_id not in ids and tok.sep_id not in ids


def test_word_start_mask(tok):
  mask = tok.word_start_mask()
  assert mask.shape == (tok.vocab_size,) and mask.dtype == bool
  assert not mask[list(tok.special_ids)].any()
  ids = tok.encode('kalo mine')
  assert mask[ids[0]]
  for i in range(tok.vocab_size):
    assert mask[i] == (i > 4 and tok.id_to_piece(i).startswith('\u2581'))


def test_training_is_deterministic(corpus, tmp_path):
  paths = [tmp_path / 'a.model', tmp_path / 'b.model']
  for path in paths:
    tokenizer.train(corpus[1], 300, str(path))
  assert paths[0].read_bytes() == paths[1].read_bytes()
  assert tokenizer.load(str(paths[0])).vocab_size == 300


def test_load_rejects_bad_files(corpus, tmp_path):
  with pytest.raises(ValueError, match='No tokenizer model at'):
    tokenizer.load(str(tmp_path / 'missing.model'))
  (tmp_path / 'junk.model').write_bytes(b'not a model')
  with pytest.raises(ValueError, match='is not a SentencePiece model'):
    tokenizer.load(str(tmp_path / 'junk.model'))
  # A valid model with SentencePiece's default ids (<unk>=0, <s>=1, </s>=2).
  prefix = str(tmp_path / 'default')
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus[1]), model_prefix=prefix, vocab_size=100,
      minloglevel=2)
  with pytest.raises(ValueError, match='special ids'):
    tokenizer.load(prefix + '.model')

