"""The Beam build (DirectRunner) makes the local build's rows, in order.

apache-beam needs protobuf < 7 and sentencepiece 0.2.3's model proto (which
the HF tokenizer tests import) needs protobuf >= 7.36, so Beam is not in the
`test` extra: the comparison runs in an environment of its own, made once
under ~/.cache/mlm_jax/test-envs/ (this suite's packages, plus apache-beam
and the versions it pins, which come first).
"""

import hashlib
import json
import os
import site
import subprocess
import sys
import venv

import numpy as np
import pytest

from mlm_jax import data

# The `beam` extra of setup.py.
BEAM = 'apache-beam>=2.60'
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
_IN_BEAM_ENV = 'MLM_JAX_IN_BEAM_ENV'


def _has_beam() -> bool:
  try:
    import apache_beam  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def _beam_env() -> str:
  """The python of an environment with apache-beam over this one's packages."""
  root = os.path.expanduser(os.environ.get(
      'MLM_JAX_TEST_ENVS', '~/.cache/mlm_jax/test-envs'))
  parents = [p for p in site.getsitepackages() if os.path.isdir(p)]
  # One environment per parent environment (a CI venv, a user's, ...).
  key = hashlib.sha256(json.dumps([BEAM, parents]).encode()).hexdigest()[:12]
  env_dir = os.path.join(root, f'beam-py{sys.version_info[0]}'
                         f'{sys.version_info[1]}-{key}')
  python = os.path.join(env_dir, 'bin', 'python')
  ready = os.path.join(env_dir, 'ready')
  if os.path.exists(ready):
    return python
  venv.EnvBuilder(clear=True, with_pip=True).create(env_dir)
  (env_site,) = [p for p in subprocess.run(
      [python, '-c', 'import site; print(*site.getsitepackages())'],
      capture_output=True, text=True, check=True).stdout.split()
                 if p.startswith(env_dir)]
  # This environment's packages (and its .pth files: the editable install)
  # after the Beam environment's own, so Beam's pins win.
  with open(os.path.join(env_site, 'zz_parent_env.pth'), 'w') as f:
    f.write('import site; ' + '; '.join(
        f'site.addsitedir({p!r})' for p in parents) + '\n')
  subprocess.run([python, '-m', 'pip', 'install', '--quiet', BEAM],
                 check=True, timeout=1200)
  with open(ready, 'w') as f:
    f.write(BEAM + '\n')
  return python


def _rows(source):
  return np.stack([np.stack([source[i]['input_ids'], source[i]['segment_ids']])
                   for i in range(len(source))])


@pytest.mark.slow
@pytest.mark.timeout(2600)  # a first run installs Beam (up to 1200 s)
def test_beam_rows_equal_local_rows(tmp_path, make_docs, write_docs,
                                    make_config, prepared):
  if not _has_beam():
    assert not os.environ.get(_IN_BEAM_ENV), 'the Beam environment lacks Beam'
    out = subprocess.run(
        [_beam_env(), '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
         f'{__file__}::test_beam_rows_equal_local_rows'],
        cwd=ROOT, env=dict(os.environ, **{_IN_BEAM_ENV: '1'}),
        capture_output=True, text=True, timeout=1200, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert '1 passed' in out.stdout, out.stdout[-2000:]
    return
  # Three files of two kinds, so rows straddle files and chunks.
  docs = make_docs(80, seed=3)
  write_docs(tmp_path / 'a.txt', docs[:30])
  with open(tmp_path / 'b.jsonl', 'w') as f:
    for d in docs[30:55]:
      f.write(json.dumps({'text': d}) + '\n')
  write_docs(tmp_path / 'c.txt', docs[55:])
  source = f'{tmp_path}/a.txt,{tmp_path}/b.jsonl,{tmp_path}/c.txt'
  tok = tmp_path / 'sp.model'
  tok.write_bytes(prepared.tokenizer.model_bytes)
  local = data.prepare(make_config(source, str(tmp_path / 'local'),
                                   tokenizer=str(tok), workers=2), 16)
  beam = data.prepare(make_config(source, str(tmp_path / 'beam'),
                                  tokenizer=str(tok),
                                  beam_runner='DirectRunner'), 16)
  for split in ('train', 'validation'):
    assert beam.info[split] == local.info[split]
  np.testing.assert_array_equal(_rows(beam.train_source),
                                _rows(local.train_source))
  np.testing.assert_array_equal(_rows(beam.eval_source),
                                _rows(local.eval_source))


def test_beam_needs_a_tokenizer(tmp_path, corpus, make_config):
  with pytest.raises(ValueError, match='needs data.tokenizer'):
    data.prepare(make_config(corpus[0], str(tmp_path),
                             beam_runner='DirectRunner'), 16)


def test_beam_runner_without_beam_says_what_to_install(tmp_path, corpus,
                                                       make_config,
                                                       monkeypatch):
  monkeypatch.setitem(sys.modules, 'apache_beam', None)  # import fails
  monkeypatch.setitem(sys.modules, 'apache_beam.options', None)
  with pytest.raises(ValueError, match=r'needs Apache Beam: pip install -e '
                     r'"\.\[beam\]"'):
    data.prepare(make_config(corpus[0], str(tmp_path), tokenizer='sp.model',
                             beam_runner='DirectRunner'), 16)
