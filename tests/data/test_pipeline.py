import json

import numpy as np
import pytest

from mlm_jax.data import pipeline


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True)
             for k in ('input_ids', 'segment_ids'))


def test_batches_are_local_int32(prepared):
  batch = next(pipeline.train_iterator(prepared.train_source, 8, 0, 1, 2))
  assert set(batch) == {'input_ids', 'segment_ids'}
  for v in batch.values():
    assert v.shape == (4, prepared.info['seq_len']) and v.dtype == np.int32


def test_same_seed_same_batches(prepared):
  src = prepared.train_source
  a = _take(pipeline.train_iterator(src, 8, 7, 0, 1), 5)
  assert _equal(a, _take(pipeline.train_iterator(src, 8, 7, 0, 1), 5))
  assert not _equal(a, _take(pipeline.train_iterator(src, 8, 8, 0, 1), 5))


def test_epochs_cover_all_rows_in_new_orders(prepared):
  src = prepared.train_source
  n = len(src)
  batch = 6  # not a divisor of n: batches straddle epoch ends
  steps = -(-2 * n // batch)
  stream = np.concatenate([b['input_ids'] for b in _take(
      pipeline.train_iterator(src, batch, 0, 0, 1), steps)])
  rows = sorted(src[i]['input_ids'].tobytes() for i in range(n))
  epochs = stream[:n], stream[n:2 * n]
  for epoch in epochs:
    assert sorted(r.tobytes() for r in epoch) == rows
  assert not np.array_equal(*epochs)


def test_process_shares_concatenate_to_global_batch(prepared):
  src = prepared.train_source
  steps = len(src) // 12 + 3  # past the first epoch
  whole = _take(pipeline.train_iterator(src, 12, 3, 0, 1), steps)
  for count in (2, 3):
    shares = [_take(pipeline.train_iterator(src, 12, 3, p, count), steps)
              for p in range(count)]
    joined = [{k: np.concatenate([s[t][k] for s in shares]) for k in whole[t]}
              for t in range(steps)]
    assert _equal(joined, whole)


def test_resume_from_state(prepared):
  src = prepared.train_source
  it = pipeline.train_iterator(src, 8, 0, 1, 2)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 4)
  resumed = pipeline.train_iterator(src, 8, 0, 1, 2)
  resumed.set_state(state)
  assert _equal(_take(resumed, 4), expected)


def test_indivisible_batch_is_rejected(prepared):
  with pytest.raises(ValueError, match='global batch size 10 .* count 4'):
    pipeline.train_iterator(prepared.train_source, 10, 0, 0, 4)
  with pytest.raises(ValueError, match='global batch size 10 .* count 4'):
    pipeline.eval_batches(prepared.eval_source, 10, 0, 4)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_covers_validation_once(prepared, process_count):
  src = prepared.eval_source
  batch = 4
  shares = [list(pipeline.eval_batches(src, batch, p, process_count))
            for p in range(process_count)]
  steps = len(shares[0])
  assert all(len(s) == steps for s in shares)
  assert steps == -(-len(src) // batch)
  ids = np.concatenate([s[t]['input_ids'] for t in range(steps)
                        for s in shares])
  segs = np.concatenate([s[t]['segment_ids'] for t in range(steps)
                         for s in shares])
  n = len(src)
  assert ids.shape == (steps * batch, prepared.info['seq_len'])
  for i in range(n):  # in order, each row once
    assert np.array_equal(ids[i], src[i]['input_ids'])
  assert not ids[n:].any() and not segs[n:].any()  # all [PAD], segment 0
