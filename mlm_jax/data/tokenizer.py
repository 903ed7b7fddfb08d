"""Tokenizers: our SentencePiece unigram models, or a Hugging Face tokenizer.json.

Our own SentencePiece models put BERT's special tokens at fixed ids
(SPECIALS). Train one from a source:

  python -m mlm_jax.data.tokenizer --source=demo --vocab_size=8192 \
      --out=/tmp/sp.model

A Hugging Face `tokenizer.json` (e.g. an imported BERT's WordPiece, whose
[PAD] [UNK] [CLS] [SEP] [MASK] are 0 100 101 102 103) loads through the
`tokenizers` library into `HFTokenizer`, which has the same interface: the
trainer, packer and fill-mask read special ids from the instance. `load`
takes either kind.
"""

from collections.abc import Iterable
import io
import json
import os
import uuid

from absl import app
from absl import flags
from absl import logging
import numpy as np
import sentencepiece as spm

from mlm_jax.data import files

# The model, masking and packing code rely on these ids; load() checks them.
SPECIALS = {'[PAD]': 0, '[UNK]': 1, '[CLS]': 2, '[SEP]': 3, '[MASK]': 4}
SPECIAL_IDS = tuple(SPECIALS.values())
# SentencePiece trains on a sample of this many lines (paragraphs) of a big
# corpus: about 0.5 GB of Wikipedia text, a few GB of trainer memory.
MAX_TRAIN_LINES = 1_000_000
_SEED = 0
# The trained model depends on the thread count, so it is fixed rather than
# os.cpu_count(): every host and rerun must train the same model.
_THREADS = 16


class Tokenizer:
  """A SentencePiece processor with the BERT vocabulary conventions."""

  pad_id, unk_id, cls_id, sep_id, mask_id = SPECIALS.values()
  # load() and train() check that the model puts them at these ids.
  special_ids = tuple(SPECIALS.values())

  def __init__(self, processor: spm.SentencePieceProcessor):
    self.processor = processor

  @property
  def kind(self) -> str:
    return 'sentencepiece'

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  @property
  def model_bytes(self) -> bytes:
    return self.processor.serialized_model_proto()

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without [CLS]/[SEP]."""
    return self.processor.encode(text, out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    return self.processor.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self.processor.id_to_piece(int(i))

  def word_start_mask(self) -> np.ndarray:
    """[vocab_size] bool, True where a piece starts a word ('\u2581...').

    Whole-word masking masks a word start together with the pieces after it.
    """
    pieces = [self.processor.id_to_piece(i) for i in range(self.vocab_size)]
    mask = word_starts(pieces, 'sentencepiece')
    mask[list(self.special_ids)] = False
    return mask


# HF special tokens by role: BERT's names first, then RoBERTa-style ones.
_HF_ROLES = {
    'pad': ('[PAD]', '<pad>'), 'unk': ('[UNK]', '<unk>'),
    'cls': ('[CLS]', '<s>'), 'sep': ('[SEP]', '</s>'),
    'mask': ('[MASK]', '<mask>'),
}


class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer` with the interface of Tokenizer.

  encode() adds no [CLS]/[SEP] (the packer does) and never truncates;
  special_ids are the tokenizer's special added tokens.
  """

  def __init__(self, tokenizer, name: str = 'tokenizer.json'):
    tokenizer.no_truncation()
    tokenizer.no_padding()
    self.tokenizer = tokenizer
    ids = {}
    for role, names in _HF_ROLES.items():
      found = [tokenizer.token_to_id(n) for n in names]
      found = [i for i in found if i is not None]
      if not found:
        raise ValueError(f'{name} has no {role} token (looked for {names}); '
                         'mlm_jax needs [PAD] [UNK] [CLS] [SEP] [MASK].')
      ids[role] = found[0]
    self.pad_id, self.unk_id = ids['pad'], ids['unk']
    self.cls_id, self.sep_id, self.mask_id = ids['cls'], ids['sep'], ids['mask']
    added = tokenizer.get_added_tokens_decoder()
    self.special_ids = tuple(sorted(
        {i for i, t in added.items() if t.special} | set(ids.values())))

  @classmethod
  def load(cls, path: str) -> 'HFTokenizer':
    import tokenizers  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(path):
      raise ValueError(f'No tokenizer at {path!r}; fix data.tokenizer.')
    try:
      tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{path!r} is not a Hugging Face tokenizer.json '
                       f'({e}).') from e
    return cls(tok, path)

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def model_bytes(self) -> bytes:
    """The tokenizer's JSON: what packed datasets are keyed by."""
    return self.tokenizer.to_str().encode('utf-8')

  @property
  def kind(self) -> str:
    return 'hf'

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without [CLS]/[SEP]."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self.tokenizer.decode([int(i) for i in ids],
                                 skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self.tokenizer.id_to_token(int(i))

  def convention(self) -> str:
    """How pieces mark words: 'wordpiece' ('##' continues) or 'sentencepiece'."""
    model = json.loads(self.tokenizer.to_str())['model']
    if model['type'] == 'WordPiece':
      return 'wordpiece'
    pieces = [self.id_to_piece(i) for i in range(self.vocab_size)]
    if any(p and p.startswith('\u2581') for p in pieces):
      return 'sentencepiece'
    raise ValueError(f"Can't tell word starts of a {model['type']} tokenizer "
                     "without '\u2581' pieces; use mask.strategy='token'.")

  def word_start_mask(self) -> np.ndarray:
    """[vocab_size] bool, True where a piece starts a word."""
    pieces = [self.id_to_piece(i) or '' for i in range(self.vocab_size)]
    mask = word_starts(pieces, self.convention())
    mask[list(self.special_ids)] = False
    return mask


def word_starts(pieces, convention: str) -> np.ndarray:
  """[len(pieces)] bool: which pieces begin a word.

  SentencePiece marks a word start with a leading '\u2581'; WordPiece (BERT's
  HF tokenizers) marks a continuation with a leading '##'.
  """
  if convention == 'sentencepiece':
    return np.array([p.startswith('\u2581') for p in pieces], bool)
  if convention == 'wordpiece':
    return np.array([not p.startswith('##') for p in pieces], bool)
  raise ValueError(f"Unknown word convention {convention!r}; use "
                   "'sentencepiece' or 'wordpiece'.")


def _check(processor: spm.SentencePieceProcessor, where: str) -> None:
  got = {p: processor.piece_to_id(p) for p in SPECIALS}
  ids = (processor.pad_id(), processor.unk_id(), processor.bos_id(),
         processor.eos_id())
  if got != SPECIALS or ids != (0, 1, 2, 3):
    raise ValueError(
        f'{where} has special ids {got} (pad/unk/bos/eos={ids}); mlm_jax needs '
        f'{SPECIALS}. Train it with mlm_jax.data.tokenizer.train.')


def load(path: str) -> 'Tokenizer | HFTokenizer':
  """Loads and validates a SentencePiece model or an HF tokenizer.json.

  A directory holding a tokenizer.json (an HF model directory) also works.
  """
  if os.path.isdir(path) and os.path.isfile(os.path.join(path,
                                                        'tokenizer.json')):
    path = os.path.join(path, 'tokenizer.json')
  if path.endswith('.json'):
    return HFTokenizer.load(path)
  if not files.isfile(path):  # a local path or gs://
    raise ValueError(f'No tokenizer model at {path!r}; fix data.tokenizer or '
                     "set it to '' to train one from the source.")
  with files.open_binary(path) as f:
    proto = f.read()
  try:
    processor = spm.SentencePieceProcessor(model_proto=proto)
  except Exception as e:  # pylint: disable=broad-except
    # The SWIG layer raises bare RuntimeError/OSError with a terse message.
    raise ValueError(f'{path!r} is not a SentencePiece model ({e}).') from e
  _check(processor, path)
  return Tokenizer(processor)


def from_model_bytes(kind: str, model_bytes: bytes) -> 'Tokenizer | HFTokenizer':
  """The tokenizer whose `kind` and `model_bytes` these are (for workers)."""
  if kind == 'hf':
    import tokenizers  # pylint: disable=g-import-not-at-top
    return HFTokenizer(tokenizers.Tokenizer.from_str(model_bytes.decode()))
  return Tokenizer(spm.SentencePieceProcessor(model_proto=model_bytes))


def train(source_docs: Iterable[str], vocab_size: int,
          out_path: str) -> Tokenizer:
  """Trains a unigram model on the lines of `source_docs`, writes `out_path`."""

  def lines():
    for doc in source_docs:
      yield from filter(None, doc.splitlines())

  # The trainer's reservoir sampling of input lines draws from this seed.
  spm.set_random_generator_seed(_SEED)
  proto = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=proto,
        model_type='unigram', vocab_size=vocab_size,
        pad_id=0, pad_piece='[PAD]', unk_id=1, unk_piece='[UNK]',
        bos_id=2, bos_piece='[CLS]', eos_id=3, eos_piece='[SEP]',
        user_defined_symbols=['[MASK]'], byte_fallback=True,
        input_sentence_size=MAX_TRAIN_LINES, shuffle_input_sentence=True,
        max_sentence_length=1 << 14, num_threads=_THREADS,
        minloglevel=1)
  except RuntimeError as e:
    raise ValueError(f'SentencePiece training failed: {e}\nSet vocab_size '
                     '(data.vocab_size) to fit the corpus.') from e
  processor = spm.SentencePieceProcessor(model_proto=proto.getvalue())
  _check(processor, 'the trained model')
  # Write then rename: a crash or a concurrent trainer never leaves a
  # truncated model at out_path.
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tmp = f'{out_path}.tmp-{uuid.uuid4().hex}'
  with open(tmp, 'wb') as f:
    f.write(proto.getvalue())
  os.replace(tmp, out_path)
  logging.info('Wrote a %d-piece tokenizer to %s', vocab_size, out_path)
  return Tokenizer(processor)


def main(argv):
  del argv
  # Here, not at the top: build workers import this module to tokenize and
  # need no wikitext parser.
  from mlm_jax.data import sources  # pylint: disable=g-import-not-at-top
  args = flags.FLAGS
  tok = train(sources.documents(args.source), args.vocab_size, args.out)
  print(f'Wrote {args.out} (vocab_size={tok.vocab_size})')


if __name__ == '__main__':
  # Defined only when run as a tool: importing the module must not add
  # --source/--out to the trainer's flags.
  flags.DEFINE_string('source', 'demo', "'demo', a Wikipedia dump, or text "
                      'files/globs separated by commas.')
  flags.DEFINE_integer('vocab_size', 8192, 'Number of pieces.')
  flags.DEFINE_string('out', None, 'Where to write the .model file.',
                      required=True)
  app.run(main)
