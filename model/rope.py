"""Rotary position embeddings (RoPE) at arbitrary, per-token positions.

Feature pairs (i, i + head_dim/2) are rotated by the angle
`position * theta**(-2i/head_dim)`, so the dot product of a rotated query and
key depends on their positions only through the difference. Positions come from
the caller (they restart at 0 for every packed document).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_angles(positions_BL: jax.Array, head_dim: int, theta: float) -> jax.Array:
  """Angles [B, L, head_dim/2] in float32."""
  fraction = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta ** fraction)
  return positions_BL.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
  """Rotates the last axis of `x_BLHK` [B, L, heads, head_dim] by its positions."""
  angles_BLK = rope_angles(positions_BL, x_BLHK.shape[-1], theta)[:, :, None, :]
  sin, cos = jnp.sin(angles_BLK), jnp.cos(angles_BLK)
  # float32 for the rotation: bfloat16 angles lose the position at long contexts.
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BLHK.dtype)
