"""Next-token targets for packed rows and the cross-entropy that every stage uses.

Losses return SUMS and a token count, never means: gradient accumulation and
multi-device reduction then average over all target tokens of the global
batch exactly, instead of averaging per-micro-batch means.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np


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


def chunked_cross_entropy(hidden_BLD: jax.Array, head_DV: jax.Array, targets_BL: jax.Array,
                          weights_BL: jax.Array, z_loss: float = 0.0, chunk_size: int = 256,
                          logit_scale: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`cross_entropy(logit_scale * hidden @ head, ...)` without the [B, L, V] logits.

  The positions are cut into chunks of `chunk_size` (the last one padded with
  weight 0), and a `lax.scan` over them forms one chunk's [B, chunk, V]
  float32 logits at a time. The gradient is computed in the same pass
  (a custom VJP): per chunk, dlogits = weights * (softmax - onehot) (+ the
  z-loss term) gives the hidden states' gradient and adds into the head's,
  so the backward pass only scales what the forward pass stored and no
  logits are recomputed -- the same three matmuls as the plain loss, and the
  peak memory of the head is one chunk's. Without differentiation only the
  sums are computed.

  hidden_BLD: final hidden states (compute dtype); head_DV: the readout in the
  compute dtype (the embedding transposed when tied); logit_scale: multiplies
  the logits (the tied 1/sqrt(d) scale). Returns the same three sums as
  `cross_entropy`.
  """
  batch, length, _ = hidden_BLD.shape
  num_chunks = -(-length // chunk_size)
  pad = num_chunks * chunk_size - length
  weights_BL = weights_BL.astype(jnp.float32)
  if pad:
    hidden_BLD = jnp.pad(hidden_BLD, ((0, 0), (0, pad), (0, 0)))
    targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
    weights_BL = jnp.pad(weights_BL, ((0, 0), (0, pad)))

  def chunks(x):  # [B, C * c, ...] -> [C, B, c, ...]: the scan runs over C.
    x = x.reshape(batch, num_chunks, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  sum_nll, sum_z = _chunked_xent(chunks(hidden_BLD), head_DV, chunks(targets_BL.astype(jnp.int32)),
                                 chunks(weights_BL), float(z_loss), float(logit_scale))
  return sum_nll, sum_z, jnp.sum(weights_BL)


def _chunk_logits(x_BcD: jax.Array, head_DV: jax.Array, logit_scale: float) -> jax.Array:
  logits_BcV = jnp.einsum('BcD,DV->BcV', x_BcD, head_DV, preferred_element_type=jnp.float32)
  return logits_BcV * logit_scale if logit_scale != 1.0 else logits_BcV


def _chunk_sums(x_BcD, head_DV, targets_Bc, weights_Bc, z_loss, logit_scale):
  """(nll sum, z sum, log_z, logits) of one chunk."""
  logits_BcV = _chunk_logits(x_BcD, head_DV, logit_scale)
  log_z_Bc = jax.nn.logsumexp(logits_BcV, axis=-1)
  target_Bc = jnp.take_along_axis(logits_BcV, targets_Bc[..., None], axis=-1)[..., 0]
  nll = jnp.sum((log_z_Bc - target_Bc) * weights_Bc)
  z = z_loss * jnp.sum(jnp.square(log_z_Bc) * weights_Bc)
  return nll, z, log_z_Bc, logits_BcV


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _chunked_xent(x_CBcD, head_DV, targets_CBc, weights_CBc, z_loss, logit_scale):
  def body(carry, xs):
    nll, z, _, _ = _chunk_sums(*xs[:1], head_DV, *xs[1:], z_loss, logit_scale)
    return (carry[0] + nll, carry[1] + z), None

  zero = jnp.zeros((), jnp.float32)
  (sum_nll, sum_z), _ = jax.lax.scan(body, (zero, zero), (x_CBcD, targets_CBc, weights_CBc))
  return sum_nll, sum_z


def _chunked_xent_fwd(x_CBcD, head_DV, targets_CBc, weights_CBc, z_loss, logit_scale):
  """The sums and, per output, the gradients of the inputs (stored for the backward)."""
  with_z = z_loss != 0.0

  def body(carry, xs):
    x_BcD, targets_Bc, weights_Bc = xs
    nll, z, log_z_Bc, logits_BcV = _chunk_sums(x_BcD, head_DV, targets_Bc, weights_Bc, z_loss,
                                               logit_scale)
    probs_BcV = jnp.exp(logits_BcV - log_z_Bc[..., None])
    onehot_BcV = jnp.arange(logits_BcV.shape[-1]) == targets_Bc[..., None]
    # d(nll)/d(logits), and d(z)/d(logits) = 2 z_loss log_z softmax, per token.
    dlogits = [(probs_BcV - onehot_BcV) * (weights_Bc * logit_scale)[..., None]]
    if with_z:
      dlogits.append(probs_BcV * (2.0 * z_loss * logit_scale * log_z_Bc * weights_Bc)[..., None])
    dx = [jnp.einsum('BcV,DV->BcD', d.astype(head_DV.dtype), head_DV,
                     preferred_element_type=jnp.float32).astype(x_BcD.dtype) for d in dlogits]
    dhead = [jnp.einsum('BcD,BcV->DV', x_BcD, d.astype(x_BcD.dtype),
                        preferred_element_type=jnp.float32) for d in dlogits]
    sums, dhead_acc = carry
    carry = ((sums[0] + nll, sums[1] + z), tuple(a + b for a, b in zip(dhead_acc, dhead)))
    return carry, tuple(dx)

  zero = jnp.zeros((), jnp.float32)
  dhead0 = tuple(jnp.zeros(head_DV.shape, jnp.float32) for _ in range(1 + with_z))
  ((sum_nll, sum_z), dhead), dx = jax.lax.scan(
      body, ((zero, zero), dhead0), (x_CBcD, targets_CBc, weights_CBc))
  dhead = tuple(d.astype(head_DV.dtype) for d in dhead)
  residuals = (dx, dhead, targets_CBc, weights_CBc)
  return (sum_nll, sum_z), residuals


def _chunked_xent_bwd(z_loss, logit_scale, residuals, cotangents):
  del logit_scale
  dx, dhead, targets_CBc, weights_CBc = residuals
  g_nll, g_z = cotangents
  gs = (g_nll, g_z) if z_loss != 0.0 else (g_nll,)
  dx_CBcD = sum(g.astype(d.dtype) * d for g, d in zip(gs, dx))
  dhead_DV = sum(g.astype(d.dtype) * d for g, d in zip(gs, dhead))
  # Integer targets get a float0 cotangent; the weights are treated as constants.
  dtargets = np.zeros(targets_CBc.shape, jax.dtypes.float0)
  return dx_CBcD, dhead_DV, dtargets, jnp.zeros_like(weights_CBc)


_chunked_xent.defvjp(_chunked_xent_fwd, _chunked_xent_bwd)
