"""Scaling laws: the fit, the shape rule, the points' schedules, and a resumed sweep.

The fit is checked against laws whose parameters are known (synthetic losses
from L = E + A/N^alpha + B/D^beta, with and without noise) and the frontier
against a brute-force minimisation of that law; the shape rule against the
parameter count of the real initialised model; the sweep by running a tiny
one on a synthetic corpus through the real pre-training stage, twice.
"""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from configs import scaling as scaling_configs
from model import config as model_config_lib
from model import transformer
from train import pretrain
from train import scaling
from train import scaling_fit
from train import scaling_plan
from train import steps as steps_lib

# Chinchilla's published law (Hoffmann et al. 2022, approach 3).
TRUE = dict(A=406.4, B=410.7, E=1.69, alpha=0.34, beta=0.28)


def _law_grid(noise: float, seed: int = 0):
  """Losses of the known law on a 5 x 5 grid of (N, D), times lognormal noise."""
  n = np.repeat(np.geomspace(1e6, 1e9, 5), 5)
  d = np.tile(np.geomspace(1e8, 1e11, 5), 5)
  theta = [math.log(TRUE['A']), math.log(TRUE['B']), math.log(TRUE['E']), TRUE['alpha'],
           TRUE['beta']]
  loss = scaling_fit.predict_theta(theta, n, d)
  loss = loss * np.exp(np.random.default_rng(seed).normal(0.0, noise, loss.shape))
  return n, d, loss


@pytest.fixture(scope='module')
def exact_law() -> scaling_fit.Fit:
  return scaling_fit.fit_law(*_law_grid(noise=0.0), init_stride=60)


def test_fit_recovers_an_exact_law_to_full_precision(exact_law):
  # Noise-free: an optimiser that stopped early (Besiroglu et al. 2024) misses by ~1e-2.
  law = exact_law
  q = law.params_dict()
  assert abs(q['alpha'] - TRUE['alpha']) < 1e-3, q
  assert abs(q['beta'] - TRUE['beta']) < 1e-3, q
  assert abs(q['E'] - TRUE['E']) / TRUE['E'] < 1e-3, q


def test_fit_recovers_a_noisy_law_within_tolerance_and_intervals_cover():
  # 0.5% noise on each loss: alpha and beta within 0.03, E within 3%.
  law = scaling_fit.fit_law(*_law_grid(noise=0.005, seed=1), bootstrap=20, seed=0,
                            init_stride=60)
  q = law.params_dict()
  assert abs(q['alpha'] - TRUE['alpha']) < 0.03, q
  assert abs(q['beta'] - TRUE['beta']) < 0.03, q
  assert abs(q['E'] - TRUE['E']) / TRUE['E'] < 0.03, q
  intervals = law.intervals()
  for key in ('alpha', 'beta', 'E', 'a', 'b'):
    low, high = intervals[key]
    assert low <= q[key] <= high and high > low, (key, intervals[key], q[key])


def test_frontier_matches_brute_force_minimum(exact_law):
  law = exact_law
  frontier = law.frontier(1e20, 1e22, num=3)
  for row in frontier['table']:
    n = np.geomspace(1e6, 1e12, 200_001)
    losses = scaling_fit.predict_theta(law.theta, n, row['compute'] / (6 * n))
    best = n[np.argmin(losses)]
    assert abs(math.log(row['params'] / best)) < 1e-3, (row, best)
  alpha, beta = TRUE['alpha'], TRUE['beta']
  assert abs(frontier['a'] - beta / (alpha + beta)) < 1e-3
  assert abs(frontier['b'] - alpha / (alpha + beta)) < 1e-3


@pytest.mark.parametrize('preset', ['cpu', 'tpu'])
def test_shape_rule_gives_the_requested_size(preset):
  config = scaling_configs.get_config(preset)
  for point in scaling_plan.plan(config):
    # d_model is rounded to whole heads, depth to whole layers: within 35% of the target.
    assert abs(math.log(point.params / point.target_params)) < math.log(1.35), point.summary()
    model = point.config.model
    assert 0.5 < model.d_model / model.num_layers / config.shape.aspect_ratio < 2.0


def test_non_embedding_count_matches_the_real_model():
  config = scaling_configs.get_config('cpu')
  point = scaling_plan.plan(config)[-1]
  cfg = model_config_lib.ModelConfig.from_config(point.config.model)
  shapes = jax.eval_shape(
      lambda: transformer.Transformer(cfg).init(jax.random.key(0),
                                                np.zeros((1, 8), np.int32)))['params']
  counts = {jax.tree_util.keystr(path): math.prod(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
  embedding = sum(v for k, v in counts.items() if 'embed' in k.lower())
  assert embedding == cfg.vocab_size * cfg.d_model   # tied: one table
  assert point.params == sum(counts.values()) - embedding


def test_every_point_schedule_spans_its_steps():
  config = scaling_configs.get_config('cpu')
  for point in scaling_plan.plan(config):
    c = point.config
    assert c.num_train_steps == point.steps
    assert point.tokens == point.steps * c.batch_size * c.seq_len
    assert c.eval_every == point.steps and c.num_epochs is None
    assert 1 <= c.optimizer.warmup_steps < point.steps


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
  """A synthetic corpus with some structure (so the loss falls), vocab 320."""
  from data_pipeline import shards  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('data'))
  rs = np.random.RandomState(0)

  def docs(n, prefix):
    for i in range(n):
      start, length = rs.randint(4, 300), rs.randint(5, 60)
      yield f'{prefix}{i}', [int(4 + (start + 3 * j) % 316) for j in range(length)], 4 * length

  shards.write_dataset(data_dir, {'train': docs(200, 'tr'), 'validation': docs(20, 'va'),
                                  'test': docs(20, 'te')})
  return data_dir


def _tiny_sweep(data_dir: str):
  """The cpu preset shrunk: 2 sizes x 1 budget of a few steps, nothing held out."""
  config = scaling_configs.get_config(
      'cpu,grid.params=(3000.0,12000.0),grid.tokens=(512.0,),holdout=False,'
      'shape.head_dim=8,shape.multiple=8,shape.aspect_ratio=16.0')
  with config.unlocked():
    config.pretrain.data.workdir = data_dir
    config.pretrain.data.preset = 'files'
    config.pretrain.model.vocab_size = 320
    config.pretrain.seq_len = config.pretrain.model.max_len = 16
    config.pretrain.batch_size = 4
    config.pretrain.eval_steps = 2
  return config


def test_sweep_resumes_skipping_finished_points(tiny_data, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(scaling.pretrain.stage_lib, 'peak_flops', lambda mesh: (None, {}))
  trained, schedule_lengths = [], []
  real_train, real_make_step = pretrain.train, steps_lib.make_train_step

  def spy_train(config, workdir):
    trained.append(workdir.rsplit('/', 1)[-1])
    return real_train(config, workdir)

  def spy_make_step(*args, **kwargs):
    schedule_lengths.append(kwargs['num_train_steps'])
    return real_make_step(*args, **kwargs)

  monkeypatch.setattr(scaling.pretrain, 'train', spy_train)
  monkeypatch.setattr(scaling.pretrain.stage_lib.steps_lib, 'make_train_step', spy_make_step)
  config = _tiny_sweep(tiny_data)
  points = scaling_plan.plan(config)
  assert [p.steps for p in points] == [8, 8]
  workdir = tmp_path / 'sweep'
  # Two points are fewer than a 5-parameter fit needs: the sweep trains them, fits nothing.
  assert scaling.sweep(config, str(workdir)) is None
  assert sorted(trained) == sorted(p.name for p in points)
  # Each point's schedule was sized to exactly its own steps.
  assert schedule_lengths == [p.steps for p in points]
  for p in points:
    result = json.loads((workdir / 'points' / p.name / scaling.RESULT_FILE).read_text())
    assert result['steps'] == p.steps and math.isfinite(result['eval_loss'])
  assert '2/2 done' in capsys.readouterr().out

  # Again: both are finished, so nothing trains.
  trained.clear()
  scaling.sweep(config, str(workdir))
  assert trained == []
  # A result lost (the sweep died between the run's end and its result file): only that
  # point reruns, resuming from its final checkpoint without taking a step.
  (workdir / 'points' / points[0].name / scaling.RESULT_FILE).unlink()
  scaling.sweep(config, str(workdir))
  assert trained == [points[0].name]
  assert schedule_lengths[-1] == points[0].steps
  assert (workdir / 'points' / points[0].name / scaling.RESULT_FILE).exists()


def test_fit_only_predicts_the_held_out_point_first_then_reports_its_error(tmp_path):
  """The fit/prediction/report path on finished points (results written from a known law)."""
  config = scaling_configs.get_config('cpu,fit.bootstrap=4,fit.init_stride=120')
  points = scaling_plan.plan(config)
  held = points[-1]
  assert held.holdout and held.compute == max(p.compute for p in points)
  theta = [math.log(300.0), math.log(2000.0), math.log(2.5), 0.4, 0.45]
  workdir = tmp_path / 'sweep'

  def finish(point):
    loss = float(scaling_fit.predict_theta(theta, point.params, point.tokens))
    path = workdir / 'points' / point.name / scaling.RESULT_FILE
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(dict(point.summary(), eval_loss=loss, seconds=1.0)))
    return loss

  for point in points[:-1]:
    finish(point)
  report = scaling.sweep(config, str(workdir), fit_only=True)
  prediction = json.loads((workdir / scaling.PREDICTION_FILE).read_text())
  assert prediction['point'] == held.name and 'measured_loss' not in report['prediction']
  true_loss = float(scaling_fit.predict_theta(theta, held.params, held.tokens))
  assert abs(prediction['predicted_loss'] - true_loss) / true_loss < 1e-3
  # The held-out point finishes; a refit does not replace the prediction made before it ran.
  measured = finish(held) * 1.01
  (workdir / 'points' / held.name / scaling.RESULT_FILE).write_text(
      json.dumps(dict(held.summary(), eval_loss=measured, seconds=1.0)))
  report = scaling.sweep(config, str(workdir), fit_only=True)
  saved = json.loads((workdir / scaling.SCALING_FILE).read_text())
  assert saved['prediction']['made_at'] == prediction['made_at']
  assert saved['prediction']['relative_error'] == pytest.approx(
      (measured - prediction['predicted_loss']) / prediction['predicted_loss'])
  assert len(saved['points']) == len(points) and saved['fit']['bootstrap'] == 4
  for name in ('loss_vs_compute.png', 'isoflop.png', 'frontier.png'):
    assert (workdir / 'plots' / name).stat().st_size > 10_000
