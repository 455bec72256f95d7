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
