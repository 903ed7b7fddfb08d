"""Record files: JSON Lines, Parquet and Hugging Face `datasets` arrow files.

Web corpora ship as records with a text field (C4: `.json.gz`, FineWeb:
`.parquet`, a `datasets.save_to_disk` directory: `.arrow` files). Each record
is one document. Every reader streams (a line, a row group, a record batch at
a time), so memory stays flat whatever the shard size, and `check` opens each
file's first record up front, so a wrong field or a file of the wrong kind
fails before any long work.
"""

from collections.abc import Iterator
import bz2
import gzip
import io
import json
import os

from mlm_jax.data import files

JSONL = ('.jsonl', '.jsonl.gz', '.jsonl.zst', '.jsonl.bz2', '.json.gz')
PARQUET = ('.parquet',)
ARROW = ('.arrow',)
_BATCH_ROWS = 1024


class RecordError(ValueError):
  """A record file that cannot be read as one; the message names it."""


def kind(path: str) -> str | None:
  """'jsonl', 'parquet', 'arrow', or None for a file that holds no records."""
  name = os.path.basename(path).lower()
  for k, suffixes in (('jsonl', JSONL), ('parquet', PARQUET),
                      ('arrow', ARROW)):
    if name.endswith(suffixes):
      return k
  return None


def open_binary(path: str, raw):
  """`raw` (an open binary file) decompressed by `path`'s suffix."""
  if path.endswith('.gz'):
    return gzip.open(raw, 'rb')
  if path.endswith('.bz2'):
    return bz2.open(raw, 'rb')
  if path.endswith('.zst'):
    import zstandard  # pylint: disable=g-import-not-at-top
    # BufferedReader: zstandard's reader is not line-iterable.
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(
        raw, read_across_frames=True))
  return raw


def hf_dataset_files(directory: str) -> list[str]:
  """The arrow files of a `datasets` `save_to_disk` directory, in order."""
  state = os.path.join(directory, 'state.json')
  if files.isfile(os.path.join(directory, 'dataset_dict.json')):
    splits = sorted(d for d in files.listdir(directory)
                    if files.isdir(os.path.join(directory, d)))
    raise ValueError(f'{directory!r} is a DatasetDict; point data.source at '
                     f'one of its splits: {splits} (e.g. {directory}/train).')
  if not files.isfile(state):
    raise ValueError(f'{directory!r} is a directory but not a Hugging Face '
                     'dataset saved with save_to_disk (no state.json); give '
                     'files or globs instead.')
  with files.open_binary(state) as f:
    names = [d['filename'] for d in json.load(f)['_data_files']]
  return [os.path.join(directory, n) for n in names]


def _field_error(path: str, field: str, found) -> ValueError:
  return RecordError(f'{path}: no text field {field!r} (found {sorted(found)}); '
                    f'set --config.data.text_field to the field holding the '
                    'text.')


def _jsonl_lines(path: str) -> Iterator[tuple[int, bytes]]:
  with files.open_binary(path) as raw, open_binary(path, raw) as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        yield number, line


def jsonl_text(path: str, number: int, line: bytes, field: str) -> str:
  try:
    record = json.loads(line)
  except ValueError as e:
    raise RecordError(f'{path}:{number} is not a JSON record ({e}); is it a '
                     'JSON Lines file?') from e
  if not isinstance(record, dict) or field not in record:
    raise _field_error(f'{path}:{number}', field,
                       record if isinstance(record, dict) else [])
  text = record[field]
  if not isinstance(text, str):
    raise RecordError(f'{path}:{number}: field {field!r} holds a '
                     f'{type(text).__name__}, not text; set '
                     '--config.data.text_field.')
  return text


def arrow_batches(path: str, field: str, kind_: str):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  # A bucket's object is read through a Python file; a local file by pyarrow.
  remote = files.is_url(path)
  if kind_ == 'parquet':
    # pre_buffer=False: pyarrow's pre-buffered read of a file keeps every
    # row group's bytes until the end, so memory grew with the file (400 MB
    # of text held 590 MB in the bench); without it, one row group's column
    # chunk at a time, still read in one piece.
    with pq.ParquetFile(files.open_binary(path) if remote else path,
                        pre_buffer=False) as f:
      names = f.schema_arrow.names
      if field not in names:
        raise _field_error(path, field, names)
      yield from f.iter_batches(batch_size=_BATCH_ROWS, columns=[field])
    return
  with files.open_binary(path) if remote else pa.memory_map(path) as source:
    try:
      reader = pa.ipc.open_stream(source)  # what save_to_disk writes
    except pa.ArrowInvalid:
      reader = pa.ipc.open_file(source)
    if field not in reader.schema.names:
      raise _field_error(path, field, reader.schema.names)
    batches = reader if hasattr(reader, '__iter__') else (
        reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in batches:
      yield batch.select([field])


def check_text_column(path: str, field: str, type_) -> None:
  if not (type_.equals('string') or type_.equals('large_string')):
    raise RecordError(f'{path}: column {field!r} holds {type_}, not text; set '
                      '--config.data.text_field.')


def corrupt_error(path: str, kind_: str, e: Exception) -> RecordError:
  # Truncated gzip, corrupt zstd frames, a CSV named .parquet: name the file.
  return RecordError(f'{path} is corrupt, truncated or not a {kind_} file '
                     f'({type(e).__name__}: {e}); re-download or remove it '
                     'from data.source.')


def texts(path: str, field: str) -> Iterator[str]:
  """The `field` of every record of `path`, in file order."""
  k = kind(path)
  try:
    if k == 'jsonl':
      for number, line in _jsonl_lines(path):
        yield jsonl_text(path, number, line, field)
      return
    for batch in arrow_batches(path, field, k):
      column = batch.column(0)
      check_text_column(path, field, column.type)
      for text in column.to_pylist():
        if text is not None:
          yield text
  except RecordError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise corrupt_error(path, k, e) from e


def check(path: str, field: str) -> None:
  """Reads `path`'s first record: a wrong field or format fails now."""
  for _ in texts(path, field):
    return
