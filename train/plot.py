"""Plots of a run's metrics.jsonl: loss (train and validation), learning rate, throughput.

  python -m train.plot --workdir=runs/tiny

writes `<workdir>/plots/loss_vs_steps.png`, `loss_vs_tokens.png`,
`learning_rate.png`, `throughput.png` and, for an RL run, `reward_kl.png` (the workdir may be a `gs://` URL;
files go through `etils.epath`). The loss plots draw the raw train
loss faintly with a smoothed curve over it and the validation loss with
markers, and mark the best validation step: when validation rises while
training keeps falling (over-fitting), the marked minimum sits before the end
and the plot says so in its title.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from absl import flags
from etils import epath
import matplotlib

matplotlib.use('Agg')  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from train import console  # pylint: disable=g-import-not-at-top,wrong-import-position
from train.metrics import METRICS_FILE  # pylint: disable=g-import-not-at-top,wrong-import-position
from train.metrics import read_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position

PLOT_FILES = ('loss_vs_steps.png', 'loss_vs_tokens.png', 'learning_rate.png', 'throughput.png')


def _number(value: Any) -> float | None:
  """A finite float, or None (metrics.jsonl writes non-finite values as strings)."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    return None
  return value if math.isfinite(value) else None


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key`, sorted by step, the last record winning per step."""
  by_step = {}
  for record in records:
    value, step = _number(record.get(key)), _number(record.get('step'))
    if value is not None and step is not None:
      by_step[int(step)] = value
  steps = np.array(sorted(by_step), dtype=np.int64)
  return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def smooth(values: np.ndarray, weight: float | None = None) -> np.ndarray:
  """Bias-corrected exponential moving average, as TensorBoard draws it.

  The default weight averages over ~1/30 of the points (at most ~20), so a
  short run is not drawn lagging behind its own raw curve.
  """
  if weight is None:
    weight = min(0.95, max(0.0, 1.0 - 30.0 / max(len(values), 1)))
  out, avg = np.empty_like(values), 0.0
  for i, value in enumerate(values):
    avg = weight * avg + (1 - weight) * value
    out[i] = avg / (1 - weight ** (i + 1))
  return out


def tokens_at(records: Sequence[dict[str, Any]], steps: np.ndarray) -> np.ndarray | None:
  """Tokens seen at `steps`, interpolated from the train records that carry 'tokens'."""
  known_steps, known_tokens = series(records, 'tokens')
  if len(known_steps) == 0:
    return None
  if len(known_steps) == 1:  # a constant tokens-per-step rate through the origin
    return steps * (known_tokens[0] / max(known_steps[0], 1))
  return _extrapolate(steps, known_steps, known_tokens)


def _extrapolate(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
  """Linear interpolation that also extends the first/last segment's slope."""
  y = np.interp(x, xp, fp)
  slope = (fp[-1] - fp[0]) / max(xp[-1] - xp[0], 1)
  y = np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * slope, y)
  return np.where(x < xp[0], fp[0] + (x - xp[0]) * slope, y)


def _overfit_note(eval_steps: np.ndarray, eval_loss: np.ndarray) -> str:
  if len(eval_loss) < 2:
    return ''
  best = int(np.argmin(eval_loss))
  if best < len(eval_loss) - 1 and eval_loss[-1] > eval_loss[best] * 1.001:
    return (f' -- validation rising since step {eval_steps[best]} '
            f'({eval_loss[best]:.3f} -> {eval_loss[-1]:.3f})')
  return ''


def _loss_plot(records, path: str, title: str, use_tokens: bool) -> bool:
  train_steps, train_loss = series(records, 'train/loss')
  eval_steps, eval_loss = series(records, 'eval/loss')
  if not len(train_steps) and not len(eval_steps):
    return False
  train_x, eval_x, xlabel = train_steps, eval_steps, 'step'
  if use_tokens:
    train_x, eval_x = tokens_at(records, train_steps), tokens_at(records, eval_steps)
    if train_x is None:
      return False
    xlabel = 'tokens'
  fig, ax = plt.subplots(figsize=(8, 5))
  if len(train_steps):
    ax.plot(train_x, train_loss, color='tab:blue', alpha=0.25, linewidth=1)
    ax.plot(train_x, smooth(train_loss), color='tab:blue', linewidth=2, label='train (smoothed)')
  if len(eval_steps):
    ax.plot(eval_x, eval_loss, 'o-', color='tab:orange', linewidth=2, markersize=4,
            label='validation')
    best = int(np.argmin(eval_loss))
    ax.plot([eval_x[best]], [eval_loss[best]], '*', color='tab:red', markersize=14,
            label=f'best validation {eval_loss[best]:.3f} (step {eval_steps[best]})')
  ax.set_xlabel(xlabel)
  ax.set_ylabel('loss (nats / token)')
  ax.set_title(title + _overfit_note(eval_steps, eval_loss), fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend()
  _save(fig, path)
  return True


def _single_plot(records, key: str, path: str, title: str, ylabel: str,
                 second_key: str | None = None, second_label: str = '') -> bool:
  steps, values = series(records, key)
  if not len(steps):
    return False
  fig, ax = plt.subplots(figsize=(8, 4))
  ax.plot(steps, values, color='tab:green', linewidth=1.5)
  ax.set_ylim(bottom=0)  # rates read honestly from zero
  ax.set_xlabel('step')
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  if second_key is not None:
    steps2, values2 = series(records, second_key)
    if len(steps2):
      twin = ax.twinx()
      twin.plot(steps2, 100 * values2, color='tab:purple', linewidth=1, alpha=0.7)
      twin.set_ylabel(second_label, color='tab:purple')
      twin.set_ylim(bottom=0)
  _save(fig, path)
  return True


def _reward_kl_plot(records, path: str, title: str) -> bool:
  """RL runs (train/rl.py): the mean reward, smoothed, and the KL to the reference."""
  steps, reward = series(records, 'rl/reward_mean')
  if not len(steps):
    return False
  fig, ax = plt.subplots(figsize=(8, 4))
  ax.plot(steps, reward, color='tab:green', alpha=0.25, linewidth=1)
  ax.plot(steps, smooth(reward), color='tab:green', linewidth=2, label='mean reward (smoothed)')
  ax.set_xlabel('iteration')
  ax.set_ylabel('mean reward', color='tab:green')
  ax.set_title(title, fontsize=10)
  ax.grid(True, alpha=0.3)
  kl_steps, kl = series(records, 'rl/kl_per_sequence')
  if len(kl_steps):
    twin = ax.twinx()
    twin.plot(kl_steps, kl, color='tab:purple', linewidth=1.5)
    twin.set_ylabel('KL to the reference (nats / sequence)', color='tab:purple')
  _save(fig, path)
  return True


def _save(fig, path: str) -> None:
  fig.tight_layout()
  # Through a file object, so a gs:// path is written by epath, not taken for a local name.
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, dpi=110, format='png')
  plt.close(fig)


def plot_run(workdir: str, out_dir: str | None = None) -> list[str]:
  """Writes the PNGs for `workdir`'s metrics.jsonl; returns the paths written."""
  records = read_metrics(workdir)
  if not records:
    raise FileNotFoundError(f'No metrics in {epath.Path(workdir) / "metrics.jsonl"}; '
                            'has the run logged any step?')
  out_dir = epath.Path(out_dir or epath.Path(workdir) / 'plots')
  out_dir.mkdir(parents=True, exist_ok=True)
  run = epath.Path(workdir).name
  path = lambda name: os.fspath(out_dir / name)
  written = []
  if _loss_plot(records, path('loss_vs_steps.png'), f'{run}: loss', use_tokens=False):
    written.append(path('loss_vs_steps.png'))
  if _loss_plot(records, path('loss_vs_tokens.png'), f'{run}: loss vs tokens', use_tokens=True):
    written.append(path('loss_vs_tokens.png'))
  if _single_plot(records, 'train/learning_rate', path('learning_rate.png'),
                  f'{run}: learning rate', 'learning rate'):
    written.append(path('learning_rate.png'))
  if _single_plot(records, 'perf/tokens_per_sec', path('throughput.png'),
                  f'{run}: throughput', 'tokens / s', 'perf/mfu', 'MFU (%)'):
    written.append(path('throughput.png'))
  if _reward_kl_plot(records, path('reward_kl.png'), f'{run}: reward and KL'):
    written.append(path('reward_kl.png'))
  return written


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags; called only when run as a program.

  So importing this module next to other entry points never defines a flag twice.
  """
  flags.DEFINE_string('workdir', None, 'Run directory holding metrics.jsonl.')
  flags.DEFINE_string('out_dir', None, 'Where to write the PNGs (default: <workdir>/plots).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  console.quiet_libraries()
  if not (epath.Path(FLAGS.workdir) / METRICS_FILE).exists():
    raise cli.UserError(f'nothing to plot: no {METRICS_FILE} in {FLAGS.workdir}'
                        + ('' if epath.Path(FLAGS.workdir).is_dir() else ' (no such directory)'))
  try:
    written = plot_run(FLAGS.workdir, FLAGS.out_dir)
  except FileNotFoundError as e:  # a metrics.jsonl without a single record
    raise cli.UserError(f'nothing to plot: {e}') from e
  if not written:
    raise cli.UserError(f'nothing to plot: {FLAGS.workdir}/{METRICS_FILE} has none of '
                        'train/loss, eval/loss, train/learning_rate, perf/tokens_per_sec')
  for path in written:
    print(f'wrote {path}')


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('workdir')
  cli.run(main)
