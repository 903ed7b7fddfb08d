"""Where a source's bytes live: local paths, or URLs such as gs://.

A source may name files on this host's disks (or a shared filesystem) or in
a bucket (`gs://bucket/c4/en/c4-train.*.json.gz`); a Dataflow build needs
the bucket, since its workers see no disk of the host that launched it.
Local paths go through os and glob; URLs through etils.epath, the path
library TFDS writes gs:// datasets with. epath reads gs:// with
tf.io.gfile where TensorFlow is installed and with gcsfs otherwise (the
`gcs` extra: `pip install -e ".[gcs]"`); s3:// needs s3fs.
"""

import glob as glob_lib
import importlib.util
import os

from etils import epath

# What reads each scheme besides TensorFlow's gfile (epath prefers gfile).
_READERS = {'gs': 'gcsfs', 's3': 's3fs'}
_TENSORFLOW = 'tensorflow'


def is_url(path: str) -> bool:
  return '://' in path


def has_magic(pattern: str) -> bool:
  return glob_lib.has_magic(pattern)


def expand_user(path: str) -> str:
  return path if is_url(path) else os.path.expanduser(path)


def glob(pattern: str) -> list[str]:
  """The paths matching `pattern` (`*`, `?`, `[...]`, in any part), sorted."""
  if not is_url(pattern):
    return sorted(glob_lib.glob(pattern))
  if '**' in pattern:
    raise ValueError(f'{pattern!r}: `**` is not supported in a URL (on a '
                     'bucket it lists every object); use `*` per level.')
  head, tail = pattern.rsplit('/', 1)
  return sorted(os.fspath(p) for p in _remote(head).glob(tail))


def exists(path: str) -> bool:
  return _remote(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _remote(path).is_dir() if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _remote(path).is_file() if is_url(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  if is_url(path):
    return [p.name for p in _remote(path).iterdir()]
  return os.listdir(path)


def size(path: str) -> int:
  if is_url(path):
    return int(_remote(path).stat().length)
  return os.path.getsize(path)


def identity(path: str) -> list:
  """What changes when the file's contents may: where, size, modified."""
  if is_url(path):
    st = _remote(path).stat()
    return [path, int(st.length), st.mtime]
  st = os.stat(path)
  return [os.path.realpath(path), st.st_size, st.st_mtime_ns]


def open_binary(path: str):
  """`path` opened for reading bytes (seekable; `tell` counts raw bytes)."""
  return _remote(path).open('rb') if is_url(path) else open(path, 'rb')


def _remote(path: str) -> epath.Path:
  scheme = path.split('://', 1)[0]
  if scheme not in _READERS:
    raise ValueError(f'{path!r}: {scheme}:// is not supported; give a local '
                     f'path or one of {[f"{s}://" for s in _READERS]}.')
  package = _READERS[scheme]
  if not (importlib.util.find_spec(package) or
          importlib.util.find_spec(_TENSORFLOW)):
    raise ValueError(f'{path!r}: reading {scheme}:// needs {package} or '
                     f'tensorflow: pip install {package} (for gs://: pip '
                     'install -e ".[gcs]").')
  return epath.Path(path)
