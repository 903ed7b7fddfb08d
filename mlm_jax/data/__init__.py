"""Data: from a text source to packed, tokenized rows ready for the loader.

The trainer calls `prepare` once, then reads batches through
`pipeline.train_iterator` / `pipeline.eval_batches` over the returned sources.
Everything slow (wikitext parsing, tokenizer training, packing) is cached under
the data dir, keyed by what it depends on, and written under a temporary name
then renamed, so a crash or a concurrent process never leaves a half-written
file that a later run would trust.
"""

from collections.abc import Sequence
import contextlib
import dataclasses
import fcntl
import functools
import os
import shlex
from typing import Any, TYPE_CHECKING

from absl import logging
import ml_collections

from mlm_jax.data import files

if TYPE_CHECKING:
  from mlm_jax.data import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Prepared:
  tokenizer: 'tokenizer_lib.Tokenizer'
  train_source: Sequence[dict[str, Any]]  # random access to packed rows
  eval_source: Sequence[dict[str, Any]]
  info: dict[str, Any]  # data dir, vocab size, per-split counts


def data_dir(data_config: ml_collections.ConfigDict) -> str:
  root = (data_config.data_dir or os.environ.get('MLM_JAX_DATA_DIR')
          or '~/.cache/mlm_jax')
  if files.is_url(root):  # gs://... for a Beam build on Dataflow
    return root
  return os.path.abspath(os.path.expanduser(root))


def tokenizer_path(data_config: ml_collections.ConfigDict) -> str:
  """The tokenizer file of `data_config`: data.tokenizer, or the cached one.

  An SentencePiece model trained from the source is cached under the data
  dir, keyed by the source and vocab size; `prepare` makes it if missing.
  """
  if data_config.tokenizer:
    return data_config.tokenizer
  from mlm_jax.data import sources  # pylint: disable=g-import-not-at-top
  return os.path.join(
      data_dir(data_config), 'tokenizers',
      f'sp-{sources.fingerprint(data_config.source, text_field=data_config.text_field)}-'
      f'{data_config.vocab_size}.model')


def _beam_download_config(data_config: ml_collections.ConfigDict):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not data_config.tokenizer:
    raise ValueError(
        'data.beam_runner needs data.tokenizer: training one here would read '
        'the whole corpus on this host. Train it on a sample first: python -m '
        'mlm_jax.data.tokenizer --source=<a few shards> --out=sp.model.')
  try:
    from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError('data.beam_runner needs Apache Beam: pip install -e '
                     '".[beam]" (in an environment of its own: see the '
                     "README's Data at scale section).") from e
  options = pipeline_options.PipelineOptions(
      shlex.split(data_config.beam_options) + [
          f'--runner={data_config.beam_runner}'])
  return tfds.download.DownloadConfig(beam_options=options)


@contextlib.contextmanager
def _build_lock(path: str):
  """One builder per dataset on a host (or a shared disk): the others wait,
  then reuse its result, instead of racing on the same resumable chunks."""
  if files.is_url(path):  # an object store has no locks; Beam builds go there
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(data_config: ml_collections.ConfigDict, seq_len: int) -> Prepared:
  """Loads or makes the tokenizer and the packed dataset of `data_config`."""
  # Imported here, not at the top, so that `python -m mlm_jax.data.tokenizer`
  # does not import its own module twice (runpy warns about it).
  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds
  from mlm_jax.data import builder
  from mlm_jax.data import parallel
  from mlm_jax.data import sources
  from mlm_jax.data import tokenizer as tokenizer_lib
  # pylint: enable=g-import-not-at-top
  # Cheap checks first: a bad setting fails before minutes of parsing.
  if not 0 <= data_config.eval_fraction < 1:
    raise ValueError(f'data.eval_fraction must be in [0, 1), got '
                     f'{data_config.eval_fraction}.')
  workers = parallel.resolve_workers(data_config.workers)
  download_config = (_beam_download_config(data_config)
                     if data_config.beam_runner else None)
  root = data_dir(data_config)
  fingerprint = sources.fingerprint(data_config.source,
                                    text_field=data_config.text_field)
  # Every shard's first record is read here: a wrong field, a file of the
  # wrong kind or a corrupt header fails now, not hours into the build.
  documents = sources.documents(
      data_config.source, cache_dir=os.path.join(root, 'text'),
      text_field=data_config.text_field, workers=workers)
  path = tokenizer_path(data_config)
  in_bucket = files.is_url(root)
  if data_config.tokenizer or (not in_bucket and os.path.exists(path)):
    tok = tokenizer_lib.load(path)
  elif in_bucket:
    raise ValueError(f'data.data_dir={root!r} is in a bucket: give '
                     'data.tokenizer (python -m mlm_jax.data.tokenizer '
                     '--source=<a few shards> --out=sp.model).')
  else:
    logging.info('Training a tokenizer on %s', data_config.source)
    tok = tokenizer_lib.train(documents, data_config.vocab_size, path)

  make_builder = functools.partial(
      builder.PackedMLM, data_dir=root, documents=lambda: documents,
      source_fingerprint=fingerprint, tokenizer=tok, seq_len=seq_len,
      eval_fraction=data_config.eval_fraction, workers=workers,
      files=documents.files, text_field=data_config.text_field)
  rows = make_builder()
  tfds.disable_progress_bar()  # Progress bars garble logs.
  if not rows.data_path.exists():
    if in_bucket and not data_config.beam_runner:
      raise ValueError(
          f'No dataset yet under data.data_dir={root!r}: a local build writes '
          'to a local (or mounted) directory; a bucket takes a Beam build (set '
          'data.beam_runner; DirectRunner builds on this host).')
    with _build_lock(f'{rows.data_path.parent}.lock'):
      rows = make_builder()  # Another process may have built it meanwhile.
      rows.download_and_prepare(download_config=download_config)
      rows.remove_work_dir()

  info = dict(data_dir=str(rows.data_dir), vocab_size=tok.vocab_size,
              seq_len=seq_len)
  info.update({split: dict(rows.info.metadata[split])
               for split in ('train', 'validation')})
  logging.info('Data ready: %s', info)
  return Prepared(tokenizer=tok, train_source=rows.as_data_source('train'),
                  eval_source=rows.as_data_source('validation'), info=info)
