"""SentencePiece unigram tokenizer with BERT's special tokens at fixed ids.

Train one from a source:

  python -m mlm_jax.data.tokenizer --source=demo --vocab_size=8192 \
      --out=/tmp/sp.model
"""

from collections.abc import Iterable
import io
import os
import uuid

from absl import app
from absl import flags
from absl import logging
import numpy as np
import sentencepiece as spm

from mlm_jax.data import sources

# The model, masking and packing code rely on these ids; load() checks them.
SPECIALS = {'[PAD]': 0, '[UNK]': 1, '[CLS]': 2, '[SEP]': 3, '[MASK]': 4}
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


def load(path: str) -> Tokenizer:
  """Loads and validates a SentencePiece model file."""
  if not os.path.isfile(path):
    raise ValueError(f'No tokenizer model at {path!r}; fix data.tokenizer or '
                     "set it to '' to train one from the source.")
  with open(path, 'rb') as f:
    proto = f.read()
  try:
    processor = spm.SentencePieceProcessor(model_proto=proto)
  except Exception as e:  # pylint: disable=broad-except
    # The SWIG layer raises bare RuntimeError/OSError with a terse message.
    raise ValueError(f'{path!r} is not a SentencePiece model ({e}).') from e
  _check(processor, path)
  return Tokenizer(processor)


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
