"""TFDS builder: tokenized documents packed into fixed-length rows.

A row of length L is `[CLS] a a a [SEP] b b [SEP] c c c ...`: documents are
packed greedily in corpus order, a long document continues in the next row,
and only the split's last row is padded. segment_ids number the document
pieces of a row 1, 2, 3, ... ([CLS] is in segment 1) and are 0 on [PAD], so
attention can stay inside a piece. The 'validation' split holds out whole
documents, chosen by a hash of their text.

The config name is a hash of everything the rows depend on, so a changed
source, tokenizer or setting builds into a new directory and an unchanged one
is reused. TFDS writes into an `incomplete.*` sibling directory and renames it
only when done, so a crashed build is never taken for a finished one.
"""

from collections.abc import Callable, Iterable, Iterator
import hashlib
import json

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from mlm_jax.data import tokenizer as tokenizer_lib

# Bump when the row layout changes.
PACKING_VERSION = 1


def _doc_hash(doc: str) -> float:
  """A stable number in [0, 1) per document text."""
  digest = hashlib.sha256(doc.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64


def pack(token_lists: Iterable[list[int]], seq_len: int,
         cls_id: int, sep_id: int, pad_id: int
         ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Greedy packing of documents into rows; yields (input_ids, segment_ids)."""
  ids, segs, n = [cls_id], [1], 0
  for tokens in token_lists:
    tokens = tokens + [sep_id]
    while tokens:
      if len(ids) == seq_len:
        yield np.array(ids, np.int32), np.array(segs, np.int32)
        ids, segs, n = [cls_id], [1], 0
      take, tokens = tokens[:seq_len - len(ids)], tokens[seq_len - len(ids):]
      n += 1
      ids += take
      segs += [n] * len(take)
  if n:
    pad = seq_len - len(ids)
    yield (np.array(ids + [pad_id] * pad, np.int32),
           np.array(segs + [0] * pad, np.int32))


class PackedMLM(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Packed token rows for masked-language-model pretraining."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, data_dir: str, documents: Callable[[], Iterable[str]],
               source_fingerprint: str, tokenizer: tokenizer_lib.Tokenizer,
               seq_len: int, eval_fraction: float):
    """Describes one build; nothing is read until download_and_prepare().

    Args:
      data_dir: TFDS data dir; the rows go to packed_mlm/<config>/1.0.0.
      documents: returns a fresh iterator over the source's documents; called
        only when the dataset is built.
      source_fingerprint: sources.fingerprint of the source.
      tokenizer: the tokenizer the rows are made with.
      seq_len: row length L.
      eval_fraction: fraction of documents held out for 'validation'.
    """
    if seq_len < 2:
      raise ValueError(f'seq_len must be at least 2, got {seq_len}.')
    self._documents = documents
    self._tokenizer = tokenizer
    self._seq_len = seq_len
    self._eval_fraction = eval_fraction
    key = json.dumps([
        source_fingerprint,
        hashlib.sha256(tokenizer.model_bytes).hexdigest(),
        seq_len, eval_fraction, PACKING_VERSION])
    name = f'L{seq_len}_{hashlib.sha256(key.encode()).hexdigest()[:16]}'
    config = tfds.core.BuilderConfig(name=name, description=key)
    super().__init__(data_dir=data_dir, config=config,
                     file_format='array_record')

  def _info(self) -> tfds.core.DatasetInfo:
    row = tfds.features.Tensor(shape=(self._seq_len,), dtype=np.int32)
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
            {'input_ids': row, 'segment_ids': row}),
        metadata=tfds.core.MetadataDict(),
        # Rows stay in corpus order; the loader shuffles globally.
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    # A small corpus may have no document under eval_fraction: then the
    # lowest-hashed document alone is held out, so validation is never empty.
    lowest = min(map(_doc_hash, self._documents()))
    def is_eval(doc):
      h = _doc_hash(doc)
      return h < self._eval_fraction or h == lowest
    return {'train': self._generate_examples('train', lambda d: not is_eval(d)),
            'validation': self._generate_examples('validation', is_eval)}

  def _generate_examples(self, split: str, keep: Callable[[str], bool]):
    tok = self._tokenizer
    counts = dict(documents=0, rows=0, tokens=0, padding=0)

    def token_lists():
      for doc in filter(keep, self._documents()):
        tokens = tok.encode(doc)
        if tokens:
          counts['documents'] += 1
          counts['tokens'] += len(tokens)
          yield tokens

    for i, (ids, segs) in enumerate(pack(
        token_lists(), self._seq_len, tok.cls_id, tok.sep_id, tok.pad_id)):
      counts['rows'] += 1
      counts['padding'] += int(np.sum(segs == 0))
      yield i, {'input_ids': ids, 'segment_ids': segs}
    if not counts['rows']:
      raise ValueError(f'The {split} split would be empty: the corpus has too '
                       'few documents (add text or change eval_fraction).')
    counts['padding_fraction'] = counts['padding'] / (
        counts['rows'] * self._seq_len)
    # Saved next to the rows (metadata.json): a reused build reports them too.
    self.info.metadata[split] = counts
    logging.info('Split %s: %s', split, counts)
