"""`python -m train.scaling`: a sweep of pre-training runs, the fitted scaling law, a prediction.

  python -m train.scaling --config=configs/scaling.py:cpu --workdir=runs/scaling
  python -m train.scaling --config=configs/scaling.py:tpu --workdir=gs://b/scaling --point=NAME
  python -m train.scaling --config=configs/scaling.py:tpu --workdir=gs://b/scaling --fit_only

What a full run does, in order (train/scaling_plan.py says how the points
are chosen):

  1. trains every point of the grid except the held-out one, smallest compute
     first, each an ordinary pre-training run directory `<workdir>/points/NAME`
     (`train.pretrain.train`, in this process) with a cosine schedule sized to
     its own steps, evaluated once at its end;
  2. fits L(N, D) = E + A / N^alpha + B / D^beta to their final validation
     losses (train/scaling_fit.py) and writes the held-out point's predicted
     loss to `<workdir>/prediction.json` (and scaling.json) *before* that
     point trains; a prediction already on disk is never replaced;
  3. trains the held-out point and compares: `<workdir>/scaling.json` holds
     every point, the fit with bootstrap intervals, the compute-optimal
     frontier, the prediction and its error; `<workdir>/plots/` the figures.

Re-running resumes. A point is finished when its `scaling_result.json` exists:
it is written only after the run completed all its steps and its final
evaluation is in metrics.jsonl. Finished points are skipped; an interrupted
one resumes from its checkpoint (the stage runner restores it). Ctrl-C (or
SIGTERM) saves the current point's checkpoint and stops the sweep.

Separate jobs (one per slice or queued resource, see the README):
`--point=NAME` trains just that point (the held-out one only once every other
point is done; its prediction is made first if missing), and `--fit_only`
fits whatever is finished and writes scaling.json and the plots without
training. Every job writes into the same workdir, which may be `gs://`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from absl import flags
from etils import epath
import jax
import ml_collections
from ml_collections import config_flags

from configs import cli
from configs import pretrain as pretrain_configs
from configs import scaling as scaling_configs
from configs.cli import UserError
from train import console
from train import distributed
from train import loop
from train import metrics as metrics_lib
from train import paths
from train import pretrain
from train import scaling_fit
from train import scaling_plan
from train import scaling_plot

POINTS_DIR = 'points'
RESULT_FILE = 'scaling_result.json'
PREDICTION_FILE = 'prediction.json'
SWEEP_FILE = 'sweep.json'
SCALING_FILE = 'scaling.json'
# The fit has 5 parameters; fewer points than this cannot pin them down.
MIN_FIT_POINTS = 6


class SweepInterrupted(RuntimeError):
  """A point stopped before its end (Ctrl-C, SIGTERM); its checkpoint is saved."""


def _primary() -> bool:
  return jax.process_index() == 0


def _write_json(path: epath.Path, data: Any) -> None:
  if _primary():
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def _read_json(path: epath.Path) -> Any | None:
  return json.loads(path.read_text()) if path.exists() else None


def point_dir(workdir: str, point: scaling_plan.Point) -> epath.Path:
  return epath.Path(workdir) / POINTS_DIR / point.name


def read_result(workdir: str, point: scaling_plan.Point) -> dict[str, Any] | None:
  """The finished point's result, or None; a result of another shape/length is refused."""
  result = _read_json(point_dir(workdir, point) / RESULT_FILE)
  if result is None:
    return None
  for key in ('params', 'tokens', 'steps'):
    if result.get(key) != getattr(point, key):
      raise UserError(
          f'{point_dir(workdir, point)} was trained with {key}={result.get(key)}, but the '
          f'config now makes {key}={getattr(point, key)} for {point.name}; use a new workdir '
          'for a changed sweep.')
  return result


def final_eval_loss(directory: epath.Path, steps: int) -> float | None:
  """The validation loss the run logged at its last step, from its metrics.jsonl."""
  loss = None
  for record in metrics_lib.read_metrics(str(directory)):
    if record.get('step') == steps and isinstance(record.get('eval/loss'), (int, float)):
      loss = float(record['eval/loss'])
  return loss


def train_point(workdir: str, point: scaling_plan.Point) -> dict[str, Any]:
  """Trains (or resumes) one point and writes its result file; returns the result."""
  directory = point_dir(workdir, point)
  start = time.time()
  result = pretrain.train(ml_collections.ConfigDict(point.config.to_dict()), str(directory))
  if result.reason == 'preempted':
    raise SweepInterrupted(f'{point.name} stopped at step {result.step} of {point.steps}; '
                           'its checkpoint is saved, run the same command again to resume.')
  if result.step != point.steps:
    raise RuntimeError(f'{point.name} ended at step {result.step} of {point.steps} '
                       f'({result.reason}); a scaling point must run its whole schedule.')
  loss = final_eval_loss(directory, point.steps)
  if loss is None:
    raise RuntimeError(f'{directory}/metrics.jsonl has no eval/loss at step {point.steps}.')
  record = dict(point.summary(), eval_loss=loss, seconds=time.time() - start)
  _write_json(directory / RESULT_FILE, record)
  return record


def check_sweep_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to mix points of two different sweeps (other base config, shape rule) in one workdir."""
  sweep = {k: v for k, v in json.loads(config.to_json_best_effort()).items() if k != 'fit'}
  path = epath.Path(workdir) / SWEEP_FILE
  recorded = _read_json(path)
  if recorded is None:
    _write_json(path, sweep)
    return
  changed = sorted(k for k in set(sweep) | set(recorded) if sweep.get(k) != recorded.get(k))
  # A grid that grows keeps its finished points; only the runs' own settings must match.
  changed = [k for k in changed if k not in ('grid', 'holdout')]
  if changed:
    raise UserError(f'{workdir} holds a sweep made with other {", ".join(changed)} settings '
                    f'({path}); use a new workdir, or the config it was made with.')


def _fit_inputs(results: list[dict[str, Any]]) -> tuple[list[float], list[float], list[float]]:
  return ([r['params'] for r in results], [r['tokens'] for r in results],
          [r['eval_loss'] for r in results])


def fit(config: ml_collections.ConfigDict, results: list[dict[str, Any]]) -> scaling_fit.Fit:
  n, d, loss = _fit_inputs(results)
  return scaling_fit.fit_law(n, d, loss, delta=config.fit.huber_delta,
                             bootstrap=config.fit.bootstrap, seed=config.fit.seed,
                             init_stride=config.fit.init_stride)


def make_prediction(law: scaling_fit.Fit, point: scaling_plan.Point,
                    num_points: int) -> dict[str, Any]:
  low, high = law.predict_interval(point.params, point.tokens)
  return {'point': point.name, 'params': point.params, 'tokens': point.tokens,
          'predicted_loss': law.predict(point.params, point.tokens),
          'interval_95': [low, high], 'fit_points': num_points,
          'fit': law.params_dict(), 'made_at': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}


class Progress:
  """Console progress across the sweep: points done and an ETA from the FLOPs left."""

  def __init__(self, points: list[scaling_plan.Point], workdir: str):
    self.total = len(points)
    self.remaining = {p.name: p.train_flops for p in points
                      if read_result(workdir, p) is None}
    self.done = self.total - len(self.remaining)
    self.flops, self.seconds = 0.0, 0.0

  def start(self, point: scaling_plan.Point) -> None:
    eta = ''
    if self.flops:
      left = sum(self.remaining.values())
      eta = f' | ETA {metrics_lib.format_duration(self.seconds / self.flops * left)}'
    print(f'[scaling] point {self.done + 1}/{self.total} {point.name}'
          f'{" (held out)" if point.holdout else ""}: N={point.params:,} non-embedding '
          f'params (d_model {point.config.model.d_model}, {point.config.model.num_layers} '
          f'layers), D={point.tokens:,} tokens, {point.steps} steps | {self.done} done{eta}',
          flush=True)

  def finish(self, point: scaling_plan.Point, record: dict[str, Any]) -> None:
    self.done += 1
    self.flops += self.remaining.pop(point.name, 0.0)
    self.seconds += record['seconds']
    print(f'[scaling] {point.name}: validation loss {record["eval_loss"]:.4f} '
          f'({metrics_lib.format_duration(record["seconds"])}); {self.done}/{self.total} done',
          flush=True)


def sweep(config: ml_collections.ConfigDict, workdir: str, *, only: str | None = None,
          fit_only: bool = False) -> dict[str, Any] | None:
  """Runs the sweep (module docstring); returns what scaling.json holds, or None if no fit yet."""
  scaling_configs.validate(config)
  points = scaling_plan.plan(config)
  for p in points:   # every point's config is checked before the first one trains
    pretrain_configs.validate(p.config)
  workdir = paths.resolve_str(workdir)
  by_name = {p.name: p for p in points}
  if only is not None and only not in by_name:
    raise UserError(f'--point={only} is not a point of this sweep; its points: '
                    f'{", ".join(by_name)}.')
  grid = [p for p in points if not p.holdout]
  held = next((p for p in points if p.holdout), None)
  if held is not None and len(grid) < MIN_FIT_POINTS:
    raise UserError(f'The sweep has {len(grid)} points to fit before the held-out one; the '
                    f'law has 5 parameters and needs at least {MIN_FIT_POINTS}: add sizes or '
                    'budgets (or set holdout=False).')
  if _primary():
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  check_sweep_config(config, workdir)
  progress = Progress(points, workdir)
  sweep_start = time.time()

  if not fit_only:
    to_train = [by_name[only]] if only else grid
    for p in to_train:
      if p.holdout or read_result(workdir, p) is not None:
        continue
      progress.start(p)
      progress.finish(p, train_point(workdir, p))

  results = {p.name: read_result(workdir, p) for p in points}
  fit_results = [results[p.name] for p in grid if results[p.name] is not None]
  if len(fit_results) < MIN_FIT_POINTS:
    print(f'[scaling] {len(fit_results)} of {len(grid)} points are finished; the fit needs '
          f'{MIN_FIT_POINTS}. Nothing fitted yet.', flush=True)
    return None
  grid_done = len(fit_results) == len(grid)
  law = fit(config, fit_results)
  print(f'[scaling] fit on {len(fit_results)} points: {law.describe()}', flush=True)

  prediction_path = epath.Path(workdir) / PREDICTION_FILE
  prediction = _read_json(prediction_path)
  if held is not None and prediction is None:
    if results[held.name] is not None:
      print(f'[scaling] {held.name} finished without a prediction recorded before it ran; '
            'no prediction check.', flush=True)
    elif grid_done:
      prediction = make_prediction(law, held, len(fit_results))
      _write_json(prediction_path, prediction)
      print(f'[scaling] prediction for the held-out {held.name} (N={held.params:,}, '
            f'D={held.tokens:,}), written before it trains: validation loss '
            f'{prediction["predicted_loss"]:.4f} (95% interval {prediction["interval_95"][0]:.4f}'
            f'-{prediction["interval_95"][1]:.4f})', flush=True)

  train_held = held is not None and results[held.name] is None and not fit_only and (
      only is None or only == held.name)
  if train_held:
    if not grid_done:
      raise UserError(f'The held-out point {held.name} trains after every other point: '
                      f'{len(grid) - len(fit_results)} of them are not finished.')
    progress.start(held)
    results[held.name] = train_point(workdir, held)
    progress.finish(held, results[held.name])

  report = build_report(config, points, results, law, prediction, held)
  report['sweep_seconds_this_call'] = time.time() - sweep_start
  _write_json(epath.Path(workdir) / SCALING_FILE, report)
  if _primary():
    written = scaling_plot.plot_all(report, law, str(epath.Path(workdir) / 'plots'))
    for path in written:
      print(f'[scaling] wrote {path}', flush=True)
  print(f'[scaling] wrote {epath.Path(workdir) / SCALING_FILE}', flush=True)
  if report.get('prediction', {}).get('measured_loss') is not None:
    pr = report['prediction']
    print(f'[scaling] held-out {pr["point"]}: predicted {pr["predicted_loss"]:.4f}, measured '
          f'{pr["measured_loss"]:.4f}, error {100 * pr["relative_error"]:+.2f}%', flush=True)
  return report


def build_report(config: ml_collections.ConfigDict, points: list[scaling_plan.Point],
                 results: dict[str, dict[str, Any] | None], law: scaling_fit.Fit,
                 prediction: dict[str, Any] | None,
                 held: scaling_plan.Point | None) -> dict[str, Any]:
  """What scaling.json holds (README, "Scaling laws")."""
  rows = []
  for p in points:
    row = dict(p.summary())
    r = results[p.name]
    row['finished'] = r is not None
    if r is not None:
      row['eval_loss'] = r['eval_loss']
      row['seconds'] = r.get('seconds')
      if not p.holdout:
        row['fit_residual'] = r['eval_loss'] - law.predict(p.params, p.tokens)
    rows.append(row)
  computes = [p.compute for p in points]
  report = {
      'config': json.loads(config.to_json_best_effort()),
      'points': rows,
      'fit': law.to_dict(),
      'frontier': law.frontier(min(computes), max(computes) * 100),
      'published': scaling_fit.PUBLISHED,
  }
  if prediction is not None:
    prediction = dict(prediction)
    measured = results[held.name] if held is not None else None
    if measured is not None:
      prediction['measured_loss'] = measured['eval_loss']
      prediction['relative_error'] = (measured['eval_loss'] - prediction['predicted_loss']
                                      ) / prediction['predicted_loss']
      low, high = prediction['interval_95']
      prediction['measured_inside_interval'] = low <= measured['eval_loss'] <= high
    report['prediction'] = prediction
  return report


_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Scaling config file and preset, e.g. configs/scaling.py:cpu.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The sweep\'s directory (may be gs://).')
_POINT = flags.DEFINE_string('point', None, 'Train only this point (a separate job).')
_FIT_ONLY = flags.DEFINE_bool('fit_only', False, 'Fit the finished points; train nothing.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _CONFIG.value or not _WORKDIR.value:
    raise UserError('--config and --workdir are required, e.g. '
                    '--config=configs/scaling.py:cpu --workdir=runs/scaling')
  if _POINT.value and _FIT_ONLY.value:
    raise UserError('--point and --fit_only exclude each other: one job trains, the other fits.')
  console.quiet_libraries()
  distributed.initialize_from_flags()
  try:
    sweep(_CONFIG.value, _WORKDIR.value, only=_POINT.value, fit_only=_FIT_ONLY.value)
  except SweepInterrupted as e:
    print(f'[scaling] {e}', flush=True)
    sys.exit(130)
  except loop.NonFiniteLossError:
    sys.exit(1)   # the loop already printed the step and the value


if __name__ == '__main__':
  cli.run(main)
