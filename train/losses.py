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


# ----------------------------------------------------------------------------
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
