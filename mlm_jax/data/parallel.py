"""Worker processes for the slow parts of a build, results in input order.

The main process streams the source and hands bounded chunks to a pool of
`spawn`ed workers (wikitext cleaning, tokenizing, row writing); results come
back in submission order, so a parallel build makes exactly the files a
serial one does. At most a few chunks per worker are in flight: memory stays
flat whatever the corpus size. With one worker everything runs in-process.
"""

from collections.abc import Callable, Iterable, Iterator
import collections
from concurrent import futures
import json
import multiprocessing
import os
import sys
import time
import types
import uuid

from absl import logging

_LOG_EVERY_S = 5.0


def resolve_workers(workers: int) -> int:
  """data.workers: 0 = every core this process may run on."""
  if workers < 0:
    raise ValueError(f'data.workers must be >= 0 (0 = all cores), got '
                     f'{workers}.')
  return workers or len(os.sched_getaffinity(0))


class _WorkerProcess(multiprocessing.context.SpawnProcess):
  """A spawned worker that does not import the parent's __main__.

  spawn re-imports the parent's __main__ in every worker: under `python -m
  mlm_jax.main` that is jax, flax and the trainer (seconds and hundreds of
  MB each). The workers need only the function they run. The pool starts
  workers as tasks come, so each start is wrapped, not the pool's creation.
  """

  def start(self):
    main = sys.modules['__main__']
    sys.modules['__main__'] = types.ModuleType('__main__')
    try:
      super().start()
    finally:
      sys.modules['__main__'] = main


class _SpawnContext(multiprocessing.context.SpawnContext):
  Process = _WorkerProcess


class Pool:
  """`workers` processes (none for 1); `ordered` maps tasks in order.

  A worker that dies (the kernel's OOM killer, a crash in a C library) ends
  the build with an error naming what to do, never a hang: the pool is
  concurrent.futures', which notices a lost worker (multiprocessing.Pool
  would wait for its result forever).
  """

  def __init__(self, workers: int, initializer: Callable | None = None,
               initargs: tuple = ()):
    self.workers = workers
    self._initializer, self._initargs = initializer, initargs
    self._pool = None

  def __enter__(self) -> 'Pool':
    if self.workers > 1:
      # spawn, not fork: the trainer's process runs XLA threads, and a
      # forked child of a multithreaded process can deadlock.
      self._pool = futures.ProcessPoolExecutor(
          self.workers, _SpawnContext(), self._initializer, self._initargs)
    elif self._initializer:
      self._initializer(*self._initargs)
    return self

  def __exit__(self, *exc):
    if self._pool is not None:
      # On an error the tasks not yet handed to a worker are dropped; those
      # handed over (one a worker and one more, a chunk each) finish first,
      # so their files are whole.
      self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)

  def ordered(self, tasks: Iterable[tuple[Callable, tuple]]) -> Iterator:
    """fn(*args) of each task, in task order, a bounded number in flight."""
    if self._pool is None:
      for fn, args in tasks:
        yield fn(*args)
      return
    in_flight = collections.deque()
    tasks = iter(tasks)
    try:
      while True:
        try:
          fn, args = next(tasks)
        except StopIteration:
          break
        except Exception:
          # A corrupt shard further on: let the tasks in flight finish, so
          # the work they did is kept for the rerun.
          futures.wait(in_flight)
          raise
        in_flight.append(self._pool.submit(fn, *args))
        if len(in_flight) > 2 * self.workers:
          yield in_flight.popleft().result()
      while in_flight:
        yield in_flight.popleft().result()
    except futures.BrokenExecutor as e:
      raise RuntimeError(
          f'A data worker process died before finishing its task ({e}). '
          'Killed by the system, e.g. its out-of-memory killer (see '
          '`dmesg`), or an error at its start (logged above)? Lower '
          'data.workers if memory is short, then run the same command '
          'again: it resumes from the chunks already finished.') from e


def chunks(items: Iterable, max_size: int,
           size: Callable = len) -> Iterator[list]:
  """Consecutive lists of items whose sizes sum to about max_size.

  The cut depends only on the items, never on timing or worker count, so a
  rerun cuts the same chunks (what resuming relies on).
  """
  chunk, total = [], 0
  for item in items:
    chunk.append(item)
    total += size(item)
    if total >= max_size:
      yield chunk
      chunk, total = [], 0
  if chunk:
    yield chunk


class Progress:
  """Logs documents, MB, MB/s, tokens/s and ETA, at most every few seconds."""

  def __init__(self, what: str, position):
    self._what, self._position = what, position
    self._start = self._last = time.monotonic()
    self.documents = self.chars = self.tokens = 0

  def update(self, documents: int = 0, chars: int = 0, tokens: int = 0):
    self.documents += documents
    self.chars += chars
    self.tokens += tokens
    now = time.monotonic()
    if now - self._last >= _LOG_EVERY_S:
      self._last = now
      self._log(now)

  def _log(self, now: float) -> None:
    elapsed = max(now - self._start, 1e-9)
    done, total = self._position.bytes(), self._position.total
    rate = done / elapsed
    eta = (total - done) / rate if rate and total > done else 0.0
    tokens = (f', {self.tokens / elapsed / 1e6:.2f}M tokens/s'
              if self.tokens else '')
    logging.info('%s: %d documents, %.1f of %.1f MB (%.0f%%), %.2f MB/s%s, '
                 'ETA %s', self._what, self.documents, done / 1e6, total / 1e6,
                 100 * done / max(total, 1), rate / 1e6, tokens,
                 _hms(eta))

  def finish(self) -> float:
    """Logs the totals; returns the seconds since the start."""
    now = time.monotonic()
    self._log(now)
    return now - self._start


def _hms(seconds: float) -> str:
  """'49h03m07s': a whole Wikipedia build's ETA is more than a day."""
  seconds = int(seconds)
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s'


def write_json_atomic(path: str, value) -> None:
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'
  with open(tmp, 'w') as f:
    json.dump(value, f)
  os.replace(tmp, path)
