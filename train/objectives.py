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


def lm_readout(cfg: Any, params: Any) -> tuple[jax.Array, float]:
  """(head_DV in the compute dtype, logit scale): what `Transformer`'s 'lm' head applies
  to the final hidden states -- `lm_head`, or the embedding transposed when tied."""
  if isinstance(params, lora.LoraParams):
    params = params.model_params()
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


# ----------------------------------------------------------------------------
# Preference pairs (data_pipeline/preferences.py): the chosen response is the
# `tokens` row with `chosen_mask`, the rejected one the `rejected` row with
# `rejected_mask`; both share `segment_ids`/`positions`, one pair per
# (row, segment). Losses are sums over pairs and `count` is the number of pairs.

# `margin` is stored as an int field in thousandths.
MARGIN_SCALE = 1000.0


def pair_weights(batch: Batch) -> jax.Array:
  """1.0 on the pair slots [B * L] that hold both a chosen and a rejected response."""
  segment_ids_BL = batch['segment_ids']
  has_chosen = losses.segment_sums(batch['chosen_mask'].astype(jax.numpy.float32),
                                   segment_ids_BL) > 0
  has_rejected = losses.segment_sums(batch['rejected_mask'].astype(jax.numpy.float32),
                                     segment_ids_BL) > 0
  return (has_chosen & has_rejected).astype(jax.numpy.float32)


def pair_margins(batch: Batch) -> jax.Array | None:
  """The data's per-pair margins [B * L] (0 where none was given), or None without a field."""
  if 'margin' not in batch:
    return None
  values_P, _ = losses.last_token_values(batch['margin'], batch['chosen_mask'],
                                         batch['segment_ids'])
  return values_P / MARGIN_SCALE


def pair_kinds(batch: Batch) -> jax.Array | None:
  """Each pair's kind number [B * L] (0: none; data_pipeline/preferences.py), or None
  when the data has no `kind` field."""
  if 'kind' not in batch:
    return None
  values_P, _ = losses.last_token_values(batch['kind'], batch['chosen_mask'],
                                         batch['segment_ids'])
  return values_P.astype(jnp.int32)


def per_kind_accuracy(correct_P: jax.Array, weights_P: jax.Array, batch: Batch,
                      kinds: tuple[str, ...]) -> dict[str, jax.Array]:
  """Sums 'accuracy/<kind>' and 'count/<kind>' for each name of `kinds` (number i + 1).

  Evaluation reports each as the accuracy over that kind's pairs
  (steps.evaluate_batches); empty without kind names or a `kind` field.
  """
  kind_P = pair_kinds(batch)
  if not kinds or kind_P is None:
    return {}
  sums = {}
  for number, name in enumerate(kinds, 1):
    w_P = weights_P * (kind_P == number)
    sums[f'accuracy/{name}'] = jnp.sum(w_P * correct_P)
    sums[f'count/{name}'] = jnp.sum(w_P)
  return sums


def pair_scores(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None
                ) -> tuple[jax.Array, jax.Array]:
  """A reward model's scores of the chosen and rejected responses [B * L] each.

  Read at each response's last masked-in token, its `<|end|>`.
  """
  rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
  scores = []
  for field, mask, key in (('tokens', 'chosen_mask', rngs[0]),
                           ('rejected', 'rejected_mask', rngs[1])):
    score_BL = forward(model, params, batch, key, head='scalar', tokens=field)
    scores.append(losses.last_token_values(score_BL, batch[mask], batch['segment_ids'])[0])
  return scores[0], scores[1]


def response_token_log_probs(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None,
                             tokens: str, mask: str) -> tuple[jax.Array, jax.Array]:
  """(log p of each response token at the position that predicts it, 1.0 there), [B, L] each.

  The response tokens are those `mask` marks (the answer and its `<|end|>`),
  each predicted from everything before it in its segment; every other
  position is 0. A document's values do not depend on what it is packed with.
  """
  logits_BLV = forward(model, params, batch, rng, tokens=tokens)
  view = {'tokens': batch[tokens], 'segment_ids': batch['segment_ids'], 'loss_mask': batch[mask]}
  targets_BL, weights_BL = losses.next_token_targets(view)
  return losses.token_log_probs(logits_BLV, targets_BL) * weights_BL, weights_BL


def response_log_probs(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None,
                       tokens: str, mask: str) -> tuple[jax.Array, jax.Array]:
  """(sum of log p over each response's tokens, number of those tokens), [B * L] each."""
  logp_BL, weights_BL = response_token_log_probs(model, params, batch, rng, tokens, mask)
  segment_ids_BL = batch['segment_ids']
  return losses.segment_sums(logp_BL, segment_ids_BL), losses.segment_sums(weights_BL,
                                                                           segment_ids_BL)


# DPO's precomputed reference (train/dpo.py `precompute_reference`): per-token
# log-probs of the chosen and rejected rows, aligned fields of the preference
# data holding float32 bit patterns (the shards store int32).
REFERENCE_FIELDS = ('ref_chosen_logp', 'ref_rejected_logp')


def precomputed_reference_log_probs(batch: Batch) -> tuple[jax.Array, jax.Array]:
  """The reference's per-pair (chosen, rejected) log-prob sums [B * L] from REFERENCE_FIELDS."""
  chosen, rejected = (
      losses.segment_sums(jax.lax.bitcast_convert_type(batch[name], jax.numpy.float32),
                          batch['segment_ids']) for name in REFERENCE_FIELDS)
  return chosen, rejected


def reward_model(model: nn.Module, centering: float = 0.0, use_margin: bool = True,
                 dropout: bool = False, kinds: tuple[str, ...] = ()) -> LossFn:
  """Bradley-Terry on a scalar-head model's scores of each pair (losses.bradley_terry).

  kinds: the data's kind names (preference_data.kind_names): the sums then
  hold the accuracy per kind too (`per_kind_accuracy`).
  """
  def loss_fn(params, batch, rng, frozen):
    del frozen
    chosen_P, rejected_P = pair_scores(model, params, batch, rng if dropout else None)
    margin_P = pair_margins(batch) if use_margin else None
    weights_P = pair_weights(batch)
    total, sums = losses.bradley_terry(chosen_P, rejected_P, weights_P, margin_P, centering)
    sums.update(per_kind_accuracy(chosen_P > rejected_P, weights_P, batch, kinds))
    return total, sums
  return loss_fn


def reference_params(frozen: Any) -> Any:
  """The frozen reference policy: frozen['reference'], or with LoRA the base (frozen['base'])."""
  return frozen['reference'] if 'reference' in frozen else frozen['base']


def dpo(model: nn.Module, beta: float = 0.1, label_smoothing: float = 0.0,
        loss_type: str = 'sigmoid', dropout: bool = False, kinds: tuple[str, ...] = ()
        ) -> LossFn:
  """DPO / cDPO / IPO (losses.dpo) of the policy `params` against the frozen reference.

  The reference's log-probs come from a forward pass of
  `reference_params(frozen)` (no gradient; the same weights as the policy at
  step 0, so the loss starts at log 2 for sigmoid DPO), or, when the batch
  carries REFERENCE_FIELDS, from those precomputed per-token values. With
  `kinds`, the implicit reward's accuracy per kind too (`per_kind_accuracy`).
  """
  def loss_fn(params, batch, rng, frozen):
    rngs = (None, None) if not dropout or rng is None else tuple(jax.random.split(rng))
    chosen_P, chosen_tokens_P = response_log_probs(model, params, batch, rngs[0],
                                                   'tokens', 'chosen_mask')
    rejected_P, rejected_tokens_P = response_log_probs(model, params, batch, rngs[1],
                                                       'rejected', 'rejected_mask')
    if REFERENCE_FIELDS[0] in batch:  # precomputed: no reference pass
      ref_chosen_P, ref_rejected_P = precomputed_reference_log_probs(batch)
    else:
      reference = reference_params(frozen)
      ref_chosen_P, _ = response_log_probs(model, reference, batch, None, 'tokens',
                                           'chosen_mask')
      ref_rejected_P, _ = response_log_probs(model, reference, batch, None, 'rejected',
                                             'rejected_mask')
    ref_chosen_P = jax.lax.stop_gradient(ref_chosen_P)
    ref_rejected_P = jax.lax.stop_gradient(ref_rejected_P)
    weights_P = pair_weights(batch)
    total, sums = losses.dpo(chosen_P, rejected_P, ref_chosen_P, ref_rejected_P, weights_P,
                             beta=beta, label_smoothing=label_smoothing, loss_type=loss_type,
                             chosen_tokens_P=chosen_tokens_P,
                             rejected_tokens_P=rejected_tokens_P)
    # Right as `rewards_accuracy` counts it: chosen's implicit reward above rejected's.
    correct_P = (chosen_P - ref_chosen_P) > (rejected_P - ref_rejected_P)
    sums.update(per_kind_accuracy(correct_P, weights_P, batch, kinds))
    return total, sums
  return loss_fn
