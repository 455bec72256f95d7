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


# The chunk's three products are 2-D dots over the flattened [B * c] positions:
# XLA:CPU runs them faster than the 3-D einsums, above all the head's
# gradient, which as an einsum contracts two axes (see model.layers.matmul).


def _chunk_logits(x_BcD: jax.Array, head_DV: jax.Array, logit_scale: float) -> jax.Array:
  batch, chunk, d = x_BcD.shape
  logits = jnp.dot(x_BcD.reshape(batch * chunk, d), head_DV, preferred_element_type=jnp.float32)
  logits_BcV = logits.reshape(batch, chunk, head_DV.shape[1])
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
    rows, (d_model, vocab) = x_BcD.shape[0] * x_BcD.shape[1], head_DV.shape
    x_RD = x_BcD.reshape(rows, d_model)
    dlogits_RV = [d.reshape(rows, vocab) for d in dlogits]
    dx = [jnp.dot(d.astype(head_DV.dtype), head_DV.T, preferred_element_type=jnp.float32)
          .astype(x_BcD.dtype).reshape(x_BcD.shape) for d in dlogits_RV]
    dhead = [jnp.dot(x_RD.T, d.astype(x_BcD.dtype), preferred_element_type=jnp.float32)
             for d in dlogits_RV]
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


# Preference pairs: reward models and DPO.
#
# A preference batch holds one pair per (row, segment): the chosen and the
# rejected response share a row's `segment_ids`/`positions` but sit in two
# token fields, so they are two forward passes and never attend to each other
# (data_pipeline/preferences.py). Per-pair quantities below are arrays over
# P = B * L slots, slot `row * L + segment`; a slot that holds no pair has
# weight 0. That is exact for packed and for right-padded rows alike.


def pair_ids(segment_ids_BL: jax.Array) -> tuple[jax.Array, int]:
  """(slot of each position's pair, `row * L + segment` [B, L] int32; number of slots B * L)."""
  batch, length = segment_ids_BL.shape
  rows_B1 = jnp.arange(batch, dtype=jnp.int32)[:, None] * length
  return rows_B1 + segment_ids_BL.astype(jnp.int32), batch * length


def segment_sums(values_BL: jax.Array, segment_ids_BL: jax.Array) -> jax.Array:
  """Per-pair sums [B * L] of `values_BL` over each (row, segment)."""
  ids_BL, num = pair_ids(segment_ids_BL)
  return jax.ops.segment_sum(values_BL.reshape(-1), ids_BL.reshape(-1), num_segments=num)


def last_token_values(values_BL: jax.Array, mask_BL: jax.Array,
                      segment_ids_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The value at the last masked-in position of each (row, segment), and whether there is one.

  With a response mask (1 on the response tokens and its `<|end|>`), that is
  the end-of-turn token: a reward model's score is read there, never at
  padding after it nor at the next segment's first token. Returns
  (values [B * L] float32, present [B * L] bool).
  """
  ids_BL, num = pair_ids(segment_ids_BL)
  mask_BL = mask_BL.astype(bool)
  columns_BL = jnp.broadcast_to(jnp.arange(values_BL.shape[1], dtype=jnp.int32), values_BL.shape)
  last_P = jax.ops.segment_max(jnp.where(mask_BL, columns_BL, -1).reshape(-1),
                               ids_BL.reshape(-1), num_segments=num)
  is_last_BL = mask_BL & (columns_BL == last_P[ids_BL])
  values_P = jax.ops.segment_sum(jnp.where(is_last_BL, values_BL, 0).astype(jnp.float32).reshape(-1),
                                 ids_BL.reshape(-1), num_segments=num)
  return values_P, last_P >= 0


def token_log_probs(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
  """log p(targets[t] | tokens <= t) [B, L] in float32 (weight them with next_token_targets)."""
  logits_BLV = logits_BLV.astype(jnp.float32)
  target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  return target_logit_BL - jax.nn.logsumexp(logits_BLV, axis=-1)


def bradley_terry(chosen_P: jax.Array, rejected_P: jax.Array, weights_P: jax.Array,
                  margin_P: jax.Array | None = None, centering: float = 0.0
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reward-model loss over pairs: `-log σ(r_c − r_r − margin)` + `centering · (r_c + r_r)²`.

  The margin (how much better chosen is, when the data says) must be beaten
  before the pair stops pulling (Llama 2's margin loss); the centring term
  keeps rewards near 0, where a reward model's scale is otherwise free
  (Eisenstein et al. 2023). Returns (sum of weighted losses, sums): 'loss'
  (the Bradley-Terry part), 'centering', 'accuracy' (r_c > r_r), 'margin'
  (r_c − r_r), 'reward_mean' and 'reward_sq' (per pair, the mean of both
  rewards and of their squares) and 'count' (pairs).
  """
  w_P = weights_P.astype(jnp.float32)
  difference_P = chosen_P - rejected_P
  shifted_P = difference_P if margin_P is None else difference_P - margin_P
  nll = -jnp.sum(w_P * jax.nn.log_sigmoid(shifted_P))
  center = centering * jnp.sum(w_P * jnp.square(chosen_P + rejected_P))
  sums = {
      'loss': nll, 'centering': center,
      'accuracy': jnp.sum(w_P * (difference_P > 0)),
      'margin': jnp.sum(w_P * difference_P),
      'reward_mean': jnp.sum(w_P * (chosen_P + rejected_P) / 2),
      'reward_sq': jnp.sum(w_P * (jnp.square(chosen_P) + jnp.square(rejected_P)) / 2),
      'count': jnp.sum(w_P),
  }
  return nll + center, sums


def dpo(policy_chosen_P: jax.Array, policy_rejected_P: jax.Array,
        reference_chosen_P: jax.Array, reference_rejected_P: jax.Array, weights_P: jax.Array,
        *, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = 'sigmoid',
        chosen_tokens_P: jax.Array | None = None, rejected_tokens_P: jax.Array | None = None,
        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DPO over pairs of response log-probabilities (sums over response tokens).

  With h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)):
    'sigmoid' (DPO, Rafailov et al. 2023): −log σ(β h); with label_smoothing
      ε (cDPO: a fraction ε of the labels may be flipped)
      −(1 − ε) log σ(β h) − ε log σ(−β h);
    'ipo' (Azar et al. 2023): (h' − 1 / (2β))², where h' uses the log-ratios
      averaged per response token (`chosen_tokens_P`, `rejected_tokens_P`), so
      long responses do not dominate; β plays IPO's τ.
  Returns (sum of weighted losses, sums) with the metrics TRL users read, per
  pair: 'rewards_chosen' / 'rewards_rejected' (the implicit rewards
  β · log-ratio), 'rewards_margin', 'rewards_accuracy' (chosen's implicit
  reward above rejected's), 'logps_chosen' / 'logps_rejected' (the policy's
  summed log-probs), 'loss' and 'count' (pairs).
  """
  w_P = weights_P.astype(jnp.float32)
  ratio_chosen_P = policy_chosen_P - reference_chosen_P
  ratio_rejected_P = policy_rejected_P - reference_rejected_P
  if loss_type == 'sigmoid':
    h_P = ratio_chosen_P - ratio_rejected_P
    losses_P = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_P)
                - label_smoothing * jax.nn.log_sigmoid(-beta * h_P))
  elif loss_type == 'ipo':
    if chosen_tokens_P is None or rejected_tokens_P is None:
      raise ValueError('the IPO loss needs the response token counts.')
    h_P = (ratio_chosen_P / jnp.maximum(chosen_tokens_P, 1)
           - ratio_rejected_P / jnp.maximum(rejected_tokens_P, 1))
    losses_P = jnp.square(h_P - 1.0 / (2.0 * beta))
  else:
    raise ValueError(f"loss_type={loss_type!r} is not 'sigmoid' or 'ipo'.")
  total = jnp.sum(w_P * losses_P)
  rewards_chosen_P = beta * jax.lax.stop_gradient(ratio_chosen_P)
  rewards_rejected_P = beta * jax.lax.stop_gradient(ratio_rejected_P)
  sums = {
      'loss': total,
      'rewards_chosen': jnp.sum(w_P * rewards_chosen_P),
      'rewards_rejected': jnp.sum(w_P * rewards_rejected_P),
      'rewards_margin': jnp.sum(w_P * (rewards_chosen_P - rewards_rejected_P)),
      'rewards_accuracy': jnp.sum(w_P * (rewards_chosen_P > rewards_rejected_P)),
      'logps_chosen': jnp.sum(w_P * jax.lax.stop_gradient(policy_chosen_P)),
      'logps_rejected': jnp.sum(w_P * jax.lax.stop_gradient(policy_rejected_P)),
      'count': jnp.sum(w_P),
  }
  return total, sums


# ----------------------------------------------------------------------------
# Reinforcement learning (train/rl.py): advantages, the PPO and GRPO
# objectives and the KL estimators. Per-token arrays are [B, N] over the
# response tokens (N = generated columns); `mask_BN` is 1 on the tokens that
# count. Functions return per-token values; `aggregate` turns them into the
# (sum, count) pair of the contract above, in the way a config chooses.
# ----------------------------------------------------------------------------

# Log-ratios are clamped to +-this before any exp: exp(20) ~ 5e8 is finite in
# float32, and a token whose policy and reference differ by more than e^20 in
# probability is a token the KL term should push hard on anyway.
MAX_LOG_RATIO = 20.0
AGGREGATIONS = ('token', 'sequence', 'constant')


def gae(rewards_BN: jax.Array, values_BN: jax.Array, mask_BN: jax.Array, *,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation as a reverse `lax.scan` over the tokens.

  rewards_BN: the reward given after each token; values_BN: V of the state
  each token was emitted from. After the last masked-in token of a row the
  episode ends (value 0). Returns (advantages_BN, returns_BN =
  advantages + values), both 0 where `mask_BN` is 0:

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
  """
  m_BN = mask_BN.astype(jnp.float32)
  rewards_BN, values_BN = rewards_BN.astype(jnp.float32), values_BN.astype(jnp.float32)
  next_m_BN = jnp.concatenate([m_BN[:, 1:], jnp.zeros_like(m_BN[:, :1])], axis=1)
  next_values_BN = jnp.concatenate([values_BN[:, 1:], jnp.zeros_like(values_BN[:, :1])], axis=1)
  deltas_BN = (rewards_BN + gamma * next_values_BN * next_m_BN - values_BN) * m_BN

  def step(next_advantage_B, xs):
    delta_B, next_m_B, m_B = xs
    advantage_B = (delta_B + gamma * lam * next_m_B * next_advantage_B) * m_B
    return advantage_B, advantage_B

  _, advantages_NB = jax.lax.scan(step, jnp.zeros_like(m_BN[:, 0]),
                                  (deltas_BN.T, next_m_BN.T, m_BN.T), reverse=True)
  advantages_BN = advantages_NB.T
  return advantages_BN, (advantages_BN + values_BN) * m_BN


def masked_mean(x_BN: jax.Array, mask_BN: jax.Array) -> jax.Array:
  m_BN = mask_BN.astype(jnp.float32)
  return jnp.sum(x_BN * m_BN) / jnp.maximum(jnp.sum(m_BN), 1.0)


def whiten(x_BN: jax.Array, mask_BN: jax.Array, eps: float = 1e-8) -> jax.Array:
  """(x - mean) / std over the masked-in entries (population std); 0 elsewhere."""
  m_BN = mask_BN.astype(jnp.float32)
  mean = masked_mean(x_BN, m_BN)
  var = masked_mean(jnp.square(x_BN - mean), m_BN)
  return (x_BN - mean) * jax.lax.rsqrt(var + eps) * m_BN


def clipped_surrogate(logp_BN: jax.Array, old_logp_BN: jax.Array, advantages_BN: jax.Array, *,
                      clip_eps: float = 0.2, clip_eps_high: float | None = None
                      ) -> dict[str, jax.Array]:
  """PPO's clipped policy objective per token, as a loss (to minimise).

    ratio = exp(logp - old_logp)
    loss  = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))

  eps_high defaults to eps; a larger one (DAPO's "clip higher") lets rare
  tokens with A > 0 grow further. Returns per-token 'loss', 'clipped' (1 where
  the clipped term is the larger, i.e. the gradient is cut) and 'approx_kl'
  ((ratio - 1) - log ratio, the k3 estimate of KL(old || new), >= 0).
  """
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  log_ratio_BN = jnp.clip(logp_BN - old_logp_BN, -MAX_LOG_RATIO, MAX_LOG_RATIO)
  ratio_BN = jnp.exp(log_ratio_BN)
  unclipped_BN = -advantages_BN * ratio_BN
  clipped_BN = -advantages_BN * jnp.clip(ratio_BN, 1.0 - clip_eps, 1.0 + eps_high)
  return {'loss': jnp.maximum(unclipped_BN, clipped_BN),
          'clipped': (clipped_BN > unclipped_BN).astype(jnp.float32),
          'approx_kl': (ratio_BN - 1.0) - log_ratio_BN}


def clipped_value_loss(values_BN: jax.Array, old_values_BN: jax.Array, returns_BN: jax.Array, *,
                       clip: float = 0.2) -> dict[str, jax.Array]:
  """PPO's value loss per token: 0.5 * max((V - R)^2, (V_clipped - R)^2).

  V_clipped = old_V + clip(V - old_V, -clip, clip) keeps the value function
  from moving further than `clip` from the one that computed the advantages.
  'clipped' is 1 where the clipped term is the larger.
  """
  clipped_values_BN = old_values_BN + jnp.clip(values_BN - old_values_BN, -clip, clip)
  loss_BN = jnp.square(values_BN - returns_BN)
  clipped_loss_BN = jnp.square(clipped_values_BN - returns_BN)
  return {'loss': 0.5 * jnp.maximum(loss_BN, clipped_loss_BN),
          'clipped': (clipped_loss_BN > loss_BN).astype(jnp.float32)}


def entropy(logits_BNV: jax.Array) -> jax.Array:
  """Entropy (nats) of each position's softmax, float32: -sum p log p."""
  logp_BNV = jax.nn.log_softmax(logits_BNV.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp_BNV) * logp_BNV, axis=-1)


def kl_estimate(logp_BN: jax.Array, ref_logp_BN: jax.Array, kind: str = 'k3') -> jax.Array:
  """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs.

  With r = log pi(x) - log ref(x), clamped to +-MAX_LOG_RATIO (so no exp can
  overflow, and a log-ratio of +-50 still gives a finite value):
    k1 = r                       unbiased, can be negative per token;
    k3 = exp(-r) - 1 + r         unbiased, always >= 0, lower variance
  (Schulman, "Approximating KL divergence").
  """
  r_BN = jnp.clip(logp_BN - ref_logp_BN, -MAX_LOG_RATIO, MAX_LOG_RATIO)
  if kind == 'k1':
    return r_BN
  if kind == 'k3':
    return jnp.exp(-r_BN) - 1.0 + r_BN
  raise ValueError(f'kl kind {kind!r} is not one of k1, k3.')


def group_advantages(rewards_B: jax.Array, group_size: int, *, normalize: str = 'std',
                     eps: float = 1e-4) -> jax.Array:
  """GRPO's advantage of each completion relative to its prompt's group.

  rewards_B: B = prompts x group_size, the group_size completions of a prompt
  consecutive. normalize='std': (r - mean) / (std + eps) (population std);
  'mean': r - mean (Dr. GRPO: no division, so easy and hard prompts weigh the
  same). A group whose rewards are all equal gets 0 either way: it carries no
  signal about which completion is better.
  """
  rewards_PG = rewards_B.astype(jnp.float32).reshape(-1, group_size)
  centred_PG = rewards_PG - jnp.mean(rewards_PG, axis=1, keepdims=True)
  if normalize == 'std':
    centred_PG = centred_PG / (jnp.std(rewards_PG, axis=1, keepdims=True) + eps)
  elif normalize != 'mean':
    raise ValueError(f'normalize={normalize!r} is not one of std, mean.')
  return centred_PG.reshape(-1)


def aggregate(values_BN: jax.Array, mask_BN: jax.Array, mode: str = 'token'
              ) -> tuple[jax.Array, jax.Array]:
  """(sum, count) of per-token values, whose ratio is the loss; see AGGREGATIONS.

  'token': every token of the batch weighs the same (sum over tokens / number
    of tokens; DAPO): long answers count more.
  'sequence': the mean over each row's tokens, then over rows (the original
    GRPO): every answer weighs the same, so a token of a short answer weighs
    more than one of a long answer.
  'constant': the sum over tokens / (rows x N columns) (Dr. GRPO): no length
    normalisation at all, hence no length bias.
  Rows with no masked-in token count for nothing under 'sequence'.
  """
  m_BN = mask_BN.astype(jnp.float32)
  masked_BN = values_BN * m_BN
  if mode == 'token':
    return jnp.sum(masked_BN), jnp.sum(m_BN)
  lengths_B = jnp.sum(m_BN, axis=1)
  if mode == 'sequence':
    return (jnp.sum(jnp.sum(masked_BN, axis=1) / jnp.maximum(lengths_B, 1.0)),
            jnp.sum((lengths_B > 0).astype(jnp.float32)))
  if mode == 'constant':
    return jnp.sum(masked_BN), jnp.asarray(float(values_BN.size), jnp.float32)
  raise ValueError(f'aggregation {mode!r} is not one of {AGGREGATIONS}.')


def grpo_loss(logp_BN: jax.Array, old_logp_BN: jax.Array, ref_logp_BN: jax.Array | None,
              advantages_B: jax.Array, mask_BN: jax.Array, *, clip_eps: float = 0.2,
              clip_eps_high: float | None = None, beta: float = 0.04,
              aggregation: str = 'token') -> tuple[jax.Array, dict[str, jax.Array]]:
  """GRPO: the clipped surrogate with each sequence's advantage on all its tokens,
  plus beta * k3 KL to the reference, aggregated per `aggregation`.

  ref_logp_BN may be None when beta == 0 (no reference at all). Returns
  (sum_loss, aux_sums) with aux 'count' (the aggregation's count) and sums of
  the per-token 'policy_loss', 'kl', 'clip_fraction', 'approx_kl' aggregated
  the same way.
  """
  surrogate = clipped_surrogate(logp_BN, old_logp_BN, advantages_B[:, None],
                                clip_eps=clip_eps, clip_eps_high=clip_eps_high)
  per_token_BN = surrogate['loss']
  if beta:
    kl_BN = kl_estimate(logp_BN, ref_logp_BN, 'k3')
    per_token_BN = per_token_BN + beta * kl_BN
  else:
    kl_BN = jnp.zeros_like(per_token_BN)
  total, count = aggregate(per_token_BN, mask_BN, aggregation)
  aux = {'count': count}
  for name, value_BN in (('policy_loss', surrogate['loss']), ('kl', kl_BN),
                         ('clip_fraction', surrogate['clipped']),
                         ('approx_kl', surrogate['approx_kl'])):
    aux[name] = aggregate(value_BN, mask_BN, aggregation)[0]
  return total, aux
