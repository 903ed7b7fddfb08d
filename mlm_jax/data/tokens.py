"""The two stages of a local build, as worker functions.

1. `encode_chunk`: a chunk of source pieces (`pieces`) -> its documents,
   their token ids, document lengths
   and document hashes, in `chunk-NNNNNNN.npz` (written under a temporary name
   then renamed: a finished chunk survives a kill, and a rerun skips it).
2. `write_shard`: rows [a, b) of a split -> one array_record shard, made
   from the chunks that cover those rows (`packing` makes any row from its
   offset in the split's token stream).

`plan` turns the per-chunk statistics into the per-split streams, row
counts and shard ranges; it sees every chunk, so the held-out lowest-hashed
document (validation is never empty) is chosen exactly as a serial pass
would choose it.
"""

from collections.abc import Iterator
import dataclasses
import itertools
import json
import os
import uuid

import numpy as np

from mlm_jax.data import packing
from mlm_jax.data import pieces as pieces_lib
from mlm_jax.data import tokenizer as tokenizer_lib

SPLITS = ('train', 'validation')
# Tokens per shard (about 50 MB of rows at L=128), at most; a split has at
# least one shard per worker once it has enough rows to be worth splitting,
# and past that a multiple of the worker count. A shard's writer keeps about
# 60 bytes per row until it closes, so this also caps a worker's memory.
_SHARD_TOKENS = 1 << 24
_MIN_SHARD_ROWS = 1 << 12
# Rows serialized at a time inside a shard: bounds a worker's memory.
_BLOCK_ROWS = 1 << 11
# One record per chunk (random access), snappy-compressed: on packed rows it
# writes 3.6x faster than array_record's default zstd for 2.5% more bytes,
# and reads faster too (BENCHMARKS.md, data builds, 2026-12-07).
_WRITER_OPTIONS = 'group_size:1,snappy'

_tokenizer = None


def init_worker(kind: str, model_bytes: bytes) -> None:
  global _tokenizer
  _tokenizer = tokenizer_lib.from_model_bytes(kind, model_bytes)


@dataclasses.dataclass
class ChunkStats:
  """What planning needs of one chunk; documents that encode to nothing are
  dropped from the stream (as a serial pass drops them)."""
  path: str
  documents: int  # all documents, empty or not
  chars: int
  min_hash: float
  # Per split (by hash < eval_fraction), and for the documents whose hash is
  # min_hash: non-empty documents, their tokens, their stream length.
  counts: dict[str, tuple[int, int, int]]
  at_min: tuple[int, int, int]
  # pieces.expand's per-file counts, for the main process to log.
  tally: dict[str, list[int]] = dataclasses.field(default_factory=dict)


def _counts(lengths: np.ndarray) -> tuple[int, int, int]:
  nonempty = lengths > 0
  tokens = int(lengths.sum())
  return int(nonempty.sum()), tokens, tokens + int(nonempty.sum())


def chunk_stats(path, lengths: np.ndarray, hashes: np.ndarray, chars: int,
                eval_fraction: float, tally=None) -> ChunkStats:
  """Statistics of a chunk; `path` names it (a file, or a Beam key)."""
  held_out = hashes < eval_fraction
  min_hash = float(hashes.min()) if len(hashes) else 2.0
  return ChunkStats(
      path=path, documents=len(lengths), chars=chars, min_hash=min_hash,
      counts={'train': _counts(lengths[~held_out]),
              'validation': _counts(lengths[held_out])},
      at_min=_counts(lengths[hashes == min_hash]), tally=tally or {})


def _token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 1 << 16 else np.int32


def encode_chunk(chunk: list[pieces_lib.Piece] | None, path: str,
                 eval_fraction: float) -> ChunkStats:
  """Worker: tokenizes one chunk into `path`; reads it back if it is there."""
  if chunk is None:
    with np.load(path) as z:
      return chunk_stats(path, z['lengths'], z['hashes'], int(z['chars']),
                         eval_fraction, json.loads(str(z['tally'])))
  docs, tally = pieces_lib.expand(chunk)
  encoded = [_tokenizer.encode(d) for d in docs]
  lengths = np.array([len(t) for t in encoded], np.int32)
  hashes = np.array([packing.doc_hash(d) for d in docs], np.float64)
  tokens = np.fromiter(itertools.chain.from_iterable(encoded),
                       _token_dtype(_tokenizer.vocab_size), int(lengths.sum()))
  chars = sum(map(len, docs))
  tmp = f'{path}.tmp-{uuid.uuid4().hex}.npz'
  try:
    np.savez(tmp, tokens=tokens, lengths=lengths, hashes=hashes, chars=chars,
             tally=json.dumps(tally))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return chunk_stats(path, lengths, hashes, chars, eval_fraction, tally)


@dataclasses.dataclass
class SplitPlan:
  documents: int
  tokens: int
  stream: int  # tokens + one [SEP] per document
  rows: int
  # (first row, end row, [(chunk path, its stream start, its stream length)])
  shards: list[tuple[int, int, list[tuple[str, int, int]]]]

  def metadata(self, seq_len: int) -> dict:
    padding = self.rows * seq_len - self.rows - self.stream
    return dict(documents=self.documents, rows=self.rows, tokens=self.tokens,
                padding=padding,
                padding_fraction=padding / max(self.rows * seq_len, 1))


def lowest_hash(chunks: list[ChunkStats]) -> float:
  return min(c.min_hash for c in chunks)


def plan(chunks: list[ChunkStats], eval_fraction: float, seq_len: int,
         workers: int) -> dict[str, SplitPlan]:
  """Per split: totals, row count and the shards' rows and chunks."""
  lowest = lowest_hash(chunks)
  plans = {}
  for split in SPLITS:
    spans, documents, tokens, start = [], 0, 0, 0
    for c in chunks:
      d, t, s = c.counts[split]
      if c.min_hash == lowest and lowest >= eval_fraction:
        # The lowest-hashed documents move from train to validation.
        sign = 1 if split == 'validation' else -1
        d, t, s = (x + sign * m for x, m in zip((d, t, s), c.at_min))
      spans.append((c.path, start, s))
      documents, tokens, start = documents + d, tokens + t, start + s
    rows = -(-start // (seq_len - 1))
    n = max(-(-rows * seq_len // _SHARD_TOKENS),
            min(workers, -(-rows // _MIN_SHARD_ROWS)), 1)
    if n > workers:  # whole rounds of shards: no worker idles at the end
      n = -(-n // workers) * workers
    bounds = [rows * i // n for i in range(n + 1)]
    shards = []
    for a, b in zip(bounds, bounds[1:]):
      lo, hi = a * (seq_len - 1), b * (seq_len - 1)
      shards.append((a, b, [sp for sp in spans
                            if sp[2] and sp[1] < hi and sp[1] + sp[2] > lo]))
    plans[split] = SplitPlan(documents, tokens, start, rows, shards)
  return plans


def _pieces(split: str, spans, lo: int, hi: int, eval_fraction: float,
            lowest: float, sep_id: int) -> Iterator[tuple[np.ndarray,
                                                          np.ndarray]]:
  """The split's stream in [lo, hi), chunk by chunk."""
  for path, start, length in spans:
    with np.load(path) as z:
      held_out = packing.is_eval(z['hashes'], eval_fraction, lowest)
      keep = held_out if split == 'validation' else ~held_out
      ids, ends = packing.stream(z['tokens'], z['lengths'], keep, sep_id)
    assert len(ids) == length, (path, len(ids), length)
    a, b = max(lo - start, 0), min(hi - start, length)
    yield ids[a:b], ends[a:b]


def write_shard(split: str, first_row: int, end_row: int, spans, path: str,
                seq_len: int, eval_fraction: float, lowest: float,
                fast_serializer: bool) -> tuple[int, int]:
  """Worker: rows [first_row, end_row) of `split` into an array_record file."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  tok = _tokenizer
  body = seq_len - 1
  serialize = packing.Serializer() if fast_serializer else _tfds_serializer(
      seq_len)
  writer = array_record_module.ArrayRecordWriter(path, _WRITER_OPTIONS)
  rows = num_bytes = 0

  def emit(ids, ends):
    nonlocal rows, num_bytes
    ids_RxL, segs_RxL = packing.rows(ids, ends, seq_len, tok.cls_id,
                                     tok.pad_id)
    for record in serialize(ids_RxL, segs_RxL):
      writer.write(record)
      num_bytes += len(record)
    rows += len(ids_RxL)

  carry_ids, carry_ends = np.zeros(0, np.int32), np.zeros(0, bool)
  for ids, ends in _pieces(split, spans, first_row * body, end_row * body,
                           eval_fraction, lowest, tok.sep_id):
    carry_ids = np.concatenate([carry_ids, ids])
    carry_ends = np.concatenate([carry_ends, ends])
    while len(carry_ids) >= _BLOCK_ROWS * body:
      n = _BLOCK_ROWS * body
      emit(carry_ids[:n], carry_ends[:n])
      carry_ids, carry_ends = carry_ids[n:], carry_ends[n:]
  full = len(carry_ids) // body * body
  if full:
    emit(carry_ids[:full], carry_ends[:full])
  if len(carry_ids) > full:  # the split's last, padded row
    emit(carry_ids[full:], carry_ends[full:])
  writer.close()
  assert rows == end_row - first_row, (path, rows, first_row, end_row)
  return rows, num_bytes


def _tfds_serializer(seq_len: int):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  row = tfds.features.Tensor(shape=(seq_len,), dtype=np.int32)
  return packing.tfds_serializer(tfds.features.FeaturesDict(
      {'input_ids': row, 'segment_ids': row}))
