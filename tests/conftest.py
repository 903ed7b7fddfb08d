"""Tests run on CPU with 8 fake devices; set before jax is imported.

The suite compiles the same tiny programs many times (every end-to-end
test trains the same tiny model, in this process or in a child `python -m
mlm_jax.main`), so it shares one persistent JAX compilation cache, which
the child processes inherit through the environment. A fresh directory per
session (removed at exit): no test sees another session's compiles.
"""
import atexit
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''),
     '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='mlm_jax_test_compile_cache_')
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  # Cache every compile, however quick or small.
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'


import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One data cache (tokenizer + packed demo corpus) for the whole session.

  Shared by pytest-xdist's workers (the parent of their base temp dirs is
  the session's): data.prepare locks a dataset while it builds it, so the
  first worker builds and the others wait, then reuse it.
  """
  if 'PYTEST_XDIST_WORKER' not in os.environ:
    return str(tmp_path_factory.mktemp('data'))
  shared = tmp_path_factory.getbasetemp().parent / 'data'
  shared.mkdir(exist_ok=True)
  return str(shared)
