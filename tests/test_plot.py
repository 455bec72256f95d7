"""train.plot writes readable PNGs from a metrics.jsonl, over-fitting included."""

import json
import os

import numpy as np

from train import plot


def _write_metrics(workdir):
  """A synthetic run: train loss keeps falling, validation turns up after step 700."""
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for step in range(10, 1001, 10):
      f.write(json.dumps({
          'step': step, 'tokens': step * 4096, 'train/loss': 5.0 * np.exp(-step / 300) + 1.0
          + 0.05 * np.sin(step), 'train/learning_rate': 1e-3 * min(1.0, step / 100),
          'perf/tokens_per_sec': 20000.0 + step, 'perf/mfu': 0.2}) + '\n')
      if step % 100 == 0:
        f.write(json.dumps({'step': step, 'eval/loss': 4.0 * np.exp(-step / 250) + 1.5
                            + max(0, step - 600) * 1e-3, 'eval/perplexity': 1.0}) + '\n')
    f.write('{"step": 1010, "train/lo')  # a torn last line is skipped


def test_plot_writes_pngs(tmp_path):
  workdir = str(tmp_path)
  _write_metrics(workdir)
  written = plot.plot_run(workdir)
  assert [os.path.basename(p) for p in written] == list(plot.PLOT_FILES)
  for path in written:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.path.getsize(path) > 10_000  # something drawn, not an empty canvas


def test_series_tokens_and_overfit_note(tmp_path):
  _write_metrics(str(tmp_path))
  records = plot.read_metrics(str(tmp_path))
  steps, loss = plot.series(records, 'eval/loss')
  assert list(steps) == list(range(100, 1001, 100))
  np.testing.assert_allclose(plot.tokens_at(records, steps), steps * 4096)
  assert 'rising since step 700' in plot._overfit_note(steps, loss)
  assert plot._overfit_note(steps[:6], loss[:6]) == ''


def test_nan_values_are_skipped_and_missing_metrics_is_an_error(tmp_path):
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write('{"step": 1, "train/loss": "nan"}\n{"step": 2, "train/loss": 2.0}\n')
  steps, values = plot.series(plot.read_metrics(str(tmp_path)), 'train/loss')
  assert list(steps) == [2] and list(values) == [2.0]
  empty = tmp_path / 'empty'
  empty.mkdir()
  try:
    plot.plot_run(str(empty))
  except FileNotFoundError as e:
    assert 'metrics.jsonl' in str(e)
  else:
    raise AssertionError('expected FileNotFoundError')
