"""Logit processing and token sampling: temperature, top-k, top-p, greedy.

Pure functions over `[B, V]` float logits. Processing follows the usual order:
temperature first, then top-k, then top-p, so top-p's nucleus is measured on
the distribution after temperature and top-k. Removed tokens get `-inf`, which
`categorical` and `jax.nn.log_softmax` treat as probability zero. Draws use
`categorical` (inverse CDF, one uniform per row), not
`jax.random.categorical` (Gumbel noise on every logit): the same
distribution, much less work per decode step on CPU.

The knobs are static Python numbers (they pick which stages run), so a stage
that would do nothing (`top_k=0`, `top_p=1.0`, `temperature=1.0`) costs nothing.
Ties: a token whose logit equals the k-th largest (or the smallest kept nucleus
logit) is kept as well; with float logits ties are rare and the tied tokens are
equally likely, so no choice among them would be more principled.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to turn logits into a token. Hashable, so it can be a static jit argument.

  temperature: divides the logits; 0 means greedy.
  top_k: keep the k most likely tokens; 0 keeps all.
  top_p: keep the smallest set of most likely tokens whose probability sums to
    at least top_p (the top-1 token is always kept); 1.0 keeps all.
  greedy: take the most likely token (argmax of the raw logits).
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f'temperature must be >= 0, got {self.temperature}')
    if self.top_k < 0:
      raise ValueError(f'top_k must be >= 0 (0 disables it), got {self.top_k}')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0.0


def apply_temperature(logits_BV: jax.Array, temperature: float) -> jax.Array:
  """Scales logits by 1/temperature (temperature > 0)."""
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0 here (use greedy for 0), got {temperature}')
  if temperature == 1.0:
    return logits_BV
  return logits_BV / jnp.asarray(temperature, logits_BV.dtype)


def apply_top_k(logits_BV: jax.Array, k: int) -> jax.Array:
  """Masks all but the k largest logits of each row to -inf; k=0 keeps all."""
  vocab = logits_BV.shape[-1]
  if k <= 0 or k >= vocab:
    return logits_BV
  # lax.top_k is a partial sort: much cheaper than a full sort over a large vocab.
  kth_largest_B1 = jax.lax.top_k(logits_BV, k)[0][..., -1:]
  return jnp.where(logits_BV >= kth_largest_B1, logits_BV, NEG_INF)


def apply_top_p(logits_BV: jax.Array, p: float) -> jax.Array:
  """Keeps the nucleus: the smallest prefix of tokens (most likely first) whose
  probabilities sum to >= p. The most likely token is always kept."""
  if p >= 1.0:
    return logits_BV
  sorted_BV = jnp.sort(logits_BV, axis=-1)[..., ::-1]
  probs_BV = jax.nn.softmax(sorted_BV.astype(jnp.float32), axis=-1)
  # A sorted token is in the nucleus iff the mass strictly before it is < p;
  # the first token has zero mass before it, so it is always kept.
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  keep_BV = mass_before_BV < p
  # The smallest kept logit is the threshold in the original (unsorted) order.
  threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV >= threshold_B1, logits_BV, NEG_INF)


def categorical(rng: jax.Array, logits_BV: jax.Array, block: int = 128) -> jax.Array:
  """One draw per row from softmax(logits_BV) (int32 [B]), with one uniform per row.

  `jax.random.categorical` draws B x V Gumbel variables (random bits and two
  logarithms per vocabulary entry), which dominates a decode step on CPU at a
  large batch. This inverts the CDF instead: a uniform u in [0, total mass)
  picks the block of `block` tokens whose cumulative mass passes u, then the
  token within that block, so the cumulative sums are short ([B, V / block]
  and [B, block]). Tokens of probability zero (-inf logits) are never drawn.
  """
  batch, vocab = logits_BV.shape
  logits_BV = logits_BV.astype(jnp.float32)
  probs_BV = jnp.exp(logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True))
  num_blocks = -(-vocab // block)
  probs_BV = jnp.pad(probs_BV, ((0, 0), (0, num_blocks * block - vocab)))
  probs_BCb = probs_BV.reshape(batch, num_blocks, block)
  cum_BC = jnp.cumsum(jnp.sum(probs_BCb, axis=-1), axis=-1)
  u_B = jax.random.uniform(rng, (batch,), jnp.float32) * cum_BC[:, -1]
  block_B = _first_above(cum_BC, u_B, probs_BCb.sum(-1) > 0)
  before_B = jnp.where(block_B > 0, _take(cum_BC, jnp.maximum(block_B - 1, 0)), 0.0)
  within_Bb = jnp.take_along_axis(probs_BCb, block_B[:, None, None], axis=1)[:, 0]
  index_B = _first_above(jnp.cumsum(within_Bb, axis=-1), u_B - before_B, within_Bb > 0)
  return (block_B * block + index_B).astype(jnp.int32)


def _first_above(cum_BN: jax.Array, u_B: jax.Array, positive_BN: jax.Array) -> jax.Array:
  """The first n with cum[n] > u, among entries of positive mass.

  Rounding can leave u at or past the last cumulative sum; the last entry of
  positive mass is taken then, never one of zero mass.
  """
  size = cum_BN.shape[-1]
  first_B = jnp.sum(cum_BN <= u_B[:, None], axis=-1)
  last_positive_B = size - 1 - jnp.argmax(positive_BN[:, ::-1], axis=-1)
  return jnp.minimum(first_B, last_positive_B).astype(jnp.int32)


def process_logits(logits_BV: jax.Array, config: SamplingConfig) -> jax.Array:
  """Temperature -> top-k -> top-p. Returns the logits of the sampling distribution.

  Under greedy the sampling distribution is the point mass on the argmax; it is
  returned as logits that are 0 there and -inf elsewhere, so that
  `log_softmax(process_logits(...))` is the log-prob under what was sampled.
  """
  logits_BV = logits_BV.astype(jnp.float32)
  if config.is_greedy:
    best_B1 = jnp.argmax(logits_BV, axis=-1)[:, None]
    onehot_BV = jnp.arange(logits_BV.shape[-1])[None, :] == best_B1
    return jnp.where(onehot_BV, 0.0, NEG_INF)
  logits_BV = apply_temperature(logits_BV, config.temperature)
  logits_BV = apply_top_k(logits_BV, config.top_k)
  return apply_top_p(logits_BV, config.top_p)


def sample(rng: jax.Array, logits_BV: jax.Array, config: SamplingConfig) -> jax.Array:
  """Draws one token per row; returns int32 [B]."""
  if config.is_greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  processed_BV = process_logits(logits_BV, config)
  return categorical(rng, processed_BV).astype(jnp.int32)


def sample_with_logprobs(rng: jax.Array, logits_BV: jax.Array, config: SamplingConfig
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Samples a token per row and returns (tokens_B, model_logprob_B, sampling_logprob_B).

  model_logprob: log-prob of the token under the raw model distribution
    (log_softmax of the unprocessed logits) -- what RL and scoring need.
  sampling_logprob: log-prob under the distribution it was actually drawn from
    (after temperature / top-k / top-p; 0 under greedy).
  """
  logits_BV = logits_BV.astype(jnp.float32)
  model_logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
  if config.is_greedy:
    tokens_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return tokens_B, _take(model_logprobs_BV, tokens_B), jnp.zeros_like(tokens_B, jnp.float32)
  if config == SamplingConfig(greedy=config.greedy):
    # Pure sampling from the model: one normalisation serves both log-probs.
    tokens_B = categorical(rng, model_logprobs_BV).astype(jnp.int32)
    model_logprob_B = _take(model_logprobs_BV, tokens_B)
    return tokens_B, model_logprob_B, model_logprob_B
  processed_BV = process_logits(logits_BV, config)
  tokens_B = categorical(rng, processed_BV).astype(jnp.int32)
  sampling_logprob_B = _take(jax.nn.log_softmax(processed_BV, axis=-1), tokens_B)
  return tokens_B, _take(model_logprobs_BV, tokens_B), sampling_logprob_B


def _take(values_BV: jax.Array, index_B: jax.Array) -> jax.Array:
  return jnp.take_along_axis(values_BV, index_B[:, None], axis=-1)[:, 0]
