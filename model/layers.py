"""Token embedding, RMSNorm and the SwiGLU MLP.

Parameters are stored in `param_dtype` and cast to the compute `dtype` where
they are used; every parameter names its logical axes and the activations are
constrained with the activation names, so the mesh mapping stays in config.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from model.config import ModelConfig
from model.platform import current_platform

BLD = ('activation_batch', 'activation_length', 'activation_embed')


def normal_init(stddev: float) -> nn.initializers.Initializer:
  return nn.initializers.normal(stddev=stddev)


def matmul(x: jax.Array, w: jax.Array, num_contract: int = 1,
           preferred_element_type: jnp.dtype | None = None) -> jax.Array:
  """Contracts the last `num_contract` axes of x with the first of w.

  Written as one 2-D matmul between reshapes rather than an einsum: XLA:CPU
  runs the 2-D form and its gradients much faster (1.6x measured on the MLP's
  forward + backward, where the einsum's weight gradient contracts two axes),
  and on TPU/GPU the reshapes of leading (batch-major) and trailing
  (head-major) axes are free and keep their shardings. On CPU the weight
  gradient is taken with `x` transposed first (`_dot_cpu`); the platform is
  the mesh's in context (model/platform.py), so a TPU step compiled on a CPU
  host keeps the plain gradient.
  """
  lead, contract = x.shape[:x.ndim - num_contract], x.shape[x.ndim - num_contract:]
  if tuple(w.shape[:num_contract]) != tuple(contract):
    raise ValueError(f'matmul: cannot contract {x.shape} with {w.shape}.')
  out = w.shape[num_contract:]
  x_MK = x.reshape(math.prod(lead), math.prod(contract))
  w_KN = w.reshape(math.prod(contract), math.prod(out))
  if current_platform() == 'cpu':
    y_MN = _dot_cpu(x_MK, w_KN, preferred_element_type)
  else:
    y_MN = jnp.dot(x_MK, w_KN, preferred_element_type=preferred_element_type)
  return y_MN.reshape(*lead, *out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dot_cpu(x_MK: jax.Array, w_KN: jax.Array,
             preferred_element_type: jnp.dtype | None) -> jax.Array:
  """`jnp.dot(x, w)` whose weight gradient transposes x into memory first.

  Autodiff's weight gradient `x.T @ g` reaches XLA:CPU as a dot over x's
  leading axis, which its kernels run at about half speed (85 vs 171 GFLOP/s
  for the `bench_cpu` LM head's [384, 4096] x [4096, 8192], 130 vs 161 for
  the MLP's [1024, 4096] x [4096, 384]). Copying x.T to a row-major array
  first (a few MB; the barrier keeps XLA from folding the transpose back
  into the dot) makes it a plain matmul: 6% off the whole `bench_cpu` step.
  Same values as autodiff's gradient, up to float summation order.
  """
  return jnp.dot(x_MK, w_KN, preferred_element_type=preferred_element_type)


def _dot_cpu_fwd(x_MK, w_KN, preferred_element_type):
  return _dot_cpu(x_MK, w_KN, preferred_element_type), (x_MK, w_KN)


def _dot_cpu_bwd(preferred_element_type, residuals, g_MN):
  del preferred_element_type
  x_MK, w_KN = residuals
  dx_MK = jnp.dot(g_MN, w_KN.T).astype(x_MK.dtype)
  x_KM = jax.lax.optimization_barrier(x_MK.T)
  dw_KN = jnp.dot(x_KM, g_MN).astype(w_KN.dtype)
  return dx_MK, dw_KN


_dot_cpu.defvjp(_dot_cpu_fwd, _dot_cpu_bwd)


class Embed(nn.Module):
  """Token embedding; `attend` gives logits against the same matrix (tied).

  The table's init std is `embed_init_std` (default 1/sqrt(d));
  `scale_embeddings` multiplies the looked-up rows by sqrt(d) and
  `scale_tied_logits` divides the tied logits by sqrt(d). The untied presets
  scale the input (unit RMS); the tied ones, like a Hugging Face Llama, use
  neither, with a 0.02 table (see `ModelConfig` for why).
  """
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
        'embedding',
        nn.with_logical_partitioning(
            normal_init(cfg.embed_init_std or 1.0 / math.sqrt(cfg.d_model)),
            ('vocab', 'embed')),
        (cfg.vocab_size, cfg.d_model), jnp.dtype(cfg.param_dtype))

  def __call__(self, tokens_BL: jax.Array) -> jax.Array:
    cfg = self.config
    embedding_VD = jnp.asarray(self.embedding, jnp.dtype(cfg.dtype))
    x_BLD = jnp.take(embedding_VD, tokens_BL, axis=0)
    if cfg.scale_embeddings:
      x_BLD = x_BLD * jnp.asarray(math.sqrt(cfg.d_model), x_BLD.dtype)
    return nn.with_logical_constraint(x_BLD, BLD)

  def attend(self, x_BLD: jax.Array) -> jax.Array:
    """float32 logits `x @ E.T`, times 1/sqrt(d) with `scale_tied_logits`.

    Scaling the float32 logits rather than x keeps bfloat16 activations
    unrounded.
    """
    cfg = self.config
    embedding_VD = jnp.asarray(self.embedding, jnp.dtype(cfg.dtype))
    logits_BLV = matmul(x_BLD, embedding_VD.T, preferred_element_type=jnp.float32)
    if cfg.scale_tied_logits:
      logits_BLV = logits_BLV * (1.0 / math.sqrt(cfg.d_model))
    return logits_BLV


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned per-feature scale (no bias)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    cfg = self.config
    scale_D = self.param(
        'scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
        (x_BLD.shape[-1],), jnp.dtype(cfg.param_dtype))
    # The statistics in float32 even for bfloat16 activations.
    x = x_BLD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + cfg.norm_eps)
    return (x * jnp.asarray(scale_D, jnp.float32)).astype(jnp.dtype(cfg.dtype))


class Mlp(nn.Module):
  """SwiGLU: `down(silu(x @ gate) * (x @ up))`, no biases."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    in_init = normal_init(1.0 / math.sqrt(cfg.d_model))
    # The output projection is scaled down with depth so the residual stream's
    # variance does not grow with the number of layers at initialisation.
    out_init = normal_init(1.0 / math.sqrt(cfg.mlp_dim * 2 * cfg.num_layers))
    gate_DF = self.param('wi_gate', nn.with_logical_partitioning(in_init, ('embed', 'mlp')),
                         (cfg.d_model, cfg.mlp_dim), param_dtype)
    up_DF = self.param('wi_up', nn.with_logical_partitioning(in_init, ('embed', 'mlp')),
                       (cfg.d_model, cfg.mlp_dim), param_dtype)
    down_FD = self.param('wo', nn.with_logical_partitioning(out_init, ('mlp', 'embed')),
                         (cfg.mlp_dim, cfg.d_model), param_dtype)
    bl_f = ('activation_batch', 'activation_length', 'activation_mlp')
    gate_BLF = matmul(x_BLD, jnp.asarray(gate_DF, dtype))
    up_BLF = matmul(x_BLD, jnp.asarray(up_DF, dtype))
    h_BLF = nn.with_logical_constraint(nn.silu(gate_BLF) * up_BLF, bl_f)
    h_BLF = checkpoint_name(h_BLF, 'mlp_hidden')
    out_BLD = matmul(h_BLF, jnp.asarray(down_FD, dtype))
    return nn.with_logical_constraint(out_BLD, BLD)


class ScalarHead(nn.Module):
  """One float32 score per position, `x @ w + b` (reward and value models).

  Small init (std 1/d, like the LM readout), so a head put on a pre-trained
  trunk starts near zero and the first updates do not wreck the trunk.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    cfg = self.config
    w_D = self.param('kernel', nn.with_logical_partitioning(
        normal_init(1.0 / cfg.d_model), ('embed',)), (cfg.d_model,), jnp.dtype(cfg.param_dtype))
    b = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                   jnp.dtype(cfg.param_dtype))
    score_BL = jnp.einsum('BLD,D->BL', x_BLD.astype(jnp.float32), jnp.asarray(w_D, jnp.float32))
    return nn.with_logical_constraint(score_BL + jnp.asarray(b, jnp.float32),
                                      ('activation_batch', 'activation_length'))
