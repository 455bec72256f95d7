"""The figures of a scaling sweep (matplotlib, Agg), written by `python -m train.scaling`.

  loss_vs_compute.png  each point's final validation loss against C = 6 N D,
                       one colour per model size, with the fitted law's curve
                       for that size; the held-out point as a star beside its
                       prediction and interval.
  isoflop.png          the fitted law along N at fixed compute (IsoFLOP
                       profiles) for budgets spanning the sweep, each minimum
                       marked, with the measured points nearest in compute.
  frontier.png         the compute-optimal N*(C) and D*(C) (log-log), with
                       the sweep's points for reference.
"""

from __future__ import annotations

import os
from typing import Any

from etils import epath
import matplotlib

matplotlib.use('Agg')  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from train import scaling_fit  # pylint: disable=g-import-not-at-top,wrong-import-position

FILES = ('loss_vs_compute.png', 'isoflop.png', 'frontier.png')


def _save(fig, path: str) -> None:
  fig.tight_layout()
  with epath.Path(path).open('wb') as f:   # gs:// goes through epath
    fig.savefig(f, dpi=110, format='png')
  plt.close(fig)


def _finished(report: dict[str, Any]) -> list[dict[str, Any]]:
  return [p for p in report['points'] if p.get('finished')]


def loss_vs_compute(report: dict[str, Any], law: scaling_fit.Fit, path: str) -> None:
  points = _finished(report)
  sizes = sorted({p['params'] for p in report['points']})
  colours = plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))
  computes = [p['compute'] for p in report['points']]
  c_grid = np.geomspace(min(computes) / 2, max(computes) * 2, 100)
  fig, ax = plt.subplots(figsize=(8, 5))
  for size, colour in zip(sizes, colours):
    mine = sorted((p for p in points if p['params'] == size and not p['holdout']),
                  key=lambda p: p['compute'])
    ax.plot(c_grid, [law.predict(size, c / (6 * size)) for c in c_grid], '--', color=colour,
            linewidth=1)
    ax.plot([p['compute'] for p in mine], [p['eval_loss'] for p in mine], 'o', color=colour,
            label=f'N = {size / 1e6:.3g}M')
  prediction = report.get('prediction')
  if prediction is not None:
    held = next(p for p in report['points'] if p['holdout'])
    low, high = prediction['interval_95']
    value = prediction['predicted_loss']
    # A percentile interval need not contain the full-data fit's value (nor, with equal
    # bootstrap fits, differ from it by more than rounding): clip the bars at zero.
    ax.errorbar([held['compute']], [value],
                yerr=[[max(value - low, 0.0)], [max(high - value, 0.0)]],
                fmt='s', color='tab:red', mfc='none', capsize=4, label='held out: prediction')
    if prediction.get('measured_loss') is not None:
      ax.plot([held['compute']], [prediction['measured_loss']], '*', color='tab:red',
              markersize=14, label=f'held out: measured ({100 * prediction["relative_error"]:+.2f}%)')
  ax.set_xscale('log')
  ax.set_xlabel('compute C = 6 N D (FLOPs, N non-embedding)')
  ax.set_ylabel('final validation loss (nats/token)')
  q = law.params_dict()
  ax.set_title(f'L = {q["E"]:.3f} + {q["A"]:.4g}/N^{q["alpha"]:.3f} + {q["B"]:.4g}/D^{q["beta"]:.3f}'
               ' (dashed: the fit)', fontsize=10)
  ax.grid(True, alpha=0.3, which='both')
  ax.legend(fontsize=8)
  _save(fig, path)


def isoflop(report: dict[str, Any], law: scaling_fit.Fit, path: str) -> None:
  computes = np.array([p['compute'] for p in report['points']])
  budgets = np.geomspace(computes.min(), computes.max(), 4)
  params = np.array([p['params'] for p in report['points']], np.float64)
  n_grid = np.geomspace(params.min() / 8, params.max() * 8, 200)
  colours = plt.cm.plasma(np.linspace(0, 0.85, len(budgets)))
  fig, ax = plt.subplots(figsize=(8, 5))
  for c, colour in zip(budgets, colours):
    losses = np.array([law.predict(n, c / (6 * n)) for n in n_grid])
    ax.plot(n_grid, losses, color=colour, label=f'C = {c:.2g}')
    best = int(np.argmin(losses))
    ax.plot([n_grid[best]], [losses[best]], 'v', color=colour, markersize=9)
  for p in _finished(report):
    nearest = int(np.argmin(np.abs(np.log(budgets) - np.log(p['compute']))))
    ax.plot([p['params']], [p['eval_loss']], 'o', color=colours[nearest], alpha=0.6)
  measured = [p['eval_loss'] for p in _finished(report)]
  if measured:   # far from the sweep the profiles climb steeply; keep the measured band readable
    ax.set_ylim(min(measured) * 0.9, max(measured) * 1.3)
  ax.set_xscale('log')
  ax.set_xlabel('non-embedding parameters N')
  ax.set_ylabel('validation loss (nats/token)')
  ax.set_title('IsoFLOP profiles of the fitted law (minima marked); dots: measured points, '
               'coloured by nearest budget', fontsize=9)
  ax.grid(True, alpha=0.3, which='both')
  ax.legend(fontsize=8)
  _save(fig, path)


def frontier(report: dict[str, Any], law: scaling_fit.Fit, path: str) -> None:
  exps = scaling_fit.frontier_exponents(law.theta)
  computes = np.array([p['compute'] for p in report['points']])
  c_grid = np.geomspace(computes.min() / 10, computes.max() * 1000, 100)
  fig, ax = plt.subplots(figsize=(8, 5))
  ax.plot(c_grid, exps['G'] * (c_grid / 6) ** exps['a'], color='tab:blue',
          label=f'N*(C) ∝ C^{exps["a"]:.3f}')
  ax.plot(c_grid, (c_grid / 6) ** exps['b'] / exps['G'], color='tab:orange',
          label=f'D*(C) ∝ C^{exps["b"]:.3f}')
  ax.plot(computes, [p['params'] for p in report['points']], 'o', color='tab:blue', alpha=0.4,
          label='sweep points: N')
  ax.plot(computes, [p['tokens'] for p in report['points']], 's', color='tab:orange', alpha=0.4,
          label='sweep points: D')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('compute C = 6 N D (FLOPs)')
  ax.set_ylabel('parameters / tokens')
  ax.set_title('Compute-optimal frontier of the fitted law (Chinchilla: a ≈ b ≈ 0.5)',
               fontsize=10)
  ax.grid(True, alpha=0.3, which='both')
  ax.legend(fontsize=8)
  _save(fig, path)


def plot_all(report: dict[str, Any], law: scaling_fit.Fit, out_dir: str) -> list[str]:
  """Writes the three figures into `out_dir`; returns their paths."""
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  written = []
  for name, draw in zip(FILES, (loss_vs_compute, isoflop, frontier)):
    path = os.fspath(epath.Path(out_dir) / name)
    draw(report, law, path)
    written.append(path)
  return written
