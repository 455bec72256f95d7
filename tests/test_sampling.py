"""Sampling statistics: temperature, top-k, top-p and their combination."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from model import sampling

NUM_SAMPLES = 40_000
# Logits of a fixed small distribution with clearly separated probabilities.
LOGITS_V = np.log(np.array([0.30, 0.22, 0.16, 0.12, 0.09, 0.06, 0.04, 0.01]))


def _draw(config: sampling.SamplingConfig, logits_V=LOGITS_V, seed=0) -> np.ndarray:
  logits_BV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (NUM_SAMPLES, len(logits_V)))
  return np.asarray(sampling.sample(jax.random.key(seed), logits_BV, config))


def _softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x[np.isfinite(x)].max())
  return e / e.sum()


def _assert_matches(tokens: np.ndarray, probs_V: np.ndarray):
  """Chi-square goodness of fit over the support, plus no mass off the support."""
  counts_V = np.bincount(tokens, minlength=len(probs_V))
  support = probs_V > 0
  assert counts_V[~support].sum() == 0, f'sampled outside the support: {counts_V}'
  expected = probs_V[support] * len(tokens)
  if support.sum() == 1:
    return
  chi2, pvalue = stats.chisquare(counts_V[support], expected)
  # Deterministic seed; p-value 1e-4 only fails on a real mismatch.
  assert pvalue > 1e-4, f'chi2={chi2:.1f} p={pvalue:.2g} counts={counts_V} expected={expected}'
  tv = 0.5 * np.abs(counts_V / len(tokens) - probs_V).sum()
  assert tv < 0.01, tv


def test_temperature_one_matches_distribution():
  _assert_matches(_draw(sampling.SamplingConfig()), _softmax(LOGITS_V))


def test_temperature_scales_logits():
  tokens = _draw(sampling.SamplingConfig(temperature=2.0))
  _assert_matches(tokens, _softmax(LOGITS_V / 2.0))
  # And it is not the untempered distribution.
  counts = np.bincount(tokens, minlength=8)
  assert stats.chisquare(counts, _softmax(LOGITS_V) * NUM_SAMPLES).pvalue < 1e-6


def test_top_k_never_outside_k_most_likely_and_renormalises():
  rng = np.random.default_rng(0)
  for k in (1, 3, 5):
    logits_V = rng.normal(size=8) * 2
    tokens = _draw(sampling.SamplingConfig(top_k=k), logits_V, seed=k)
    allowed = set(np.argsort(-logits_V)[:k].tolist())
    assert set(np.unique(tokens).tolist()) <= allowed
    probs_V = np.where(np.isin(np.arange(8), list(allowed)), _softmax(logits_V), 0.0)
    _assert_matches(tokens, probs_V / probs_V.sum())


def _nucleus(probs_V: np.ndarray, p: float) -> set[int]:
  order = np.argsort(-probs_V)
  kept, mass = [], 0.0
  for i in order:
    kept.append(int(i))
    mass += probs_V[i]
    if mass >= p:
      break
  return set(kept)


@pytest.mark.parametrize('p', [0.05, 0.5, 0.7, 0.9])
def test_top_p_never_outside_nucleus_and_renormalises(p):
  probs_V = _softmax(LOGITS_V)
  nucleus = _nucleus(probs_V, p)
  tokens = _draw(sampling.SamplingConfig(top_p=p))
  assert set(np.unique(tokens).tolist()) <= nucleus
  kept = np.where(np.isin(np.arange(8), list(nucleus)), probs_V, 0.0)
  _assert_matches(tokens, kept / kept.sum())


def test_top_p_boundary_is_smallest_set_reaching_p():
  # Cumulative mass of the sorted distribution: .30, .52, .68, .80 ...
  logits_BV = jnp.asarray(LOGITS_V, jnp.float32)[None]
  def kept(p):
    return int(np.isfinite(np.asarray(sampling.apply_top_p(logits_BV, p))).sum())
  assert kept(0.01) == 1      # the top-1 token is always kept
  assert kept(0.29) == 1      # 0.30 >= 0.29: the top-1 alone reaches p
  assert kept(0.31) == 2      # 0.30 < 0.31 <= 0.52
  assert kept(0.53) == 3      # 0.52 < 0.53 <= 0.68
  assert kept(0.79) == 4
  assert kept(0.999) == 8
  assert kept(1.0) == 8


def test_combination_order_matches_numpy_reference():
  rng = np.random.default_rng(1)
  logits_BV = rng.normal(size=(16, 50)).astype(np.float32) * 3
  config = sampling.SamplingConfig(temperature=0.7, top_k=10, top_p=0.8)
  got = np.asarray(sampling.process_logits(jnp.asarray(logits_BV), config))
  for row, logits_V in enumerate(logits_BV):
    scaled = logits_V / 0.7
    top = np.argsort(-scaled)[:10]
    probs = np.zeros(50)
    probs[top] = _softmax(scaled[top])        # top-k renormalised, then the nucleus on that
    nucleus = _nucleus(probs, 0.8)
    want = np.where(np.isin(np.arange(50), list(nucleus)), scaled, -np.inf)
    np.testing.assert_allclose(got[row], want, rtol=1e-6)


def test_greedy_and_temperature_zero_take_argmax():
  logits_BV = jax.random.normal(jax.random.key(3), (32, 100))
  want = np.argmax(np.asarray(logits_BV), axis=-1)
  for config in (sampling.SamplingConfig(greedy=True), sampling.SamplingConfig(temperature=0.0)):
    got = sampling.sample(jax.random.key(0), logits_BV, config)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_logprobs_raw_model_and_sampling_distribution():
  logits_BV = jax.random.normal(jax.random.key(4), (64, 20)) * 2
  config = sampling.SamplingConfig(temperature=0.5, top_k=4)
  tokens, model_lp, sample_lp = sampling.sample_with_logprobs(jax.random.key(5), logits_BV, config)
  tokens = np.asarray(tokens)
  raw = np.asarray(jax.nn.log_softmax(logits_BV))
  np.testing.assert_allclose(np.asarray(model_lp), raw[np.arange(64), tokens], rtol=1e-5)
  processed = np.asarray(jax.nn.log_softmax(sampling.process_logits(logits_BV, config)))
  np.testing.assert_allclose(np.asarray(sample_lp), processed[np.arange(64), tokens], rtol=1e-5)
  _, _, greedy_lp = sampling.sample_with_logprobs(
      jax.random.key(5), logits_BV, sampling.SamplingConfig(greedy=True))
  np.testing.assert_array_equal(np.asarray(greedy_lp), 0.0)


def test_bad_knobs_are_rejected():
  with pytest.raises(ValueError, match='top_p'):
    sampling.SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match='top_k'):
    sampling.SamplingConfig(top_k=-1)
  with pytest.raises(ValueError, match='temperature'):
    sampling.SamplingConfig(temperature=-1.0)


def test_categorical_across_blocks_matches_distribution():
  # 45 tokens in blocks of 8 (the last one partial); a whole block and scattered
  # tokens have probability zero and must never be drawn. More draws than the
  # other tests: the total-variation bound needs them with this many tokens.
  rng = np.random.default_rng(3)
  logits_V = rng.normal(size=45)
  logits_V[8:16] = -np.inf
  logits_V[[0, 5, 30, 44]] = -np.inf
  logits_BV = jnp.broadcast_to(jnp.asarray(logits_V, jnp.float32), (5 * NUM_SAMPLES, 45))
  tokens = jax.jit(sampling.categorical, static_argnums=2)(jax.random.key(0), logits_BV, 8)
  _assert_matches(np.asarray(tokens), _softmax(logits_V))
