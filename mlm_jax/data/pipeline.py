"""grain loaders over the packed rows: per-process shares of global batches.

Global batch t is rows [t*B, (t+1)*B) of one seeded, endless stream that
reshuffles every epoch. Process p of P reads only rows
[t*B + p*b, t*B + (p+1)*b) with b = B/P, so the processes' shares of a step
concatenate to the one-process global batch, whatever P is, and each host
reads only what it feeds to its devices.
"""

from collections.abc import Iterator, Sequence

import grain
import numpy as np

from mlm_jax.data import tokenizer as tokenizer_lib

Batch = dict[str, np.ndarray]
# Batches read ahead per process: enough to hide reads, small in memory.
_READ = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f'The global batch size {global_batch_size} must be a positive '
        f'multiple of the process count {process_count}.')
  return global_batch_size // process_count


def _shares(ds: grain.MapDataset, global_batch_size: int, process_index: int,
            process_count: int) -> grain.MapDataset:
  """Batches of this process's share of each global batch."""
  b = _local_batch_size(global_batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in '
                     f'[0, {process_count}).')
  # Local batch k of the stream is share k % P of global batch k // P.
  return ds.batch(b)[process_index::process_count]


def train_iterator(source: Sequence[Batch], global_batch_size: int, seed: int,
                   process_index: int, process_count: int
                   ) -> grain.DatasetIterator:
  """Endless local batches {'input_ids', 'segment_ids'}: int32 [B/P, L].

  The iterator's get_state() is a small JSON-serializable dict;
  set_state() on a fresh iterator resumes exactly where that state was taken.
  """
  if not len(source):
    raise ValueError('The training split is empty.')
  # repeat() after shuffle() gives each epoch its own order (seed + epoch).
  ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
  ds = _shares(ds, global_batch_size, process_index, process_count)
  return iter(ds.to_iter_dataset(_READ))


def eval_batches(source: Sequence[Batch], global_batch_size: int,
                 process_index: int, process_count: int,
                 pad_id: int = tokenizer_lib.Tokenizer.pad_id
                 ) -> Iterator[Batch]:
  """One in-order pass over `source`, the last global batch padded with [PAD].

  Padding rows are all `pad_id` (the tokenizer's [PAD]: pass
  `tokenizer.pad_id`; an HF vocabulary has its own) with segment 0, so they
  carry no loss weight; every process yields the same number of batches.
  """
  n = len(source)
  if not n:
    raise ValueError('The validation split is empty.')
  seq_len = source[0]['input_ids'].shape[0]
  pad = {'input_ids': np.full([seq_len], pad_id, np.int32),
         'segment_ids': np.zeros([seq_len], np.int32)}
  steps = -(-n // global_batch_size)
  ds = grain.MapDataset.range(steps * global_batch_size).map(
      lambda i: source[i] if i < n else pad)
  ds = _shares(ds, global_batch_size, process_index, process_count)
  return iter(ds.to_iter_dataset(_READ))


def most_frequent_token(source, special_ids, max_rows: int = 4096) -> int:
  """The most frequent non-special token in (a spread sample of) the source."""
  idx = np.linspace(0, len(source) - 1, min(len(source), max_rows)).astype(int)
  ids = np.concatenate([np.asarray(source[int(i)]['input_ids']) for i in idx])
  counts = np.bincount(ids.ravel())
  counts[[s for s in special_ids if s < len(counts)]] = 0
  return int(np.argmax(counts))
