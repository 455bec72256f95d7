"""The decoder-only transformer: embedding, a stack of blocks, norm, logits.

Training / scoring:
  logits_BLV = Transformer(cfg).apply({'params': params}, tokens_BL,
      segment_ids=seg_BL, positions=pos_BL, deterministic=True,
      rngs={'dropout': key})
  hidden_BLD = Transformer(cfg).apply(..., head='hidden')   # the trunk alone
  scores_BL = Transformer(cfg).apply(..., head='scalar')    # reward / value head
Decoding with the KV cache (see `model.attention.Attention` for the slot and
padding rules):
  cache = init_cache(cfg, batch_size, max_len)
  logits_BTV, variables = Transformer(cfg).apply(
      {'params': params, 'cache': cache}, tokens_BT, segment_ids=seg_BT,
      positions=pos_BT, decode=True, mutable=['cache'])
  cache = variables['cache']

With `scan_layers` the blocks are one `nn.scan`ned module named 'layers' whose
parameters (and cache) carry a leading 'layers' axis; otherwise they are
'layers_0', 'layers_1', ... with the same per-layer parameter names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.attention import Attention
from model.config import REMAT_POLICIES, ModelConfig
from model.layers import BLD, Embed, Mlp, RMSNorm, ScalarHead, matmul

# What `Transformer(...)(tokens, head=...)` returns: 'lm' float32 logits
# [B, L, V]; 'hidden' the final-normed hidden states [B, L, D]; 'scalar' one
# float32 score per position [B, L] from `score_head` (reward and value models).
HEADS = ('lm', 'hidden', 'scalar')


def remat_policy(name: str) -> Callable[..., bool] | None:
  """Maps `ModelConfig.remat_policy` to a `jax.checkpoint_policies` policy.

  'none' means no rematerialisation at all (None); 'full' saves nothing and
  recomputes the whole block in the backward pass; 'save_attn_out' and
  'save_qkv_attn_out' keep the named activations (`checkpoint_name` in
  model.attention) and recompute the rest.
  """
  policies = jax.checkpoint_policies
  table = {
      'none': None,
      'full': policies.nothing_saveable,
      'dots_saveable': policies.dots_saveable,
      'dots_with_no_batch_dims_saveable': policies.dots_with_no_batch_dims_saveable,
      'save_attn_out': policies.save_only_these_names('attn_out'),
      'save_qkv_attn_out': policies.save_only_these_names(
          'query_proj', 'key_proj', 'value_proj', 'attn_out'),
      'save_everything': policies.everything_saveable,
  }
  if name not in table:
    raise ValueError(f'Unknown remat_policy {name!r}; valid: {REMAT_POLICIES}.')
  return table[name]


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
  config: ModelConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x_BLD: jax.Array, segment_ids_BL: jax.Array,
               positions_BL: jax.Array | None) -> tuple[jax.Array, None]:
    cfg = self.config
    h_BLD = RMSNorm(cfg, name='attn_norm')(x_BLD)
    h_BLD = Attention(cfg, decode=self.decode, name='attn')(h_BLD, segment_ids_BL, positions_BL)
    h_BLD = nn.Dropout(cfg.dropout_rate)(h_BLD, deterministic=self.deterministic)
    x_BLD = x_BLD + h_BLD
    h_BLD = Mlp(cfg, name='mlp')(RMSNorm(cfg, name='mlp_norm')(x_BLD))
    h_BLD = nn.Dropout(cfg.dropout_rate)(h_BLD, deterministic=self.deterministic)
    x_BLD = nn.with_logical_constraint(x_BLD + h_BLD, BLD)
    return x_BLD, None  # (carry, per-layer output) as nn.scan wants


class Transformer(nn.Module):
  """Llama-family decoder-only language model returning float32 logits."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens_BL: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True,
               decode: bool = False, head: str = 'lm') -> jax.Array:
    """The trunk, then one head (the `HEADS`): logits, hidden states or a scalar.

    The heads share the trunk's parameter names, so a checkpoint of any stage
    (an LM, a reward model) initialises the trunk of the next.
    """
    if head not in HEADS:
      raise ValueError(f'head={head!r} is not one of {HEADS}.')
    cfg = self.config
    batch, length = tokens_BL.shape
    if segment_ids is None:
      segment_ids = jnp.ones((batch, length), jnp.int32)
    if positions is None and not decode:  # decode defaults come from the cache index
      positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))

    embed = Embed(cfg, name='embed')
    x_BLD = embed(tokens_BL)
    x_BLD = nn.Dropout(cfg.dropout_rate)(x_BLD, deterministic=deterministic)

    block = Block
    policy_name = 'none' if decode else cfg.remat_policy
    if policy_name != 'none':
      # Under scan the loop body is its own computation, so CSE cannot undo the
      # remat; in the unrolled loop it could, hence prevent_cse there.
      block = nn.remat(Block, policy=remat_policy(policy_name),
                       prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={'params': 0, 'cache': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BLD, _ = stack(cfg, deterministic, decode, name='layers')(x_BLD, segment_ids, positions)
    else:
      for i in range(cfg.num_layers):
        x_BLD, _ = block(cfg, deterministic, decode, name=f'layers_{i}')(
            x_BLD, segment_ids, positions)

    x_BLD = RMSNorm(cfg, name='final_norm')(x_BLD)
    if head == 'hidden':
      return x_BLD
    if head == 'scalar':
      return ScalarHead(cfg, name='score_head')(x_BLD)
    if cfg.tie_embeddings:
      logits_BLV = embed.attend(x_BLD)
    else:
      # std 1/d (not 1/sqrt(d)): on the unit-RMS output of the final norm the
      # logits then start with std 1/sqrt(d) and the loss at ~ln V, where
      # 1/sqrt(d) would give unit-variance logits and ln V + ~0.5 nats. It is
      # the effective scale of the tied readout (table std 1/sqrt(d) times
      # the 1/sqrt(d) logit scale), and the muP readout init.
      head_DV = self.param(
          'lm_head',
          nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0 / cfg.d_model),
                                       ('embed', 'vocab')),
          (cfg.d_model, cfg.vocab_size), jnp.dtype(cfg.param_dtype))
      logits_BLV = matmul(x_BLD, jnp.asarray(head_DV, jnp.dtype(cfg.dtype)),
                          preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(
        logits_BLV.astype(jnp.float32),
        ('activation_batch', 'activation_length', 'activation_vocab'))


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int) -> Any:
  """An empty 'cache' collection for `batch_size` rows of `max_len` slots.

  Its structure is whatever `Transformer(cfg)` creates in decode mode (traced
  with `jax.eval_shape`, no compute); all zeros, i.e. every slot empty and
  every row's index at 0. Leaves per layer (stacked on a leading layer axis
  when `scan_layers`): cached_key [B, K, H, max_len] / cached_value [B, K, max_len, H] in the
  compute dtype, cache_segment_ids/cache_positions [B, max_len] int32 and
  cache_index [B] int32.
  """
  model = Transformer(dataclasses.replace(cfg, max_len=max_len))
  tokens = jnp.zeros((batch_size, 1), jnp.int32)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), tokens, decode=True)['cache'])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
