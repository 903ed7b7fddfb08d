"""fill_mask agrees with HF's fill-mask pipeline on the exported model."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import transformers

from configs import base
from mlm_jax import convert
from mlm_jax import fill_mask
from mlm_jax import run_dir
from mlm_jax import train

sys.path.insert(0, os.path.dirname(__file__))
import hf_dirs  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(__file__))
SYLLABLES = 'ka lo mi ne ru ta so vi de pa zu ho gri ble tor'.split()


def _docs(n=150, seed=0):
  rng = random.Random(seed)
  words = [''.join(rng.choices(SYLLABLES, k=rng.randint(1, 3)))
           for _ in range(200)]
  return words, ['\n'.join(
      ' '.join(rng.choices(words, k=rng.randint(8, 30))).capitalize() + '.'
      for _ in range(rng.randint(1, 3))) for _ in range(n)]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny BERT (HF-compatible recipe) trained here with our SentencePiece."""
  root = tmp_path_factory.mktemp('trained')
  words, docs = _docs()
  (root / 'docs.txt').write_text('\n\n'.join(docs))
  c = base.get_config()
  c.model.update(size='tiny', num_layers=2, hidden_dim=32, num_heads=2,
                 mlp_dim=64, max_len=64, dropout_rate=0.0,
                 attention_dropout_rate=0.0)
  c.data.update(source=str(root / 'docs.txt'), data_dir=str(root / 'data'),
                vocab_size=320)
  c.update(num_steps=30, batch_size=8, seq_len=64, learning_rate=3e-3,
           warmup_steps=5, log_every=10, eval_every=30, checkpoint_every=30,
           eval_batches=1, async_checkpointing=False)
  train.train_and_evaluate(c, str(root / 'run'))
  convert.to_hf(str(root / 'run'), str(root / 'hf'))
  return str(root / 'run'), str(root / 'hf'), words


def _hf_top_k(hf_dir, text, k):
  pipe = transformers.pipeline('fill-mask', model=hf_dir, framework='pt')
  out = pipe(text, top_k=k)
  if out and isinstance(out[0], dict):
    out = [out]  # one mask: the pipeline drops a level
  return [[(c['token'], c['score']) for c in per_mask] for per_mask in out]


def _ours_top_k(workdir, text, k):
  _, _, tok, bert, _ = run_dir.load(workdir)
  [result] = fill_mask.predict(bert, tok, [text], top_k=k)
  return [[(c['id'], c['score']) for c in per_mask] for per_mask in result]


def _assert_same(ours, theirs):
  assert len(ours) == len(theirs)
  for a, b in zip(ours, theirs):
    assert [i for i, _ in a] == [i for i, _ in b]
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b],
                               atol=1e-5)


@pytest.mark.slow
def test_trained_sentencepiece_model_matches_hf_pipeline(trained):
  workdir, hf_dir, words = trained
  for text in (f'{words[0].capitalize()} {words[1]} [MASK] {words[2]}.',
               f'[MASK] {words[3]} [MASK].'):
    _assert_same(_ours_top_k(workdir, text, 5), _hf_top_k(hf_dir, text, 5))


def test_exported_tokenizer_splits_like_ours(trained):
  workdir, hf_dir, words = trained
  _, _, tok, _, _ = run_dir.load(workdir)
  hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  for text in (' '.join(words[:20]), 'Zürich 東京 kalo, mine!'):
    assert hf_tok(text)['input_ids'] == [tok.cls_id] + tok.encode(text) + [
        tok.sep_id]
  assert hf_tok.mask_token_id == tok.mask_id
  assert hf_tok.pad_token_id == tok.pad_id


def test_imported_wordpiece_model_matches_hf_pipeline(tmp_path):
  hf_dir = hf_dirs.bert_dir(str(tmp_path / 'hf'))
  convert.from_hf(hf_dir, str(tmp_path / 'imported'))
  for text in ('the [MASK] sat on the mat.', 'a [MASK] and a [MASK] ran.'):
    _assert_same(_ours_top_k(str(tmp_path / 'imported'), text, 4),
                 _hf_top_k(hf_dir, text, 4))


@pytest.mark.slow
def test_cli_text_and_json(trained):
  workdir, _, words = trained
  text = f'{words[0]} [MASK] {words[1]}.'
  cmd = [sys.executable, '-m', 'mlm_jax.fill_mask', f'--workdir={workdir}',
         '--top_k=3']
  result = subprocess.run(cmd + ['--json', text], capture_output=True,
                          text=True, check=False, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  [item] = json.loads(result.stdout)
  assert item['text'] == text and len(item['masks']) == 1
  candidates = item['masks'][0]
  assert len(candidates) == 3
  assert candidates[0]['score'] >= candidates[1]['score'] >= candidates[2][
      'score'] > 0
  result = subprocess.run(cmd + [text], capture_output=True, text=True,
                          check=False, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-2000:]
  assert '[MASK] 1: ' + candidates[0]['token'] in result.stdout


def test_text_without_mask_is_refused(trained):
  workdir, _, _ = trained
  _, _, tok, bert, _ = run_dir.load(workdir)
  with pytest.raises(ValueError, match=r'No \[MASK\]'):
    fill_mask.predict(bert, tok, ['no mask here'])
