"""launch/colab.ipynb runs end to end on CPU (nbclient), with its step counts shrunk.

The notebook's data cell runs the real pipeline, here over a few dozen
standard-library files (the `files` preset) instead of the whole library;
training, evaluation, sampling and plotting are the real tools, for 3 steps
of a narrowed `tiny`.
"""

from __future__ import annotations

import os
import shutil
import sysconfig

import nbformat
from nbclient import NotebookClient

from data_pipeline import split as split_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'launch', 'colab.ipynb')
HELD_OUT = 0.1  # the notebook data's validation and test fractions


def _small_corpus(directory: str, count: int = 40) -> None:
  """Copies about `count` mid-sized standard-library modules (real code, like the embedded corpus).

  A document's split is a hash of its id, `file:<path>`, and the path lies
  under pytest's tmp_path, so which files land in validation and test changes
  from run to run; with 40 files and HELD_OUT (10%) each, a split comes out empty in
  about one run in fifty. More files are copied until each of the two holds at
  least two, so the notebook's evaluation always has data.
  """
  stdlib = sysconfig.get_paths()['stdlib']
  os.makedirs(directory)
  names = sorted(n for n in os.listdir(stdlib)
                 if n.endswith('.py') and 2_000 < os.path.getsize(os.path.join(stdlib, n)) < 30_000)
  held_out = {'validation': 0, 'test': 0}
  for copied, name in enumerate(names):
    if copied >= count and min(held_out.values()) >= 2:
      break
    target = os.path.join(directory, name[:-3] + '.txt')
    shutil.copy(os.path.join(stdlib, name), target)
    split = split_lib.assign_split(f'file:{target}', validation=HELD_OUT, test=HELD_OUT)
    if split in held_out:
      held_out[split] += 1
  assert min(held_out.values()) >= 2, held_out


def test_notebook_executes_end_to_end(tmp_path, monkeypatch):
  corpus = str(tmp_path / 'corpus')
  _small_corpus(corpus)
  settings = {
      'STRATA_COLAB_INSTALL': 'skip',
      'STRATA_COLAB_STEPS': '3',
      'STRATA_COLAB_DATA': f'files,source.paths={corpus},tokenizer.vocab_size=512,'
                           f'split.validation={HELD_OUT},split.test={HELD_OUT},clean.strip_html=False',
      'STRATA_COLAB_OVERRIDES': 'model.vocab_size=512,model.d_model=64,model.num_layers=2,'
                                'model.num_heads=2,model.num_kv_heads=1,model.head_dim=32,'
                                'model.mlp_dim=128,seq_len=64,model.max_len=64,batch_size=4,'
                                'log_every=1,eval_every=2,eval_steps=1,checkpoint_every=2',
      'STRATA_COLAB_WORKDIR': str(tmp_path / 'work'),
      'JAX_PLATFORMS': 'cpu',
  }
  for key, value in settings.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # Generous limits: under `make test` another worker shares the 2 cores.
  client = NotebookClient(notebook, timeout=600, startup_timeout=180, kernel_name='python3',
                          resources={'metadata': {'path': REPO}})
  client.execute()

  outputs = '\n'.join(
      output.get('text', '') for cell in notebook.cells if cell.cell_type == 'code'
      for output in cell.get('outputs', []) if output.get('output_type') == 'stream')
  assert 'install=skip steps=3' in outputs
  assert 'backend: cpu' in outputs
  assert 'first and last logged train loss:' in outputs
  # The plots were displayed as images in the notebook.
  images = [output for cell in notebook.cells if cell.cell_type == 'code'
            for output in cell.get('outputs', []) if 'image/png' in output.get('data', {})]
  assert images
  run_dir = tmp_path / 'work' / 'tiny'
  assert (run_dir / 'metrics.jsonl').exists() and (run_dir / 'checkpoints').is_dir()
