"""TFDS builder: tokenized documents packed into fixed-length rows.

A row of length L is `[CLS] a a a [SEP] b b [SEP] c c c ...`: documents are
packed greedily in corpus order, a long document continues in the next row,
and only the split's last row is padded. segment_ids number the document
pieces of a row 1, 2, 3, ... ([CLS] is in segment 1) and are 0 on [PAD], so
attention can stay inside a piece. The 'validation' split holds out whole
documents, chosen by a hash of their text.

Locally the build runs in two parallel stages (`tokens`): workers tokenize
chunks of documents into files that survive a kill (a rerun resumes), then
write the shards; the rows are the same whatever the worker count. With a
Beam runner (`download_config.beam_runner`) the same rows come out of a Beam
pipeline (`beam.py`) instead.

The config name is a hash of everything the rows depend on, so a changed
source, tokenizer or setting builds into a new directory and an unchanged one
is reused. TFDS writes into an `incomplete.*` sibling directory and renames it
only when done, so a crashed build is never taken for a finished one.
"""

from collections.abc import Callable, Iterable, Iterator
import hashlib
import json
import os
import shutil
import time

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from mlm_jax.data import packing
from mlm_jax.data import parallel
from mlm_jax.data import pieces
from mlm_jax.data import tokenizer as tokenizer_lib
from mlm_jax.data import tokens as tokens_lib

# Bump when the row layout changes.
PACKING_VERSION = 1
# Bump when chunks are cut differently: a killed build's chunks are reused
# only by a build that cuts the same ones.
CHUNKING_VERSION = 2
# Characters of text per tokenizing task (about 250k tokens).
CHUNK_CHARS = 1 << 20


class _Chars:
  """Progress position of a plain iterable of documents: no total known."""
  total = 0

  def __init__(self):
    self.chars = 0

  def bytes(self) -> int:
    return self.chars


class PackedMLM(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Packed token rows for masked-language-model pretraining."""

  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, data_dir: str, documents: Callable[[], Iterable[str]],
               source_fingerprint: str, tokenizer: tokenizer_lib.Tokenizer,
               seq_len: int, eval_fraction: float, workers: int = 1,
               chunk_chars: int = 0, files: list[str] = (),
               text_field: str = 'text'):
    """Describes one build; nothing is read until download_and_prepare().

    Args:
      data_dir: TFDS data dir; the rows go to packed_mlm/<config>/1.0.0.
      documents: returns a fresh iterable over the source's documents; called
        only when the dataset is built (once).
      source_fingerprint: sources.fingerprint of the source.
      tokenizer: the tokenizer the rows are made with.
      seq_len: row length L.
      eval_fraction: fraction of documents held out for 'validation'.
      workers: processes tokenizing and writing (1: all in this process).
      chunk_chars: text per tokenizing task (0 = CHUNK_CHARS); chunks are
        also what a killed build keeps.
      files: the source's files, for a Beam build (one task per file).
      text_field: the text field of record files, for a Beam build.
    """
    if seq_len < 2:
      raise ValueError(f'seq_len must be at least 2, got {seq_len}.')
    self._documents = documents
    self._tokenizer = tokenizer
    self._seq_len = seq_len
    self._eval_fraction = eval_fraction
    self._workers = workers
    self._chunk_chars = chunk_chars or CHUNK_CHARS
    self._files = list(files)
    self._text_field = text_field
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

  @property
  def work_dir(self) -> str:
    """Tokenized chunks of an unfinished build (removed once it is done)."""
    return os.path.join(os.fspath(self.data_path.parent),
                        f'tokens-{self.version}-c{CHUNKING_VERSION}')

  def remove_work_dir(self) -> None:
    shutil.rmtree(self.work_dir, ignore_errors=True)

  def _download_and_prepare(self, dl_manager, download_config):
    if download_config.beam_runner or download_config.beam_options:
      from mlm_jax.data import beam  # pylint: disable=g-import-not-at-top
      stats_path = beam.stats_path(self)
      super()._download_and_prepare(dl_manager, download_config)
      self._set_metadata(beam.read_stats(stats_path))
      return
    tok = self._tokenizer
    init = (tokens_lib.init_worker, (tok.kind, tok.model_bytes))
    with parallel.Pool(self._workers, *init) as pool:
      plans = self._plan(self._encode(pool))
      self._set_metadata({s: p.metadata(self._seq_len)
                          for s, p in plans.items()})
      start = time.perf_counter()
      self._write(pool, plans)
      logging.info('Wrote %d shards in %.1f s.', sum(
          len(p.shards) for p in plans.values()), time.perf_counter() - start)

  def _set_metadata(self, metadata: dict[str, dict]) -> None:
    for split, counts in metadata.items():
      if not counts['rows']:
        raise ValueError(f'The {split} split would be empty: the corpus has '
                         'too few documents (add text or change '
                         'eval_fraction).')
      # Saved next to the rows (metadata.json): a reused build reports them.
      self.info.metadata[split] = counts
      logging.info('Split %s: %s', split, counts)

  def _encode(self, pool: parallel.Pool) -> list[tokens_lib.ChunkStats]:
    """Stage 1: chunks of documents to token files, in parallel, resumable."""
    os.makedirs(self.work_dir, exist_ok=True)
    docs = self._documents()
    position = getattr(docs, 'position', None)
    if hasattr(docs, 'chunks'):
      # A source: the workers decode and split its raw pieces.
      chunks = docs.chunks(self._chunk_chars)
    else:
      position = _Chars()
      chunks = ([pieces.Piece('docs', '', chunk)] for chunk in parallel.chunks(
          _counting(docs, position), self._chunk_chars))
    progress = parallel.Progress('Tokenizing', position)

    kept = 0

    def tasks():
      nonlocal kept
      for k, chunk in enumerate(chunks):
        path = os.path.join(self.work_dir, f'chunk-{k:07d}.npz')
        # A chunk a killed build finished is read back, not tokenized again.
        done = os.path.exists(path)
        kept += done
        yield tokens_lib.encode_chunk, (None if done else chunk, path,
                                        self._eval_fraction)

    stats, tally = [], {}
    for c in pool.ordered(tasks()):
      stats.append(c)
      pieces.add_tally(tally, c.tally)
      progress.update(c.documents, c.chars,
                      sum(t for _, t, _ in c.counts.values()))
    seconds = progress.finish()
    logging.info('Tokenized %d chunks (%d kept from an earlier run) in '
                 '%.1f s, %d workers.', len(stats), kept, seconds,
                 pool.workers)
    if hasattr(docs, 'report'):
      docs.report(tally)
    if not sum(c.documents for c in stats):
      raise ValueError('The corpus holds no document.')
    return stats

  def _plan(self, stats):
    self._lowest = tokens_lib.lowest_hash(stats)
    return tokens_lib.plan(stats, self._eval_fraction, self._seq_len,
                           self._workers)

  def _write(self, pool: parallel.Pool, plans) -> None:
    """Stage 2: the shards of both splits, in parallel."""
    fast = self._fast_serializer_ok()
    split_infos, tasks = [], []
    for split, p in plans.items():
      template = self._get_filename_template(split_name=split)
      for i, (a, b, spans) in enumerate(p.shards):
        path = os.fspath(template.sharded_filepath(
            shard_index=i, num_shards=len(p.shards)))
        tasks.append((tokens_lib.write_shard, (
            split, a, b, spans, path, self._seq_len, self._eval_fraction,
            self._lowest, fast)))
    results = iter(pool.ordered(tasks))
    for split, p in plans.items():
      written = [next(results) for _ in p.shards]
      split_infos.append(tfds.core.SplitInfo(
          name=split, shard_lengths=[r for r, _ in written],
          num_bytes=sum(n for _, n in written),
          filename_template=self._get_filename_template(split_name=split)))
    self.info.set_splits(tfds.core.SplitDict(split_infos))

  def _fast_serializer_ok(self) -> bool:
    """Whether packing.Serializer writes what TFDS's serializer writes."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, self._tokenizer.vocab_size, (4, self._seq_len))
    segs = np.sort(rng.integers(0, 9, (4, self._seq_len)), axis=1)
    reference = packing.tfds_serializer(self.info.features)
    ok = packing.same_examples(
        packing.Serializer()(ids, segs),
        reference(ids.astype(np.int32), segs.astype(np.int32)))
    if not ok:
      logging.warning('This TFDS serializes rows differently; using its slower '
                      'serializer.')
    return ok

  def _split_generators(self, dl_manager, pipeline):
    """The Beam build's splits (the local build does not come here)."""
    del dl_manager
    from mlm_jax.data import beam  # pylint: disable=g-import-not-at-top
    return {split: self._generate_examples(rows)
            for split, rows in beam.splits(self, pipeline).items()}

  def _generate_examples(self, rows):
    """A Beam build's PCollection of (row index, row) for one split."""
    return rows


def _counting(docs: Iterable[str], position: _Chars) -> Iterator[str]:
  for doc in docs:
    position.chars += len(doc)
    yield doc
