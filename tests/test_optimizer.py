"""Learning-rate schedule shape, weight-decay mask and the AdamW transformation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from train import optimizer


def _opt_cfg(**overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=10, schedule='cosine', end_lr_factor=0.1,
      weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0, grad_accum_steps=1,
      weight_decay_exclude=optimizer.DEFAULT_NO_DECAY))
  cfg.update(overrides)
  return cfg


@pytest.mark.parametrize('kind', ['cosine', 'linear'])
def test_schedule_warms_up_peaks_and_decays_to_end(kind):
  schedule = optimizer.make_schedule(_opt_cfg(schedule=kind), num_train_steps=110)
  lrs = np.array([float(schedule(step)) for step in range(120)])
  np.testing.assert_allclose(lrs[0], 1e-4, rtol=1e-6)          # lr / warmup, not 0
  assert np.all(np.diff(lrs[:10]) > 0)                          # linear warm-up
  np.testing.assert_allclose(lrs[9:11], 1e-3, rtol=1e-6)       # peak at the end of warm-up
  assert np.all(np.diff(lrs[10:111]) < 0)                       # strictly decaying
  np.testing.assert_allclose(lrs[110:], 1e-4, rtol=1e-5)       # end_lr_factor * lr, held
  middle = 1e-4 + 0.5 * 9e-4                                    # half-way for both shapes
  np.testing.assert_allclose(lrs[60], middle, rtol=1e-5)
  if kind == 'cosine':
    assert lrs[35] > 1e-3 - 0.25 * 9e-4                         # cosine is flat near the top


def test_constant_schedule_and_bad_name():
  schedule = optimizer.make_schedule(_opt_cfg(schedule='constant'), num_train_steps=50)
  np.testing.assert_allclose([float(schedule(s)) for s in (10, 30, 49, 80)], 1e-3)
  with pytest.raises(ValueError, match='optimizer.schedule'):
    optimizer.make_schedule(_opt_cfg(schedule='cosin'), num_train_steps=50)


PARAMS = {
    'embed': {'embedding': jnp.ones((8, 4))},
    'layers': {'attn': {'wq': jnp.ones((2, 4, 4))}, 'attn_norm': {'scale': jnp.ones((2, 4))},
               'mlp': {'wi_gate': jnp.ones((2, 4, 8)), 'bias': jnp.ones((2, 8))}},
    'final_norm': {'scale': jnp.ones((4,))},
    'lm_head': jnp.ones((4, 8)),
}


def test_weight_decay_mask_skips_norms_biases_and_embeddings():
  mask = optimizer.weight_decay_mask(PARAMS)
  assert mask == {
      'embed': {'embedding': False},
      'layers': {'attn': {'wq': True}, 'attn_norm': {'scale': False},
                 'mlp': {'wi_gate': True, 'bias': False}},
      'final_norm': {'scale': False},
      'lm_head': True,
  }
  # Configurable: an empty pattern decays everything.
  assert all(jax.tree.leaves(optimizer.weight_decay_mask(PARAMS, '')))


def test_adamw_decays_only_masked_params():
  tx, _ = optimizer.make_optimizer(_opt_cfg(learning_rate=0.5, warmup_steps=0), 100)
  zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = tx.update(zero_grads, tx.init(PARAMS), PARAMS)
  new = optax.apply_updates(PARAMS, updates)
  # With zero gradients only decoupled weight decay moves a parameter: p * (1 - lr * wd).
  np.testing.assert_allclose(new['lm_head'], 1 - 0.5 * 0.1, rtol=1e-6)
  np.testing.assert_allclose(new['layers']['attn']['wq'], 1 - 0.5 * 0.1, rtol=1e-6)
  np.testing.assert_allclose(new['embed']['embedding'], 1.0)
  np.testing.assert_allclose(new['final_norm']['scale'], 1.0)


def test_gradients_are_clipped_to_global_norm():
  params = {'w': jnp.zeros((4,))}
  cfg = _opt_cfg(learning_rate=1.0, warmup_steps=0, weight_decay=0.0, b1=0.0, b2=0.0,
                 eps=0.0, grad_clip_norm=1.0)
  tx, _ = optimizer.make_optimizer(cfg, 10)
  # Clipping happens before Adam; check the clipped gradient Adam sees through
  # its first moment (b1=0 keeps exactly the latest gradient).
  _, state = tx.update({'w': jnp.full((4,), 10.0)}, tx.init(params), params)
  mu = state[1][0].mu['w']
  np.testing.assert_allclose(np.linalg.norm(mu), 1.0, rtol=1e-6)
