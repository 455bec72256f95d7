"""The chunked cross-entropy equals the plain one, in value and gradient, and in the step."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.config import ModelConfig
from model.transformer import Transformer
from train import losses
from train import objectives


def _inputs(batch=2, length=37, d=16, vocab=50, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.standard_normal((batch, length, d)), jnp.float32)
  head = jnp.asarray(rng.standard_normal((d, vocab)) * 0.3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
  weights = jnp.asarray(rng.random((batch, length)) > 0.3, jnp.float32)
  return hidden, head, targets, weights


def _numpy_loss(hidden, head, targets, weights, z_loss, scale):
  """float64 numpy: the value the plain loss should have (independent of the code)."""
  logits = np.einsum('bld,dv->blv', np.float64(hidden), np.float64(head)) * scale
  log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target = np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
  w = np.float64(weights)
  return ((log_z - target) * w).sum(), z_loss * (log_z**2 * w).sum(), w.sum()


@pytest.mark.parametrize('chunk_size', [8, 37, 64])   # padded, exact, one short chunk
@pytest.mark.parametrize('z_loss,scale', [(0.0, 1.0), (1e-2, 0.25)])
def test_chunked_equals_plain_value_and_gradient(chunk_size, z_loss, scale):
  hidden, head, targets, weights = _inputs()

  def plain(hidden, head):
    logits = jnp.einsum('BLD,DV->BLV', hidden, head) * scale
    nll, z, count = losses.cross_entropy(logits, targets, weights, z_loss)
    return nll + 3.0 * z, (nll, z, count)   # distinct cotangents for the two sums

  def chunked(hidden, head):
    nll, z, count = losses.chunked_cross_entropy(hidden, head, targets, weights, z_loss,
                                                 chunk_size, scale)
    return nll + 3.0 * z, (nll, z, count)

  (_, sums), grads = jax.jit(jax.value_and_grad(plain, (0, 1), has_aux=True))(hidden, head)
  (_, chunk_sums), chunk_grads = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(
      hidden, head)
  np.testing.assert_allclose(chunk_sums, sums, rtol=1e-5)
  np.testing.assert_allclose(chunk_sums, _numpy_loss(hidden, head, targets, weights, z_loss,
                                                     scale), rtol=1e-5)
  for g, ref in zip(chunk_grads, grads):
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)
  # Undifferentiated (evaluation): the same sums.
  np.testing.assert_allclose(jax.jit(chunked)(hidden, head)[1], sums, rtol=1e-5)


def test_chunked_loss_never_forms_the_full_logits():
  hidden, head, targets, weights = _inputs(batch=2, length=64, vocab=50)
  grad = jax.grad(lambda h, w: losses.chunked_cross_entropy(h, w, targets, weights,
                                                           chunk_size=16)[0], (0, 1))
  text = jax.jit(grad).lower(hidden, head).as_text()
  assert 'tensor<2x64x50xf32>' not in text   # [B, L, V]
  assert 'tensor<2x16x50xf32>' in text       # one chunk's logits


@pytest.mark.parametrize('tied', [False, True])
def test_next_token_objective_with_chunks_equals_plain(tied):
  cfg = ModelConfig(vocab_size=64, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=32, max_len=24, tie_embeddings=tied,
                    scale_tied_logits=tied)
  rng = np.random.default_rng(0)
  batch = {'tokens': jnp.asarray(rng.integers(0, 64, (2, 24)), jnp.int32),
           'segment_ids': jnp.array([[1] * 10 + [2] * 14, [1] * 20 + [0] * 4], jnp.int32)}
  params = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), batch['tokens'])['params'])

  def value_and_grad(chunk_size):
    model = Transformer(dataclasses.replace(cfg, loss_chunk_size=chunk_size))
    loss_fn = objectives.next_token(model, z_loss=1e-3)
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None, None), has_aux=True))(
        params)

  (loss, aux), grads = value_and_grad(0)
  (chunk_loss, chunk_aux), chunk_grads = value_and_grad(5)
  np.testing.assert_allclose(chunk_loss, loss, rtol=1e-5)
  for key in aux:
    np.testing.assert_allclose(chunk_aux[key], aux[key], rtol=1e-5)
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6),
               chunk_grads, grads)


def test_loss_chunk_size_is_validated():
  with pytest.raises(ValueError, match='loss_chunk_size'):
    ModelConfig(vocab_size=8, d_model=8, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8,
                mlp_dim=8, max_len=8, loss_chunk_size=-1)
