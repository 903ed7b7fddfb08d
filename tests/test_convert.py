"""convert from_hf / to_hf: exact round trips, refusals, continued pretraining."""
import importlib.util
import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mlm_jax import checkpoint
from mlm_jax import convert
from mlm_jax import run_dir
from mlm_jax import train

sys.path.insert(0, os.path.dirname(__file__))
import hf_dirs  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  """(HF dir, from_hf output dir, summary) of a small BertForMaskedLM."""
  hf_dir = hf_dirs.bert_dir(str(tmp_path_factory.mktemp('hf')))
  out = str(tmp_path_factory.mktemp('imported'))
  return hf_dir, out, convert.from_hf(hf_dir, out, seq_len=32)


def test_round_trip_reproduces_every_tensor(imported, tmp_path):
  hf_dir, out, summary = imported
  assert summary['has_head']
  convert.to_hf(out, str(tmp_path / 'back'))
  want = convert.read_hf_weights(hf_dir)
  got = convert.read_hf_weights(str(tmp_path / 'back'))
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  model, info = transformers.BertForMaskedLM.from_pretrained(
      str(tmp_path / 'back'), output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  original = transformers.BertForMaskedLM.from_pretrained(hf_dir)
  ids = torch.tensor([[101, 150, 160, 103, 170, 102]])
  with torch.no_grad():
    np.testing.assert_array_equal(model(input_ids=ids).logits.numpy(),
                                  original(input_ids=ids).logits.numpy())
  assert json.load(open(tmp_path / 'back' / 'config.json'))['vocab_size'] == (
      len(hf_dirs.vocab()))


def test_import_writes_a_runnable_config(imported):
  _, out, _ = imported
  spec = importlib.util.spec_from_file_location('imported_config',
                                                os.path.join(out, 'config.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  assert c.init_from == os.path.join(out, 'params')
  assert c.data.tokenizer == os.path.join(out, 'tokenizer', 'tokenizer.json')
  assert (c.model.num_layers, c.model.hidden_dim, c.model.num_heads) == (2, 32,
                                                                        4)
  saved = run_dir.read_config(out)
  assert saved.model.to_dict() == c.model.to_dict()


def test_bert_model_without_head_and_torch_bin(tmp_path, caplog):
  hf_dir = hf_dirs.bert_dir(str(tmp_path / 'hf'), head=False,
                            safetensors=False)
  assert os.path.isfile(os.path.join(hf_dir, 'pytorch_model.bin'))
  with caplog.at_level('WARNING'):
    summary = convert.from_hf(hf_dir, str(tmp_path / 'out'))
  assert 'no MLM head' in caplog.text
  assert not summary['has_head']
  _, _, tok, bert, _ = run_dir.load(str(tmp_path / 'out'))
  hf_model = transformers.BertModel.from_pretrained(hf_dir).eval()
  ids = np.array([[tok.cls_id, 150, 160, 170, tok.sep_id]])
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(ids)).last_hidden_state.numpy()
  got = bert.encoder(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32))
  assert np.abs(np.asarray(got) - want).max() < 1e-4


def test_unexportable_variant_is_refused_before_any_work(tmp_path):
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text(json.dumps(
      {'model': {'pre_ln': True, 'position': 'rope', 'size': 'tiny'}}))
  with pytest.raises(ValueError, match='pre_ln.*position'):
    convert.to_hf(str(run), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_cli_export_fills_masks_as_ours_does(imported, tmp_path):
  """The CLI export of weights that never came from HF (the import's, each
  perturbed here) predicts in HF's fill-mask pipeline what our fill_mask
  predicts: the same top tokens with the same probabilities."""
  import shutil  # pylint: disable=g-import-not-at-top
  from mlm_jax import fill_mask  # pylint: disable=g-import-not-at-top
  _, out, _ = imported
  run = str(tmp_path / 'run')
  shutil.copytree(out, run)
  _, _, tok, bert, _ = run_dir.load(run)
  params = nnx.state(bert, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  params = jax.tree.unflatten(treedef, [
      x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
      for x, k in zip(leaves, keys)])
  shutil.rmtree(os.path.join(run, 'params'))
  checkpoint.save_params(os.path.join(run, 'params'), params)
  nnx.update(bert, params)

  result = subprocess.run(
      [sys.executable, '-m', 'mlm_jax.convert', 'to_hf', f'--workdir={run}',
       f'--hf_dir={tmp_path / "cli"}'], capture_output=True, text=True,
      check=False, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr[-2000:]
  assert (tmp_path / 'cli' / 'model.safetensors').is_file()
  pipe = transformers.pipeline('fill-mask', model=str(tmp_path / 'cli'))
  texts = ['the [MASK] sat on the mat .', 'a bird sang in the [MASK] .']
  ours = fill_mask.predict(bert, tok, texts, top_k=3)
  for text, per_mask in zip(texts, ours):
    theirs = pipe(text, top_k=3)
    assert [c['token'] for c in theirs] == [c['id'] for c in per_mask[0]]
    np.testing.assert_allclose([c['score'] for c in theirs],
                               [c['score'] for c in per_mask[0]], rtol=1e-4)
  # Not the import's predictions: the perturbed weights were exported.
  original = transformers.pipeline('fill-mask', model=hf_dirs.bert_dir(
      str(tmp_path / 'original')))
  assert [c['token'] for c in original(texts[0], top_k=3)] != [
      c['id'] for c in ours[0][0]]


@pytest.mark.slow
def test_continued_pretraining_starts_from_the_imported_model(imported,
                                                              tmp_path):
  """Step 1 of a run with init_from has the imported params, not random ones.

  With learning rate 0 the one update changes nothing, so the checkpoint
  must hold exactly the imported tensors, and the step-1 train and eval
  losses (which those tensors made) differ from a fresh init's.
  """
  _, out, _ = imported
  docs = tmp_path / 'docs.txt'
  words = hf_dirs.TEXT.split()
  docs.write_text('\n\n'.join(' '.join(words[i:i + 12]) for i in range(60)))

  def run(name, init_from):
    c = run_dir.read_config(out)
    c.init_from = init_from
    c.data.source, c.data.data_dir = str(docs), str(tmp_path / 'data')
    c.num_steps, c.batch_size, c.learning_rate = 1, 8, 0.0
    c.warmup_steps = 1
    c.log_every = c.eval_every = c.checkpoint_every = 1
    c.eval_batches = 1
    c.async_checkpointing = False
    train.train_and_evaluate(c, str(tmp_path / name))
    lines = open(tmp_path / name / 'metrics.jsonl').read().splitlines()
    return {k: v for line in lines for k, v in json.loads(line).items()}

  imported_run = run('from_import', os.path.join(out, 'params'))
  fresh_run = run('fresh', '')
  _, _, _, bert, _ = run_dir.load(out)
  want = nnx.state(bert, nnx.Param)
  step, got = checkpoint.latest_params(
      run_dir.checkpoints_dir(tmp_path / 'from_import'),
      jax.tree.map(jnp.zeros_like, want))
  assert step == 1
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert imported_run['eval/loss'] != pytest.approx(fresh_run['eval/loss'],
                                                    abs=1e-3)
  assert imported_run['train/loss'] != pytest.approx(fresh_run['train/loss'],
                                                     abs=1e-3)
