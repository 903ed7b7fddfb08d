"""launch/colab_tpu.ipynb runs top to bottom on CPU (tiny config)."""
import os
import sys

import nbclient
import nbformat
import pytest

import tiny

NOTEBOOK = os.path.join(tiny.ROOT, 'launch', 'colab_tpu.ipynb')


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom_on_cpu(data_dir, monkeypatch):
  # The kernel inherits this environment: one CPU device, like a user's
  # Colab CPU runtime (not conftest's 8 fake devices).
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.setenv('MLM_JAX_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('MLM_JAX_DATA_DIR', data_dir)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # 'python3' runs this interpreter: jupyter_client swaps the kernelspec's
  # 'python' for sys.executable. cwd = the checkout, so mlm_jax imports
  # without being installed.
  client = nbclient.NotebookClient(
      nb, timeout=300, kernel_name='python3',
      resources={'metadata': {'path': tiny.ROOT}})
  client.execute()  # raises CellExecutionError if any cell raises
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in c.get('outputs', []))
  assert f'python {sys.executable}' in text
  assert '1 x cpu (cpu)' in text
  images = [o for c in nb.cells for o in c.get('outputs', [])
            if 'image/png' in o.get('data', {})]
  assert len(images) == 1
  assert 'step 6' in text and '[MASK] 1:' in text
