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

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax

from train import lora
from train import losses

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array | None, Any], tuple[jax.Array, dict[str, jax.Array]]]


def forward(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None, *,
            head: str = 'lm', tokens: str = 'tokens') -> jax.Array:
  """The model on a packed batch; dropout only when an rng is given.

  head: 'lm' (logits), 'hidden' or 'scalar' (model/transformer.py). tokens:
  the batch field to read (a preference batch has 'chosen' and 'rejected'
  rows sharing one `segment_ids`/`positions`). Every stage runs its model
  through here, so a change of how params reach the model is made once: a
  LoRA run's loss gets `lora.LoraParams` (base + adapters, train/lora.py).
  """
  if isinstance(params, lora.LoraParams):
    params = params.model_params()
  rngs = {} if rng is None else {'dropout': rng}
  return model.apply({'params': params}, batch[tokens],
                     segment_ids=batch.get('segment_ids'), positions=batch.get('positions'),
                     deterministic=rng is None, rngs=rngs, head=head)


def next_token(model: nn.Module, z_loss: float = 0.0, dropout: bool = False) -> LossFn:
  """Next-token cross-entropy (+ z-loss), on every target or only where `loss_mask` says.

  Pre-training and SFT share it: SFT batches carry a `loss_mask` field.
  """
  def loss_fn(params, batch, rng, frozen):
    del frozen
    logits_BLV = forward(model, params, batch, rng if dropout else None)
    targets_BL, weights_BL = losses.next_token_targets(batch)
    sum_nll, sum_z, count = losses.cross_entropy(logits_BLV, targets_BL, weights_BL, z_loss)
    return sum_nll + sum_z, {'loss': sum_nll, 'z_loss': sum_z, 'count': count,
                             'num_tokens': count}
  return loss_fn
