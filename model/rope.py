"""Rotary position embeddings (RoPE) at arbitrary, per-token positions.

Feature pairs (i, i + head_dim/2) are rotated by the angle
`position * inv_freq[i]`, `inv_freq[i] = theta**(-2i/head_dim)`, so the dot
product of a rotated query and key depends on their positions only through
the difference. Positions come from the caller (they restart at 0 for every
packed document). Pairing feature i with i + head_dim/2 (not 2i with 2i + 1)
is the Hugging Face Llama convention ("rotate_half"), so a Hugging Face
checkpoint's projections load without a permutation (train/convert.py).

Llama 3.1 extends the context by rescaling the frequencies
(`ModelConfig.rope_scaling='llama3'`): with the pre-training context C and a
frequency's wavelength w = 2*pi/inv_freq, the ratio r = C / w says how many
turns the pair makes over C. Pairs that turn fewer than `low_freq_factor`
times (long wavelengths, which never saw a full turn in pre-training) are
slowed down by `factor`; pairs that turn more than `high_freq_factor` times
are kept; in between, inv_freq is interpolated linearly in r:

  s = clip((r - low_freq_factor) / (high_freq_factor - low_freq_factor), 0, 1)
  inv_freq' = (1 - s) * inv_freq / factor + s * inv_freq
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
  """Llama 3.1's RoPE frequency scaling (hashable: a static jit argument)."""
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_len: int


def scaling_of(cfg: ModelConfig) -> Llama3Scaling | None:
  """The model's RoPE scaling, or None for plain RoPE."""
  if cfg.rope_scaling == 'none':
    return None
  if cfg.rope_scaling == 'llama3':
    return Llama3Scaling(factor=float(cfg.rope_scaling_factor),
                         low_freq_factor=float(cfg.rope_low_freq_factor),
                         high_freq_factor=float(cfg.rope_high_freq_factor),
                         original_max_len=int(cfg.rope_original_max_len))
  raise ValueError(f'Unknown rope_scaling {cfg.rope_scaling!r}.')


def inverse_frequencies(head_dim: int, theta: float,
                        scaling: Llama3Scaling | None = None) -> jax.Array:
  """inv_freq [head_dim/2] in float32, rescaled per `scaling` (module docstring)."""
  fraction = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta ** fraction)
  if scaling is None:
    return inv_freq
  turns = scaling.original_max_len / (2 * math.pi / inv_freq)
  low, high = scaling.low_freq_factor, scaling.high_freq_factor
  smooth = jnp.clip((turns - low) / (high - low), 0.0, 1.0)
  return (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq


def rope_angles(positions_BL: jax.Array, head_dim: int, theta: float,
                scaling: Llama3Scaling | None = None) -> jax.Array:
  """Angles [B, L, head_dim/2] in float32."""
  inv_freq = inverse_frequencies(head_dim, theta, scaling)
  return positions_BL.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float,
               scaling: Llama3Scaling | None = None) -> jax.Array:
  """Rotates the last axis of `x_BLHK` [B, L, heads, head_dim] by its positions."""
  angles_BLK = rope_angles(positions_BL, x_BLHK.shape[-1], theta, scaling)[:, :, None, :]
  sin, cos = jnp.sin(angles_BLK), jnp.cos(angles_BLK)
  # float32 for the rotation: bfloat16 angles lose the position at long contexts.
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)
