"""run_dir: a run's config round-trips, bad run dirs fail clearly, load()."""
import os

from flax import nnx
import jax
import numpy as np
import pytest

from configs import base
from mlm_jax import checkpoint
from mlm_jax import run_dir
from mlm_jax import train
import tiny


def test_config_round_trips_over_the_defaults(tmp_path):
  c = base.get_config()
  c.batch_size, c.model.size, c.data.source = 24, 'mini', '/corpus/*.txt'
  run_dir.write_config(str(tmp_path), c)
  assert os.listdir(tmp_path) == [run_dir.CONFIG_FILE]  # no .tmp left
  assert run_dir.read_config(str(tmp_path)).to_dict() == c.to_dict()


def test_an_old_config_gets_the_keys_added_since_from_the_defaults(tmp_path):
  (tmp_path / run_dir.CONFIG_FILE).write_text('{"batch_size": 24}')
  c = run_dir.read_config(str(tmp_path))
  assert c.batch_size == 24
  assert c.model.size == base.get_config().model.size


@pytest.mark.parametrize('content, match', [
    (None, 'is not a directory'),
    ('', r'No .*config\.json'),
    ('{"batch_size": 2', 'is not valid JSON'),
    ('[1, 2]', 'holds a JSON list'),
])
def test_a_bad_run_dir_says_what_is_wrong(tmp_path, content, match):
  workdir = tmp_path / 'run'
  if content is not None:
    workdir.mkdir()
    if content:
      (workdir / run_dir.CONFIG_FILE).write_text(content)
  with pytest.raises(ValueError, match=match):
    run_dir.read_config(str(workdir))


def test_load_without_weights_says_so(tmp_path):
  run_dir.write_config(str(tmp_path), base.get_config())
  assert not run_dir.has_weights(str(tmp_path))
  with pytest.raises(ValueError, match='has no checkpoint'):
    run_dir.load(str(tmp_path))


def test_load_gives_the_newest_checkpoints_params(tmp_path, data_dir):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(
      tiny.config(data_dir, num_steps=4, async_checkpointing=False), workdir)
  run = run_dir.load(workdir)
  assert run.step == 4 and run.config.num_steps == 4
  assert run.tokenizer.vocab_size == run.model_config.vocab_size
  graphdef, abstract = nnx.split(
      nnx.eval_shape(lambda: run.model), nnx.Param)
  del graphdef
  step, params = checkpoint.latest_params(run_dir.checkpoints_dir(workdir),
                                          abstract)
  assert step == 4
  loaded = nnx.state(run.model, nnx.Param)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
