"""Golden tests of the RL math in train/losses.py, on hand-built tensors.

Every expected value is computed here by a plain Python loop or by hand, not
by the formula the code uses.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from train import losses


def _hand_gae(rewards, values, mask, gamma, lam):
  out_adv, out_ret = [], []
  for r_row, v_row, m_row in zip(rewards, values, mask):
    n = int(sum(m_row))           # masks are contiguous from column 0
    adv = [0.0] * len(r_row)
    last = 0.0
    for t in reversed(range(n)):
      next_value = v_row[t + 1] if t + 1 < n else 0.0
      delta = r_row[t] + gamma * next_value - v_row[t]
      last = delta + gamma * lam * last
      adv[t] = last
    out_adv.append(adv)
    out_ret.append([a + v if t < n else 0.0 for t, (a, v) in enumerate(zip(adv, v_row))])
  return np.array(out_adv), np.array(out_ret)


@pytest.mark.parametrize('gamma,lam', [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_matches_a_hand_loop(gamma, lam):
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=(3, 5))
  values = rng.normal(size=(3, 5))
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], np.float32)
  adv, ret = losses.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask),
                        gamma=gamma, lam=lam)
  want_adv, want_ret = _hand_gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_by_hand_two_tokens():
  # r = [0, 1], V = [0.5, 0.2], gamma 1, lam 0.5:
  # delta_1 = 1 - 0.2 = 0.8, A_1 = 0.8; delta_0 = 0 + 0.2 - 0.5 = -0.3, A_0 = -0.3 + 0.5*0.8 = 0.1
  adv, ret = losses.gae(jnp.array([[0.0, 1.0, 9.0]]), jnp.array([[0.5, 0.2, 7.0]]),
                        jnp.array([[1, 1, 0]]), gamma=1.0, lam=0.5)
  np.testing.assert_allclose(adv, [[0.1, 0.8, 0.0]], atol=1e-6)
  np.testing.assert_allclose(ret, [[0.6, 1.0, 0.0]], atol=1e-6)


def test_whiten_ignores_masked_entries():
  x = jnp.array([[1.0, 3.0, 100.0]])
  out = losses.whiten(x, jnp.array([[1, 1, 0]]))
  np.testing.assert_allclose(out, [[-1.0, 1.0, 0.0]], atol=1e-4)


def test_clipped_surrogate_by_hand():
  # Token 0: A=+1, ratio e^0.5=1.6487 > 1.2 -> loss max(-1.6487, -1.2) = -1.2, clipped.
  # Token 1: A=-1, ratio 1.6487 -> max(1.6487, 1.2) = 1.6487, not clipped.
  # Token 2: A=+2, ratio e^-0.5=0.6065 -> max(-1.2131, -1.6) = -1.2131, not clipped.
  # Token 3: A=-1, ratio 0.6065 < 0.8 -> max(0.6065, 0.8) = 0.8, clipped.
  logp = jnp.array([[0.5, 0.5, -0.5, -0.5]])
  old = jnp.zeros((1, 4))
  adv = jnp.array([[1.0, -1.0, 2.0, -1.0]])
  out = losses.clipped_surrogate(logp, old, adv, clip_eps=0.2)
  e = math.exp(0.5)
  np.testing.assert_allclose(out['loss'], [[-1.2, e, -2 / e, 0.8]], rtol=1e-5)
  np.testing.assert_array_equal(out['clipped'], [[1, 0, 0, 1]])
  np.testing.assert_allclose(out['approx_kl'], [[e - 1 - 0.5, e - 1 - 0.5, 1 / e - 1 + 0.5,
                                                1 / e - 1 + 0.5]], rtol=1e-5)
  # Clip higher (DAPO): eps_high 0.7 lets token 0's ratio 1.6487 through unclipped.
  high = losses.clipped_surrogate(logp, old, adv, clip_eps=0.2, clip_eps_high=0.7)
  np.testing.assert_allclose(high['loss'][0, 0], -e, rtol=1e-5)
  assert float(high['clipped'][0, 0]) == 0.0


def test_clipped_value_loss_by_hand():
  # old 0, new 0.5, return 1: unclipped (0.5-1)^2 = 0.25; clipped V 0.2 -> 0.64; max 0.64 / 2.
  # old 0, new -0.5, return -1: unclipped 0.25, clipped -0.2 -> 0.64.
  # old 0, new 0.1, return 0: unclipped 0.01, clipped 0.01 (inside the clip).
  out = losses.clipped_value_loss(jnp.array([[0.5, -0.5, 0.1]]), jnp.zeros((1, 3)),
                                  jnp.array([[1.0, -1.0, 0.0]]), clip=0.2)
  np.testing.assert_allclose(out['loss'], [[0.32, 0.32, 0.005]], rtol=1e-5)
  np.testing.assert_array_equal(out['clipped'], [[1, 1, 0]])


def test_entropy_uniform_and_one_hot():
  logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
  np.testing.assert_allclose(losses.entropy(logits), [[math.log(4), 0.0]], atol=1e-5)


def test_kl_estimators_by_hand_and_finite_at_50():
  logp = jnp.array([[-1.0, -2.0, 0.0, 0.0]])
  ref = jnp.array([[-2.0, -1.0, 50.0, -50.0]])
  k1 = losses.kl_estimate(logp, ref, 'k1')
  k3 = losses.kl_estimate(logp, ref, 'k3')
  np.testing.assert_allclose(k1[0, :2], [1.0, -1.0])
  # k3 = e^-r - 1 + r: r = 1 -> e^-1 = 0.3679; r = -1 -> e - 2 = 0.7183.
  np.testing.assert_allclose(k3[0, :2], [math.exp(-1), math.e - 2], rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(k1))) and np.all(np.isfinite(np.asarray(k3)))
  assert np.all(np.asarray(k3) >= 0)
  np.testing.assert_allclose(k1[0, 2:], [-20.0, 20.0])   # clamped at MAX_LOG_RATIO
  np.testing.assert_allclose(k3[0, 3], math.exp(-20) - 1 + 20, rtol=1e-6)


def test_group_advantages_std_mean_and_all_equal():
  rewards = jnp.array([1.0, 0.0, 0.0, 1.0,    # group 0: mean .5, std .5
                       0.5, 0.5, 0.5, 0.5,    # group 1: all equal
                       3.0, 0.0, 0.0, 0.0])   # group 2: mean .75, std sqrt(27/16)
  std = losses.group_advantages(rewards, 4, normalize='std', eps=0.0 + 1e-12)
  np.testing.assert_allclose(std[:4], [1, -1, -1, 1], rtol=1e-5)
  np.testing.assert_array_equal(std[4:8], [0, 0, 0, 0])
  s = math.sqrt(27 / 16)
  np.testing.assert_allclose(std[8:], [2.25 / s, -.75 / s, -.75 / s, -.75 / s], rtol=1e-5)
  mean = losses.group_advantages(rewards, 4, normalize='mean')
  np.testing.assert_allclose(mean, [.5, -.5, -.5, .5, 0, 0, 0, 0, 2.25, -.75, -.75, -.75])
  # The default eps: an all-equal group is still exactly zero.
  np.testing.assert_array_equal(losses.group_advantages(rewards, 4)[4:8], [0, 0, 0, 0])


def test_aggregation_modes_by_hand():
  values = jnp.array([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [9.0, 9.0, 9.0]])
  mask = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  assert tuple(map(float, losses.aggregate(values, mask, 'token'))) == (10.0, 4.0)
  # Row means 2 and 4, the empty row counts for nothing.
  assert tuple(map(float, losses.aggregate(values, mask, 'sequence'))) == (6.0, 2.0)
  assert tuple(map(float, losses.aggregate(values, mask, 'constant'))) == (10.0, 9.0)


@pytest.mark.parametrize('aggregation,want', [
    # Per-token losses at ratio 1 are -A: row 0 (A=1, 2 tokens) [-1, -1]; row 1 (A=-1, 1 token) [1].
    ('token', (-1.0, 3.0)), ('sequence', (0.0, 2.0)), ('constant', (-1.0, 6.0))])
def test_grpo_loss_each_aggregation(aggregation, want):
  logp = jnp.zeros((2, 3))
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  total, aux = losses.grpo_loss(logp, logp, None, jnp.array([1.0, -1.0]), mask, beta=0.0,
                                aggregation=aggregation)
  assert (float(total), float(aux['count'])) == want
  assert float(aux['kl']) == 0.0 and float(aux['clip_fraction']) == 0.0


def test_grpo_loss_adds_beta_times_k3():
  logp = jnp.array([[-1.0, -1.0]])
  ref = jnp.array([[-2.0, -1.0]])   # r = 1 on token 0, 0 on token 1
  total, aux = losses.grpo_loss(logp, logp, ref, jnp.array([0.0]), jnp.ones((1, 2)), beta=0.5)
  np.testing.assert_allclose(float(aux['kl']), math.exp(-1), rtol=1e-6)
  np.testing.assert_allclose(float(total), 0.5 * math.exp(-1), rtol=1e-6)
