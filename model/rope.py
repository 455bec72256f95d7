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
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

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


# The CPU path reads sin and cos from a table when it has at most this many
# entries (8 MB of float32 each); longer contexts compute them per position.
MAX_TABLE_ENTRIES = 1 << 21


@functools.lru_cache(maxsize=32)
def _sin_cos_table(table_len: int, head_dim: int, theta: float,
                   scaling: Llama3Scaling | None) -> tuple[np.ndarray, np.ndarray]:
  """sin and cos of `rope_angles` at positions 0..table_len-1, [table_len, head_dim/2].

  Evaluated at trace time with the same jnp operations as the computed path,
  sin and cos each on its own: XLA:CPU evaluates them more exactly so than
  fused into the rotation (within 2e-7 of float64 against 1.5e-5 at a few
  hundred radians; tests/test_attention.py).
  """
  with jax.ensure_compile_time_eval():
    angles = rope_angles(jnp.arange(table_len, dtype=jnp.int32)[None], head_dim, theta,
                         scaling)[0]
    return np.asarray(jnp.sin(angles)), np.asarray(jnp.cos(angles))


def sin_cos(positions_BL: jax.Array, head_dim: int, theta: float,
            scaling: Llama3Scaling | None = None, table_len: int | None = None,
            ) -> tuple[jax.Array, jax.Array]:
  """sin and cos of the angles, [B, L, 1, head_dim/2] float32 (broadcast over heads).

  With `table_len` (the CPU path, model/attention.py) they are gathered from a
  table of positions [0, table_len) made once at trace time, a constant of the
  program. Computed in the step instead, XLA:CPU fuses sin and cos into each
  of the fusions that rotate queries and keys, forward and backward, and
  evaluates them again for every element of every head: 3-5% of a
  `bench_cpu` train step (README, "Performance"). A position outside the table gives NaN,
  never a wrong rotation. Without `table_len`, or for a table larger than
  `MAX_TABLE_ENTRIES`, they are computed from the positions.
  """
  if table_len is not None and table_len * (head_dim // 2) <= MAX_TABLE_ENTRIES:
    sin_TK, cos_TK = _sin_cos_table(int(table_len), head_dim, float(theta), scaling)
    # Negative positions index from the end in jnp.take; send them to the fill value too.
    index_BL = jnp.where(positions_BL < 0, table_len, positions_BL)
    sin_BLK, cos_BLK = (jnp.take(jnp.asarray(t), index_BL, axis=0, mode='fill',
                                 fill_value=jnp.nan) for t in (sin_TK, cos_TK))
  else:
    angles_BLK = rope_angles(positions_BL, head_dim, theta, scaling)
    sin_BLK, cos_BLK = jnp.sin(angles_BLK), jnp.cos(angles_BLK)
  return sin_BLK[:, :, None, :], cos_BLK[:, :, None, :]


def rotate(x_BLHK: jax.Array, sin_BL1K: jax.Array, cos_BL1K: jax.Array) -> jax.Array:
  """Rotates the last axis of `x_BLHK` [B, L, heads, head_dim] by `sin_cos`'s angles."""
  # float32 for the rotation: bfloat16 angles lose the position at long contexts.
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos_BL1K - x2 * sin_BL1K, x2 * cos_BL1K + x1 * sin_BL1K], axis=-1)
  return out.astype(x_BLHK.dtype)


def apply_rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float,
               scaling: Llama3Scaling | None = None, table_len: int | None = None) -> jax.Array:
  """Rotates the last axis of `x_BLHK` [B, L, heads, head_dim] by its positions."""
  return rotate(x_BLHK, *sin_cos(positions_BL, x_BLHK.shape[-1], theta, scaling, table_len))
