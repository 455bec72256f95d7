"""What a stage optimises: `loss_fn(params, batch, rng, frozen) -> (sum_loss, aux_sums)`.

The step (train/steps.py) differentiates `sum_loss` and divides by
`aux_sums['count']` summed over the global batch (and over micro-batches), so
a loss is a SUM over its units (target tokens, pairs, sequences) and `count`
says how many there were: gradient accumulation and data parallelism then
average exactly. The other entries of `aux_sums` are sums too; the step
reports each as `<name> / count`, except `num_*` entries, reported as totals.

`frozen` holds the trees a stage does not train (a reference policy, a LoRA
base, a reward model); it is a jitted argument of its own, never donated and
never in the optimizer state. `rng` is None in evaluation (no dropout).

The loss formulas themselves live in train/losses.py, side by side; here they
meet the model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from train import losses

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array | None, Any], tuple[jax.Array, dict[str, jax.Array]]]


def forward(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None,
            head: str = 'lm') -> jax.Array:
  """The model on a packed batch; dropout only when an rng is given."""
  rngs = {} if rng is None else {'dropout': rng}
  return model.apply({'params': params}, batch['tokens'],
                     segment_ids=batch.get('segment_ids'), positions=batch.get('positions'),
                     deterministic=rng is None, rngs=rngs, head=head)


def lm_readout(cfg: Any, params: Any) -> tuple[jax.Array, float]:
  """(head_DV in the compute dtype, logit scale): what `Transformer`'s 'lm' head applies
  to the final hidden states -- `lm_head`, or the embedding transposed when tied."""
  dtype = jnp.dtype(cfg.dtype)
  if cfg.tie_embeddings:
    scale = 1.0 / math.sqrt(cfg.d_model) if cfg.scale_tied_logits else 1.0
    return jnp.asarray(params['embed']['embedding'], dtype).T, scale
  return jnp.asarray(params['lm_head'], dtype), 1.0


def next_token(model: nn.Module, z_loss: float = 0.0, dropout: bool = False) -> LossFn:
  """Next-token cross-entropy (+ z-loss), on every target or only where `loss_mask` says.

  Pre-training and SFT share it: SFT batches carry a `loss_mask` field. With
  `model.config.loss_chunk_size` > 0 the loss is `losses.chunked_cross_entropy`
  on the trunk's hidden states, so the [B, L, V] logits are never formed.
  """
  chunk_size = int(getattr(getattr(model, 'config', None), 'loss_chunk_size', 0) or 0)

  def loss_fn(params, batch, rng, frozen):
    del frozen
    rng = rng if dropout else None
    targets_BL, weights_BL = losses.next_token_targets(batch)
    if chunk_size:
      # The trunk's hidden states and the readout; the logits exist one chunk at a time.
      hidden_BLD = forward(model, params, batch, rng, head='hidden')
      head_DV, logit_scale = lm_readout(model.config, params)
      sum_nll, sum_z, count = losses.chunked_cross_entropy(
          hidden_BLD, head_DV, targets_BL, weights_BL, z_loss, chunk_size, logit_scale)
    else:
      logits_BLV = forward(model, params, batch, rng)
      sum_nll, sum_z, count = losses.cross_entropy(logits_BLV, targets_BL, weights_BL, z_loss)
    return sum_nll + sum_z, {'loss': sum_nll, 'z_loss': sum_z, 'count': count,
                             'num_tokens': count}
  return loss_fn
