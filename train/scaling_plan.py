"""The points of a scaling sweep: model shapes from a parameter count, and the grid.

The shape rule (one rule for every point, so model size is the only thing
that changes along N):

  * every block is the same Llama block: multi-head attention (as many
    key/value heads as query heads) with `shape.head_dim` fixed, and a SwiGLU
    MLP of width `shape.mlp_ratio * d_model` rounded to a multiple of
    `shape.multiple`; so a block holds ~`12 d^2` parameters (4 d^2 attention,
    8 d^2 MLP) and the non-embedding count is N ~ 12 L d^2;
  * depth and width keep one aspect ratio `d_model / num_layers ~
    shape.aspect_ratio` (Kaplan et al. 2020 found the loss nearly flat over a
    wide band of it at fixed N): with d = r L, N = 12 r^2 L^3, so
    `num_layers = round((N / (12 r^2))^(1/3))` (at least 1), then `d_model =
    sqrt(N / (12 L))` rounded to a multiple of `head_dim` (at least one head).

N, the parameter count the fit uses, is the non-embedding count: every
parameter except the token embedding table and the output projection (tied
to it in these presets), i.e. the blocks and the final norm. At the sizes a
CPU can sweep, the 8192 x d table is most of a model and grows only with
d, not with depth: counting it bends the power law (Kaplan et al. 2020,
figure 6, saw the same), while the non-embedding count gives a straight one.
The compute of a point is C = 6 N D with the same N (the Chinchilla / Kaplan
convention the frontier is stated in); the real training FLOPs (output
projection and attention included, `model.config.flops_per_token`) are
recorded next to it.

The grid is either `grid.kind='grid'`: every target N x every token budget
D, or `'isoflop'`: for each compute budget C, `grid.isoflop_points` model
sizes log-spaced over a factor `grid.isoflop_span` around Chinchilla's
20-tokens-per-parameter size, each trained on D = C / (6 N) tokens. A point
trains for `steps = round(D / (batch_size * seq_len))` steps, and its cosine
schedule is sized to exactly those steps. With `holdout=True` the point of
largest compute is held out of the fit: its loss is predicted before it runs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import ml_collections

from configs.cli import UserError
from model import config as model_config_lib


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the sweep.

  name: its folder under `<workdir>/points/`.
  target_params / target_tokens: what the grid asked for.
  params: N, the model's real non-embedding parameter count.
  tokens: D, the tokens it really trains on (steps x batch x length).
  steps: training steps (and the length of its learning-rate schedule).
  holdout: held out of the fit; its loss is predicted before it runs.
  config: the point's pre-training config (configs/pretrain.py's keys).
  """
  name: str
  target_params: float
  target_tokens: float
  params: int
  tokens: int
  steps: int
  holdout: bool
  config: ml_collections.ConfigDict

  @property
  def compute(self) -> float:
    """C = 6 N D, with N the non-embedding count (module docstring)."""
    return 6.0 * self.params * self.tokens

  @property
  def train_flops(self) -> float:
    """The training FLOPs the run really spends (output projection and attention included)."""
    cfg = model_config_lib.ModelConfig.from_config(self.config.model)
    return model_config_lib.flops_per_token(cfg, self.config.seq_len) * self.tokens

  def summary(self) -> dict[str, Any]:
    model = self.config.model
    return {'name': self.name, 'params': self.params, 'tokens': self.tokens, 'steps': self.steps,
            'compute': self.compute, 'train_flops': self.train_flops, 'holdout': self.holdout,
            'target_params': self.target_params, 'target_tokens': self.target_tokens,
            'total_params': total_params(model), 'd_model': model.d_model,
            'num_layers': model.num_layers, 'num_heads': model.num_heads,
            'mlp_dim': model.mlp_dim}


def non_embedding_params(model: ml_collections.ConfigDict) -> int:
  """N: every parameter but the embedding table and the output projection."""
  cfg = model_config_lib.ModelConfig.from_config(model)
  embedding = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  return model_config_lib.num_params(cfg) - embedding


def total_params(model: ml_collections.ConfigDict) -> int:
  return model_config_lib.num_params(model_config_lib.ModelConfig.from_config(model))


def _round_to(value: float, multiple: int) -> int:
  return max(multiple, int(round(value / multiple)) * multiple)


def shape_for(target_params: float, shape: ml_collections.ConfigDict) -> dict[str, int]:
  """The model keys (d_model, num_layers, heads, mlp_dim) for ~`target_params` (N)."""
  ratio, head_dim = float(shape.aspect_ratio), int(shape.head_dim)
  num_layers = max(1, int(round((target_params / (12.0 * ratio ** 2)) ** (1.0 / 3.0))))
  d_model = _round_to(math.sqrt(target_params / (12.0 * num_layers)), head_dim)
  mlp_dim = _round_to(float(shape.mlp_ratio) * d_model, int(shape.multiple))
  heads = d_model // head_dim
  return dict(d_model=d_model, num_layers=num_layers, num_heads=heads, num_kv_heads=heads,
              head_dim=head_dim, mlp_dim=mlp_dim)


def short(value: float) -> str:
  """200000 -> '200k', 1.5e6 -> '1.5M', 3e17 -> '300P' (names of points)."""
  for unit, scale in (('E', 1e18), ('P', 1e15), ('T', 1e12), ('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if value >= scale:
      return f'{value / scale:.3g}{unit}'
  return f'{value:.3g}'


def point_config(base: ml_collections.ConfigDict, shape: ml_collections.ConfigDict,
                 target_params: float, target_tokens: float, warmup_fraction: float
                 ) -> ml_collections.ConfigDict:
  """`base` (a pre-training config) with the point's shape, length and schedule."""
  config = copy.deepcopy(base)
  with config.unlocked():
    config.model.update(shape_for(target_params, shape))
    tokens_per_step = config.batch_size * config.seq_len
    steps = max(1, int(round(target_tokens / tokens_per_step)))
    # The cosine decays to its end exactly at the point's last step: a run cut
    # short of its schedule (or a schedule sized for a longer run) biases the fit.
    config.num_train_steps = steps
    config.num_epochs = None
    config.optimizer.warmup_steps = max(1, int(round(warmup_fraction * steps)))
    # Evaluate once, at the end (the loop always evaluates the last step).
    config.eval_every = steps
    config.checkpoint_every = max(1, steps // 2)
    config.log_every = max(1, steps // 5)
  return config


def _isoflop_targets(grid: ml_collections.ConfigDict) -> list[tuple[float, float]]:
  targets = []
  for compute in grid.compute:
    # Chinchilla's rule of thumb D = 20 N: C = 6 N (20 N) gives the centre size.
    centre = math.sqrt(float(compute) / 120.0)
    count, span = int(grid.isoflop_points), float(grid.isoflop_span)
    for i in range(count):
      exponent = (i / (count - 1) - 0.5) if count > 1 else 0.0
      n = centre * span ** exponent
      targets.append((n, float(compute) / (6.0 * n)))
  return targets


def plan(config: ml_collections.ConfigDict) -> list[Point]:
  """Every point of the sweep, smallest compute first; the held-out one last."""
  grid = config.grid
  if grid.kind == 'grid':
    targets = [(float(n), float(d)) for n in grid.params for d in grid.tokens]
  elif grid.kind == 'isoflop':
    targets = _isoflop_targets(grid)
  else:
    raise UserError(f"config key grid.kind={grid.kind!r}: expected 'grid' or 'isoflop'.")
  points = []
  for target_params, target_tokens in targets:
    cfg = point_config(config.pretrain, config.shape, target_params, target_tokens,
                       config.warmup_fraction)
    name = f'N{short(target_params)}_D{short(target_tokens)}'
    tokens = cfg.num_train_steps * cfg.batch_size * cfg.seq_len
    points.append(Point(name=name, target_params=target_params, target_tokens=target_tokens,
                        params=non_embedding_params(cfg.model), tokens=tokens,
                        steps=cfg.num_train_steps, holdout=False, config=cfg))
  names = [p.name for p in points]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UserError(f'The grid has the point(s) {duplicates} twice; give distinct sizes/budgets.')
  points.sort(key=lambda p: (p.compute, p.params))
  if config.holdout:
    if len(points) < 2:
      raise UserError('holdout=True needs at least 2 points (one is held out of the fit).')
    points[-1] = dataclasses.replace(points[-1], holdout=True)
  return points
