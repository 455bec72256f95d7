"""AdamW with a warm-up + decay schedule, global-norm clipping and a decay mask.

Gradient accumulation is not an optimizer wrapper here: the train step scans
over micro-batches and hands the optimizer one averaged gradient (see
train/steps.py), so the optimizer state is the same with or without it.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('cosine', 'linear', 'constant')

# Parameters whose '/'-joined path matches this are not weight-decayed: norm
# scales, biases, and the token embedding (decaying rarely-seen token rows
# towards zero hurts them most).
DEFAULT_NO_DECAY = r'norm|bias|(^|/)embed(ding)?(/|$)'


def make_schedule(opt_cfg: Any, num_train_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up to `learning_rate`, then decay to `end_lr_factor * learning_rate`.

  Warm-up starts at lr / warmup_steps rather than 0 so the first step is not
  wasted; the decay runs from the end of warm-up to `num_train_steps`.
  """
  peak = float(opt_cfg.learning_rate)
  warmup = int(opt_cfg.warmup_steps)
  end = float(opt_cfg.end_lr_factor)
  kind = opt_cfg.schedule
  if kind not in SCHEDULES:
    raise ValueError(f'optimizer.schedule={kind!r} is not one of {SCHEDULES}.')
  decay_steps = max(int(num_train_steps) - warmup, 1)

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if kind == 'cosine':
      factor = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    elif kind == 'linear':
      factor = 1.0 - (1.0 - end) * progress
    else:
      factor = jnp.ones_like(progress)
    return jnp.where(step < warmup, warm, peak * factor)

  return schedule


def path_name(path: tuple[Any, ...]) -> str:
  """'layers/attn/wq' for a jax key path."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def weight_decay_mask(params: Any, exclude: str = DEFAULT_NO_DECAY) -> Any:
  """True for parameters that get weight decay (their path does not match `exclude`)."""
  pattern = re.compile(exclude) if exclude else None
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not (pattern and pattern.search(path_name(path).lower())), params)


def make_optimizer(opt_cfg: Any, num_train_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """Returns (optax transformation, learning-rate schedule)."""
  schedule = make_schedule(opt_cfg, num_train_steps)
  exclude = opt_cfg.get('weight_decay_exclude', DEFAULT_NO_DECAY)
  parts = []
  if opt_cfg.grad_clip_norm and opt_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(opt_cfg.grad_clip_norm)))
  parts.append(optax.adamw(
      learning_rate=schedule,
      b1=float(opt_cfg.b1),
      b2=float(opt_cfg.b2),
      eps=float(opt_cfg.eps),
      weight_decay=float(opt_cfg.weight_decay),
      mask=lambda params: weight_decay_mask(params, exclude),
  ))
  return optax.chain(*parts), schedule
