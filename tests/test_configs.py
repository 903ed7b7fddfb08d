"""Every shipped config loads, validates, and keeps the base's keys."""
import importlib

import pytest

from configs import base
from mlm_jax import build


@pytest.mark.parametrize('name', ['cpu', 'bert_base', 'tpu_v4', 'gpu_h100',
                                  'modern'])
def test_config_is_valid_and_declares_nothing_new(name):
  c = importlib.import_module(f'configs.{name}').get_config()
  build.validate(c)

  def keys(d, prefix=''):
    out = set()
    for k, v in d.items():
      out |= keys(v, f'{prefix}{k}.') if hasattr(v, 'items') else {prefix + k}
    return out

  assert keys(c) == keys(base.get_config())


def test_platform_batches_divide_their_devices():
  tpu = importlib.import_module('configs.tpu_v4').get_config()
  gpu = importlib.import_module('configs.gpu_h100').get_config()
  assert tpu.batch_size % 4 == 0 and tpu.batch_size % 16 == 0  # v4-8, v4-32
  assert gpu.batch_size % 8 == 0
  assert tpu.model.dtype == gpu.model.dtype == 'bfloat16'
  assert tpu.model.size == gpu.model.size == 'base'
