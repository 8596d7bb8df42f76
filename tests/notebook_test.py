"""notebooks/quickstart.ipynb runs top to bottom (tiny sizes: GUIDEDFLOW_NOTEBOOK_QUICK=1)."""

import os

import jax
import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'quickstart.ipynb')


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  monkeypatch.setenv('GUIDEDFLOW_NOTEBOOK_QUICK', '1')
  monkeypatch.setenv('GUIDEDFLOW_NOTEBOOK_WORKDIR', str(tmp_path / 'run'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', jax.config.jax_compilation_cache_dir or '')
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': REPO}})
  client.execute()  # raises CellExecutionError (with the cell's traceback) if a cell fails

  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  pngs = [o for o in outputs if 'image/png' in o.get('data', {})]
  assert 'test_accuracy' in text  # the classifier cell printed its result
  assert '| w |' in text  # the sweep table
  # Training grid, the w panels, the sweep figure and the sweep grid.
  assert len(pngs) >= 4, [o.output_type for o in outputs]
  assert os.path.exists(tmp_path / 'run' / 'eval' / 'guidance_sweep.json')
