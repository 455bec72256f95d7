"""Next-token targets for packed rows and the cross-entropy that every stage uses.

Losses return SUMS and a token count, never means: gradient accumulation and
multi-device reduction then average over all target tokens of the global
batch exactly, instead of averaging per-micro-batch means.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp


def next_token_targets(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """targets[t] = tokens[t+1] where t and t+1 are in the same (non-padding) segment.

  Returns (targets_BL int32, weights_BL float32). The last position of each
  segment, padding (segment 0) and the last column have weight 0. With a
  `loss_mask` field (1 on the tokens to learn, e.g. assistant turns in SFT),
  position t counts only if the token it predicts, t+1, is masked in.
  """
  tokens_BL = batch['tokens']
  segment_ids_BL = batch.get('segment_ids')
  if segment_ids_BL is None:
    segment_ids_BL = jnp.ones_like(tokens_BL)
  targets_BL = jnp.concatenate([tokens_BL[:, 1:], jnp.zeros_like(tokens_BL[:, :1])], axis=1)
  same_segment = (segment_ids_BL[:, 1:] == segment_ids_BL[:, :-1]) & (segment_ids_BL[:, :-1] != 0)
  weights_BL = jnp.concatenate(
      [same_segment, jnp.zeros_like(same_segment[:, :1])], axis=1).astype(jnp.float32)
  loss_mask_BL = batch.get('loss_mask')
  if loss_mask_BL is not None:
    next_mask_BL = jnp.concatenate([loss_mask_BL[:, 1:], jnp.zeros_like(loss_mask_BL[:, :1])],
                                   axis=1)
    weights_BL = weights_BL * next_mask_BL.astype(jnp.float32)
  return targets_BL.astype(jnp.int32), weights_BL


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array,
                  z_loss: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Weighted token cross-entropy in float32.

  Returns (sum of weighted NLL, sum of weighted z-loss terms, sum of weights).
  The z-loss term is `z_loss * logsumexp(logits)**2` (PaLM): it keeps the
  softmax normaliser near 1 so bf16 logits stay well-conditioned.
  """
  logits_BLV = logits_BLV.astype(jnp.float32)
  weights_BL = weights_BL.astype(jnp.float32)
  log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  nll_BL = log_z_BL - target_logit_BL
  sum_loss = jnp.sum(nll_BL * weights_BL)
  sum_z = z_loss * jnp.sum(jnp.square(log_z_BL) * weights_BL)
  return sum_loss, sum_z, jnp.sum(weights_BL)
