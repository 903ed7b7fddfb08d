"""Tests run on CPU with 8 fake devices; set before jax is imported."""
import os

os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''),
     '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One data cache (tokenizer + packed demo corpus) for the whole session."""
  return str(tmp_path_factory.mktemp('data'))
