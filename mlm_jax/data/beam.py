"""The dataset build as an Apache Beam pipeline, for corpora beyond one host.

The rows are those of the local build, in the same order: each source file
is one task (read, clean wikitext, tokenize, cut into chunks); the small
per-chunk statistics are combined into every chunk's offset in its split's
token stream (`tokens.plan`, as locally); each chunk then emits the pieces of
the rows it covers, keyed by row index, and a GroupByKey assembles rows that
straddle chunks or files. TFDS's Beam writer keeps the row-index order.

Parallelism is one task per input file: shard a big corpus into many files
(Wikipedia's dumps come in pages-articles1..27 pieces; C4 and FineWeb in
hundreds). The files and data_dir must be readable by every Beam worker.
"""

import json

import apache_beam as beam
from etils import epath
import numpy as np

from mlm_jax.data import packing
from mlm_jax.data import parallel
from mlm_jax.data import sources
from mlm_jax.data import tokens as tokens_lib
from mlm_jax.data import tokenizer as tokenizer_lib


def stats_path(builder) -> str:
  """Where the pipeline leaves the split statistics for the builder."""
  return str(epath.Path(builder.data_path).parent /
             f'beam-stats-{builder.version}.json')


def read_stats(path: str) -> dict[str, dict]:
  path = epath.Path(path)
  stats = json.loads(path.read_text())
  path.unlink()
  return stats


class _Encode(beam.DoFn):
  """One source file -> ((file, chunk), token arrays) for each chunk."""

  def __init__(self, kind: str, model_bytes: bytes, text_field: str,
               chunk_chars: int):
    self._kind, self._model_bytes = kind, model_bytes
    self._text_field, self._chunk_chars = text_field, chunk_chars
    self._tok = None

  def setup(self):
    self._tok = tokenizer_lib.from_model_bytes(self._kind, self._model_bytes)

  def process(self, element):
    index, path = element
    docs = sources.file_documents(path, self._text_field)
    for k, chunk in enumerate(parallel.chunks(docs, self._chunk_chars)):
      encoded = [self._tok.encode(d) for d in chunk]
      lengths = np.array([len(t) for t in encoded], np.int32)
      yield (index, k), dict(
          tokens=np.array([t for ts in encoded for t in ts], np.int32),
          lengths=lengths,
          hashes=np.array([packing.doc_hash(d) for d in chunk], np.float64),
          chars=sum(map(len, chunk)))


def _stats(element, eval_fraction: float) -> tokens_lib.ChunkStats:
  key, c = element
  return tokens_lib.chunk_stats(key, c['lengths'], c['hashes'], c['chars'],
                                eval_fraction)


def _layout(stats: list, eval_fraction: float, seq_len: int) -> dict:
  """Each chunk's stream start per split, the lowest hash, the metadata."""
  stats = sorted(stats, key=lambda c: c.path)
  plans = tokens_lib.plan(stats, eval_fraction, seq_len, workers=1)
  starts = {}
  for split, p in plans.items():
    spans = {path: start for _, _, shard in p.shards
             for path, start, _ in shard}
    starts[split] = spans
  return dict(lowest=tokens_lib.lowest_hash(stats), starts=starts,
              metadata={s: p.metadata(seq_len) for s, p in plans.items()})


def _write_stats(layout: dict, path: str) -> None:
  epath.Path(path).write_text(json.dumps(layout['metadata']))


def _fragments(element, split: str, layout: dict, seq_len: int, sep_id: int,
               eval_fraction: float):
  """(row index, (position in row, ids, ends)) of the rows a chunk covers."""
  key, c = element
  start = layout['starts'][split].get(key)
  if start is None:  # no token of this split
    return
  held_out = packing.is_eval(c['hashes'], eval_fraction, layout['lowest'])
  keep = held_out if split == 'validation' else ~held_out
  ids, ends = packing.stream(c['tokens'], c['lengths'], keep, sep_id)
  body = seq_len - 1
  pos = 0
  while pos < len(ids):
    row, offset = divmod(start + pos, body)
    n = min(body - offset, len(ids) - pos)
    yield row, (offset, ids[pos:pos + n], ends[pos:pos + n])
    pos += n


def _assemble(element, seq_len: int, cls_id: int, pad_id: int):
  row, pieces = element
  pieces = sorted(pieces, key=lambda p: p[0])
  ids_RxL, segs_RxL = packing.rows(
      np.concatenate([p[1] for p in pieces]),
      np.concatenate([p[2] for p in pieces]), seq_len, cls_id, pad_id)
  return row, {'input_ids': ids_RxL[0], 'segment_ids': segs_RxL[0]}


def splits(builder, pipeline) -> dict:
  """{'train': rows, 'validation': rows}: PCollections of (index, row)."""
  # pylint: disable=protected-access
  tok, seq_len, frac = builder._tokenizer, builder._seq_len, builder._eval_fraction
  if not builder._files:
    raise ValueError('A Beam build needs the source files (files=...).')
  chunks = (pipeline
            | 'Files' >> beam.Create(list(enumerate(builder._files)))
            | 'Reshuffle' >> beam.Reshuffle()  # one file per worker
            | 'Encode' >> beam.ParDo(_Encode(tok.kind, tok.model_bytes,
                                             builder._text_field,
                                             builder._chunk_chars)))
  layout = (chunks
            | 'Stats' >> beam.Map(_stats, frac)
            | 'AllStats' >> beam.combiners.ToList()
            | 'Layout' >> beam.Map(_layout, frac, seq_len))
  _ = layout | 'WriteStats' >> beam.Map(_write_stats, stats_path(builder))
  out = {}
  for split in tokens_lib.SPLITS:
    out[split] = (
        chunks
        | f'Fragments_{split}' >> beam.FlatMap(
            _fragments, split, beam.pvalue.AsSingleton(layout), seq_len,
            tok.sep_id, frac)
        | f'Group_{split}' >> beam.GroupByKey()
        | f'Rows_{split}' >> beam.Map(_assemble, seq_len, tok.cls_id,
                                      tok.pad_id))
  return out
