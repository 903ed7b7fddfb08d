"""The reference packer the tests hold mlm_jax.data.packing.rows equal to."""
from collections.abc import Iterable, Iterator

import numpy as np


def pack(token_lists: Iterable[list[int]], seq_len: int,
         cls_id: int, sep_id: int, pad_id: int
         ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Greedy packing of documents into rows; yields (input_ids, segment_ids).

  The reference definition of the layout, one token at a time; builds use
  `mlm_jax.data.packing.rows`, which the tests hold equal to this.
  """
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
