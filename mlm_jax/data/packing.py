"""Packed rows as array arithmetic, and their serialization for array_record.

A split's documents, each followed by [SEP], form one token stream; row r is
[CLS] followed by stream[r*(L-1) : (r+1)*(L-1)] (the last row padded), and a
row's segment ids count the document pieces in it: 1 + the number of [SEP]s
before each position. That is exactly what greedy packing
(tests/data/greedy_pack.py) makes, but it needs no Python loop per token and
any row can be made from its offset alone: workers write shards in parallel
and a Beam pipeline assembles rows that straddle files.
"""

import hashlib

import numpy as np


def doc_hash(doc: str) -> float:
  """A stable number in [0, 1) per document text (the split assignment)."""
  digest = hashlib.sha256(doc.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64


def is_eval(hashes: np.ndarray, eval_fraction: float,
            lowest: float) -> np.ndarray:
  """Held-out documents; the lowest-hashed one too, so validation is never empty."""
  return (hashes < eval_fraction) | (hashes == lowest)


def stream(tokens: np.ndarray, lengths: np.ndarray, keep: np.ndarray,
           sep_id: int) -> tuple[np.ndarray, np.ndarray]:
  """int32 ids and bool [SEP]-ends of the kept, non-empty documents."""
  keep = keep & (lengths > 0)
  kept = tokens[np.repeat(keep, lengths)].astype(np.int32)
  ends = np.cumsum(lengths[keep])
  ids = np.insert(kept, ends, sep_id)
  is_end = np.zeros(len(ids), bool)
  is_end[ends + np.arange(len(ends))] = True
  return ids, is_end


def rows(ids_S: np.ndarray, ends_S: np.ndarray, seq_len: int, cls_id: int,
         pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """[R, L] input_ids and segment_ids of a stream that starts a row.

  A stream whose length is not a multiple of L-1 ends in one padded row.
  """
  body = seq_len - 1
  n = len(ids_S)
  r = -(-n // body)
  pad = r * body - n
  ids = np.concatenate([ids_S, np.full(pad, pad_id, np.int32)]).reshape(r, body)
  ends = np.concatenate([ends_S, np.zeros(pad, bool)]).reshape(r, body)
  # Exclusive cumulative count of [SEP]s: a piece includes its own [SEP].
  segs = 1 + np.cumsum(ends, axis=1, dtype=np.int32) - ends
  if pad:
    segs[-1, body - pad:] = 0
  ids_RxL = np.concatenate([np.full((r, 1), cls_id, np.int32), ids], axis=1)
  segs_RxL = np.concatenate([np.ones((r, 1), np.int32), segs], axis=1)
  return ids_RxL, segs_RxL


def _uvarint(n: int) -> bytes:
  out = bytearray()
  while n >= 0x80:
    out.append((n & 0x7f) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


def _varint_table(n: int) -> tuple[np.ndarray, np.ndarray]:
  x = np.arange(n, dtype=np.uint32)
  width = (1 + (x >= 1 << 7) + (x >= 1 << 14)).astype(np.uint8)
  table = np.stack([((x >> (7 * k)) & 0x7f) | ((width > k + 1) << 7)
                    for k in range(3)], axis=-1).astype(np.uint8)
  return table, width


# Varint bytes of every value below 2**16: a row of ids is one table lookup.
_TABLE, _WIDTH = _varint_table(1 << 16)


def _packed_varints(x_RxL: np.ndarray) -> tuple[bytes, list[int]]:
  """Protobuf varints of each row's values, concatenated; row offsets."""
  x = x_RxL.astype(np.uint32)
  if not x.size or x.max() < 1 << 7:  # one byte each (segment ids)
    return x.astype(np.uint8).tobytes(), (
        np.arange(len(x) + 1) * x.shape[-1]).tolist()
  if x.max() < 1 << 16:
    width = _WIDTH[x]
    bytes_RxLxK = _TABLE[x]
  else:  # A vocabulary over 65536 pieces: up to 5 bytes a value.
    width = np.ones(x.shape, np.uint8)
    for k in range(1, 5):
      width += x >= (1 << (7 * k))
    bytes_RxLxK = np.stack([((x >> (7 * k)) & 0x7f) | ((width > k + 1) << 7)
                            for k in range(5)], axis=-1).astype(np.uint8)
  used = np.arange(bytes_RxLxK.shape[-1], dtype=np.uint8) < width[..., None]
  offsets = np.zeros(len(x) + 1, np.int64)
  np.cumsum(width.sum(axis=1, dtype=np.int64), out=offsets[1:])
  return bytes_RxLxK[used].tobytes(), offsets.tolist()


def _field(number: int, payload: bytes) -> bytes:
  return bytes([number << 3 | 2]) + _uvarint(len(payload)) + payload


class Serializer:
  """tf.train.Example bytes of rows, as TFDS's ExampleSerializer writes them.

  TFDS builds a protobuf message per row (about 60 us for two 128-int
  features); this writes the same bytes from numpy in a few microseconds.
  A test compares both on random rows; the builder checks a few rows first.
  """

  def __init__(self, names=('input_ids', 'segment_ids')):
    self._names = [name.encode() for name in names]
    self._prefixes = [{} for _ in names]  # packed length -> entry prefix

  def _prefix(self, i: int, n: int) -> bytes:
    # Features.feature[name] = Feature{int64_list: Int64List{value: packed}}:
    # everything before the packed bytes depends only on their length n.
    prefix = self._prefixes[i].get(n)
    if prefix is None:
      int64_list = bytes([0x0a]) + _uvarint(n)
      feature = bytes([0x1a]) + _uvarint(len(int64_list) + n) + int64_list
      entry = (_field(1, self._names[i]) + bytes([0x12])
               + _uvarint(len(feature) + n) + feature)
      prefix = bytes([0x0a]) + _uvarint(len(entry) + n) + entry
      self._prefixes[i][n] = prefix
    return prefix

  def __call__(self, *columns_RxL: np.ndarray) -> list[bytes]:
    if any(c.size and c.min() < 0 for c in columns_RxL):
      raise ValueError('Negative ids cannot be serialized as varints.')
    packed = [_packed_varints(c) for c in columns_RxL]
    out = []
    for r in range(columns_RxL[0].shape[0]):
      parts = []
      for i, (data, offsets) in enumerate(packed):
        a, b = offsets[r], offsets[r + 1]
        parts.append(self._prefix(i, b - a))
        parts.append(data[a:b])
      features = b''.join(parts)
      out.append(b'\x0a' + _uvarint(len(features)) + features)
    return out


def same_examples(a: list[bytes], b: list[bytes]) -> bool:
  """Whether two lists of serialized tf.train.Examples hold the same values.

  Not a byte comparison: protobuf may write map entries (the features) in
  any order, and TFDS's own bytes vary from process to process.
  """
  from tensorflow_datasets.core.example_serializer import tf_example_pb2  # pylint: disable=g-import-not-at-top
  parse = tf_example_pb2.Example.FromString
  return len(a) == len(b) and all(parse(x) == parse(y) for x, y in zip(a, b))


def tfds_serializer(features):
  """TFDS's own serializer of `features` (the reference, and the fallback)."""
  from tensorflow_datasets.core import example_serializer  # pylint: disable=g-import-not-at-top
  serializer = example_serializer.ExampleSerializer(
      features.get_serialized_info())

  def serialize(ids_RxL, segs_RxL):
    return [serializer.serialize_example(features.encode_example(
        {'input_ids': i, 'segment_ids': s})) for i, s in zip(ids_RxL, segs_RxL)]
  return serialize
