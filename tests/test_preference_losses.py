"""Golden values of the preference losses, and where a response's reward is read.

The expected numbers are worked out by hand in the comments (softplus values
to 9 digits from a calculator), not by the formulas under test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import config as model_config_lib
from train import losses
from train import objectives
from train import reward
from train import steps

# -log σ(x) at the points used below.
NLS = {1.0: 0.313261688, -1.0: 1.313261688, 0.5: 0.474076984, 0.2: 0.598138869,
       -0.2: 0.798138869, -0.1: 0.744396660, 0.1: 0.644396660}


def test_bradley_terry_by_hand():
  chosen = jnp.array([2.0, 0.5, -1.0])
  rejected = jnp.array([1.0, 1.5, 7.0])
  weights = jnp.array([1.0, 1.0, 0.0])     # the third slot holds no pair
  total, sums = losses.bradley_terry(chosen, rejected, weights)
  # differences 1 and -1: softplus(-1) + softplus(1)
  np.testing.assert_allclose(total, NLS[1.0] + NLS[-1.0], rtol=1e-6)
  assert float(sums['accuracy']) == 1.0 and float(sums['count']) == 2.0
  np.testing.assert_allclose(sums['margin'], 0.0, atol=1e-7)       # 1 + (-1)
  np.testing.assert_allclose(sums['reward_mean'], 1.5 + 1.0, rtol=1e-6)   # (2+1)/2 + (0.5+1.5)/2
  # A margin of 0.5 on the first pair: -log σ(1 - 0.5); centring 0.1 · (3² + 2²).
  total, sums = losses.bradley_terry(chosen, rejected, weights, jnp.array([0.5, 0.0, 0.0]),
                                     centering=0.1)
  np.testing.assert_allclose(sums['loss'], NLS[0.5] + NLS[-1.0], rtol=1e-6)
  np.testing.assert_allclose(sums['centering'], 1.3, rtol=1e-6)
  np.testing.assert_allclose(total, NLS[0.5] + NLS[-1.0] + 1.3, rtol=1e-6)


# Two pairs: log-ratios chosen (1, 0), rejected (-1, 1); h = (2, -1).
POLICY_C, POLICY_R = jnp.array([-10.0, -20.0]), jnp.array([-12.0, -15.0])
REF_C, REF_R = jnp.array([-11.0, -20.0]), jnp.array([-11.0, -16.0])
ONES = jnp.ones(2)


def test_dpo_sigmoid_by_hand():
  total, sums = losses.dpo(POLICY_C, POLICY_R, REF_C, REF_R, ONES, beta=0.1)
  # -log σ(0.1 · 2) - log σ(0.1 · -1)
  np.testing.assert_allclose(total, NLS[0.2] + NLS[-0.1], rtol=1e-6)
  np.testing.assert_allclose(sums['rewards_chosen'], 0.1 + 0.0, rtol=1e-6)
  np.testing.assert_allclose(sums['rewards_rejected'], -0.1 + 0.1, atol=1e-7)
  np.testing.assert_allclose(sums['rewards_margin'], 0.2 - 0.1, rtol=1e-5)
  assert float(sums['rewards_accuracy']) == 1.0 and float(sums['count']) == 2.0
  np.testing.assert_allclose(sums['logps_chosen'], -30.0)
  np.testing.assert_allclose(sums['logps_rejected'], -27.0)


def test_cdpo_by_hand():
  total, _ = losses.dpo(POLICY_C, POLICY_R, REF_C, REF_R, ONES, beta=0.1, label_smoothing=0.1)
  expected = (0.9 * NLS[0.2] + 0.1 * NLS[-0.2]) + (0.9 * NLS[-0.1] + 0.1 * NLS[0.1])
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  np.testing.assert_allclose(total, 1.352535529, rtol=1e-6)


def test_ipo_by_hand():
  # Per-token log-ratios: chosen 1/4 and 0/5, rejected -1/2 and 1/5: h = 0.75, -0.2;
  # target 1/(2 · 0.1) = 5: (0.75 - 5)² + (-0.2 - 5)² = 18.0625 + 27.04.
  total, _ = losses.dpo(POLICY_C, POLICY_R, REF_C, REF_R, ONES, beta=0.1, loss_type='ipo',
                        chosen_tokens_P=jnp.array([4.0, 5.0]),
                        rejected_tokens_P=jnp.array([2.0, 5.0]))
  np.testing.assert_allclose(total, 45.1025, rtol=1e-6)
  with pytest.raises(ValueError, match='token counts'):
    losses.dpo(POLICY_C, POLICY_R, REF_C, REF_R, ONES, loss_type='ipo')


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
  grad_c, grad_r = jax.grad(lambda c, r: losses.dpo(c, r, REF_C, REF_R, ONES)[0],
                            argnums=(0, 1))(POLICY_C, POLICY_R)
  assert np.all(np.asarray(grad_c) < 0) and np.all(np.asarray(grad_r) > 0)


def test_reward_is_read_at_the_last_response_token_right_padded_and_packed():
  values = jnp.arange(1.0, 13.0).reshape(2, 6)   # 1..6, 7..12
  # Row 0, right-padded: a response at columns 2-3 (3 is its <|end|>), then a
  # separator and padding. Row 1, packed: pair 1's response ends at column 1,
  # pair 2's at column 5.
  segment_ids = jnp.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 2, 2, 2]])
  mask = jnp.array([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 1]])
  read, present = losses.last_token_values(values, mask, segment_ids)
  read, present = np.asarray(read).reshape(2, 6), np.asarray(present).reshape(2, 6)
  assert read[0, 1] == 4.0           # column 3, not the separator (5) nor padding (6)
  assert read[1, 1] == 8.0           # column 1 of row 1
  assert read[1, 2] == 12.0          # column 5 of row 1
  assert present.sum() == 3 and present[0, 1] and present[1, 1] and present[1, 2]
  sums = np.asarray(losses.segment_sums(mask * values, segment_ids)).reshape(2, 6)
  assert sums[0, 1] == 3 + 4 and sums[1, 1] == 8 and sums[1, 2] == 11 + 12


def _tiny_model():
  cfg = model_config_lib.ModelConfig(
      vocab_size=32, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
      mlp_dim=32, max_len=16, dtype='float32', param_dtype='float32', scan_layers=False,
      attention_impl='xla', tie_embeddings=True)
  model = reward.ScoreModel(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))['params']
  # A non-zero head, so scores differ between positions.
  params = dict(params, score_head={'kernel': jax.random.normal(jax.random.key(1), (16,)),
                                    'bias': jnp.zeros(())})
  return model, params


def _pair_doc(rng, prompt_len, chosen_len, rejected_len):
  """One pair's fields (prompt + response, right-padded to one length), random ids."""
  prompt = rng.integers(4, 32, prompt_len)
  chosen = np.concatenate([prompt, rng.integers(4, 32, chosen_len)])
  rejected = np.concatenate([prompt, rng.integers(4, 32, rejected_len)])
  length = max(len(chosen), len(rejected))
  pad = lambda x: np.pad(x, (0, length - len(x)))
  mask = lambda n: pad(np.r_[np.zeros(prompt_len), np.ones(n)]).astype(np.int32)
  return {'tokens': pad(chosen), 'rejected': pad(rejected), 'chosen_mask': mask(chosen_len),
          'rejected_mask': mask(rejected_len)}


def _batch(rows, length=16):
  """Rows of documents packed left to right (segments 1, 2, ...), padded to `length`."""
  out = {k: np.zeros((len(rows), length), np.int32)
         for k in ('tokens', 'rejected', 'chosen_mask', 'rejected_mask', 'segment_ids',
                   'positions')}
  for i, docs in enumerate(rows):
    col = 0
    for s, doc in enumerate(docs, start=1):
      n = len(doc['tokens'])
      for k in ('tokens', 'rejected', 'chosen_mask', 'rejected_mask'):
        out[k][i, col:col + n] = doc[k]
      out['segment_ids'][i, col:col + n] = s
      out['positions'][i, col:col + n] = np.arange(n)
      col += n
  return {k: jnp.asarray(v) for k, v in out.items()}


def test_packed_pairs_score_as_if_alone():
  """Two pairs packed in one row get the scores and log-probs each gets in a row of its own."""
  model, params = _tiny_model()
  rng = np.random.default_rng(0)
  a, b = _pair_doc(rng, 3, 2, 4), _pair_doc(rng, 2, 3, 1)
  packed, alone = _batch([[a, b]]), _batch([[a], [b]])
  chosen_p, rejected_p = objectives.pair_scores(model, params, packed, None)
  chosen_a, rejected_a = objectives.pair_scores(model, params, alone, None)
  # Slots: row * 16 + segment.
  np.testing.assert_allclose([chosen_p[1], chosen_p[2]], [chosen_a[1], chosen_a[17]], rtol=1e-5)
  np.testing.assert_allclose([rejected_p[1], rejected_p[2]], [rejected_a[1], rejected_a[17]],
                             rtol=1e-5)
  assert chosen_p[1] != rejected_p[1]
  np.testing.assert_array_equal(objectives.pair_weights(packed)[:3], [0, 1, 1])
  lm = _tiny_lm(model)
  for tokens, mask in (('tokens', 'chosen_mask'), ('rejected', 'rejected_mask')):
    logp_p, n_p = objectives.response_log_probs(lm, params, packed, None, tokens, mask)
    logp_a, n_a = objectives.response_log_probs(lm, params, alone, None, tokens, mask)
    np.testing.assert_allclose([logp_p[1], logp_p[2]], [logp_a[1], logp_a[17]], rtol=1e-5)
    # Every response token is predicted (the first from the prompt's last token).
    np.testing.assert_array_equal([n_p[1], n_p[2]], [a[mask].sum(), b[mask].sum()])


def _tiny_lm(model):
  from model import transformer  # pylint: disable=g-import-not-at-top
  return transformer.Transformer(model.config)


def test_accuracy_per_kind_by_hand():
  """Per-kind sums read each pair's kind at its response, and evaluation divides
  each by its own kind's count (steps.evaluate_batches), leaving out a kind
  with no pair in the split."""
  # Row 0 packs pairs 1 and 2 (kinds 1 and 2), row 1 holds pair 3 (kind 1),
  # then padding, which must count for no kind.
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]])
  chosen_mask = jnp.array([[0, 1, 1, 0, 0, 1], [0, 0, 1, 1, 0, 0]])
  kind = jnp.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]])
  batch = {'segment_ids': segment_ids, 'chosen_mask': chosen_mask, 'kind': kind,
           'rejected_mask': chosen_mask}
  weights_P = objectives.pair_weights(batch)
  # Pair slots are row * 6 + segment: pairs 1, 2 at slots 1, 2; pair 3 at slot 7.
  correct_P = jnp.zeros(12).at[1].set(1.0).at[2].set(0.0).at[7].set(1.0)
  sums = objectives.per_kind_accuracy(correct_P, weights_P, batch, ('syntax', 'renamed', 'x'))
  assert {k: float(v) for k, v in sums.items()} == {
      'accuracy/syntax': 2.0, 'count/syntax': 2.0, 'accuracy/renamed': 0.0,
      'count/renamed': 1.0, 'accuracy/x': 0.0, 'count/x': 0.0}
  assert objectives.per_kind_accuracy(correct_P, weights_P, batch, ()) == {}
  no_kind = {k: v for k, v in batch.items() if k != 'kind'}
  assert objectives.per_kind_accuracy(correct_P, weights_P, no_kind, ('syntax',)) == {}
  # Two evaluation batches: accuracy 3 of 4 overall, syntax 3 of 3, renamed 0 of 1.
  batches = [dict(sums, loss=1.0, accuracy=2.0, count=3.0),
             {'loss': 1.0, 'accuracy': 1.0, 'count': 1.0, 'accuracy/syntax': 1.0,
              'count/syntax': 1.0, 'accuracy/renamed': 0.0, 'count/renamed': 0.0,
              'accuracy/x': 0.0, 'count/x': 0.0}]
  out = steps.evaluate_batches(lambda params, b: b, None, batches)
  assert out['accuracy'] == 0.75 and out['accuracy/syntax'] == 1.0
  assert out['accuracy/renamed'] == 0.0 and out['count/syntax'] == 3.0
  assert out['count/renamed'] == 1.0 and 'accuracy/x' not in out and 'count/x' not in out
  # Training logs leave the per-kind sums out: a batch holds too few of each.
  assert set(steps.averaged_metrics({k: jnp.asarray(v) for k, v in batches[0].items()},
                                    'train')) == {'train/loss', 'train/accuracy'}
