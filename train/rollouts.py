"""Rollouts: prompts in, sampled completions with their log-probs out, as training rows.

The policy generates with `model/decode.py`'s jitted KV-cache sampler, on the
training mesh, with the current parameters in place (no copy to another
engine). The decoder already returns the raw-model log-prob of every emitted
token (no temperature or truncation applied), which is the behaviour policy's
log-prob PPO's ratio needs.

Layout. A rollout row is its prompt followed by its completion, right-padded
to T = P + N (P the prompt width, N = max_new_tokens):

  tokens_BT   [p_0 .. p_{len-1} c_0 c_1 .. c_{n-1} pad ...]
  segment_ids 1 on the prompt and the generated tokens, 0 on padding

Per-token quantities live in response space, [B, N], column j being the
completion's token j: `logp_BN` (log-prob of c_j), values, rewards,
advantages. Token c_j is predicted at row position len + j - 1, so
`response_positions` is where the policy's logits (and the value head's
state value) for column j are read. `mask_BN` is 1 on the generated tokens,
the stop token included.

A completion that reaches max_new_tokens without a stop token is
*truncated*; the config either masks it out of the loss or keeps it with its
reward lowered by a penalty (train/rl.py).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import chat
from model import decode
from train import objectives


class PromptStream(Iterator[dict[str, np.ndarray]]):
  """Endless batches of prompts, reshuffled each epoch; its position is checkpointed.

  Yields {'prompt_BP' int32 [B, width], 'lengths_B', 'index_B' (into
  `examples`)} with every prompt repeated `group_size` times consecutively
  (B = prompts_per_batch * group_size). `get_state`/`set_state` are the
  loader protocol the training loop saves with each checkpoint, so a resumed
  run draws the same prompts as an uninterrupted one.
  """

  def __init__(self, encoded: Sequence[Sequence[int]], *, prompts_per_batch: int,
               group_size: int, width: int, pad_id: int, seed: int):
    if len(encoded) < prompts_per_batch:
      raise ValueError(f'{len(encoded)} prompts are fewer than the {prompts_per_batch} of a '
                       'batch.')
    self.encoded = [list(ids) for ids in encoded]
    self.prompts_per_batch, self.group_size = prompts_per_batch, group_size
    self.width, self.pad_id, self.seed = width, pad_id, seed
    self.epoch, self.position = 0, 0

  def _order(self) -> np.ndarray:
    return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.encoded))

  def __next__(self) -> dict[str, np.ndarray]:
    if self.position + self.prompts_per_batch > len(self.encoded):
      self.epoch, self.position = self.epoch + 1, 0
    chosen = self._order()[self.position:self.position + self.prompts_per_batch]
    self.position += self.prompts_per_batch
    index_B = np.repeat(chosen, self.group_size)
    prompt_BP = np.full((len(index_B), self.width), self.pad_id, np.int32)
    lengths_B = np.zeros(len(index_B), np.int32)
    for row, i in enumerate(index_B):
      ids = self.encoded[i]
      prompt_BP[row, :len(ids)] = ids
      lengths_B[row] = len(ids)
    return {'prompt_BP': prompt_BP, 'lengths_B': lengths_B, 'index_B': index_B.astype(np.int32)}

  def get_state(self) -> dict[str, int]:
    return {'epoch': self.epoch, 'position': self.position}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.epoch, self.position = int(state['epoch']), int(state['position'])


def sample(model: nn.Module, params: Any, prompt_BP: jax.Array, lengths_B: jax.Array,
           rng: jax.Array, *, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
           stop_ids: tuple[int, ...], pad_id: int, mesh: jax.sharding.Mesh | None = None,
           rules: Any = None) -> decode.DecodeOutput:
  """Samples one completion per row with the KV-cache decoder (compiled once per shape)."""
  return decode.generate(model, params, prompt_BP, lengths_B, max_new_tokens=max_new_tokens,
                         rng=rng, temperature=temperature, top_k=top_k, top_p=top_p,
                         eos_id=stop_ids, pad_id=pad_id, mesh=mesh, rules=rules)


def make_rows(prompt_BP: jax.Array, lengths_B: jax.Array, tokens_BN: jax.Array,
              mask_BN: jax.Array, pad_id: int) -> dict[str, jax.Array]:
  """The rows [prompt + completion] and the indices that map response columns to them.

  Returns {'tokens', 'segment_ids', 'positions' [B, T]; 'response_positions'
  [B, N] (the row position whose output predicts column j: len + j - 1);
  'last_positions' [B] (the row position of the last generated token, where a
  reward model reads its score)}.
  """
  batch, width = prompt_BP.shape
  new = tokens_BN.shape[1]
  total = width + new
  lengths_B = lengths_B.astype(jnp.int32)
  columns_T = jnp.arange(total, dtype=jnp.int32)
  prompt_BT = jnp.pad(prompt_BP.astype(jnp.int32), ((0, 0), (0, new)), constant_values=pad_id)
  prompt_BT = jnp.where(columns_T[None, :] < lengths_B[:, None], prompt_BT, pad_id)
  targets_BN = lengths_B[:, None] + jnp.arange(new, dtype=jnp.int32)[None, :]
  rows_B1 = jnp.arange(batch)[:, None]
  tokens_BT = prompt_BT.at[rows_B1, targets_BN].set(
      jnp.where(mask_BN, tokens_BN, pad_id).astype(jnp.int32))
  generated_B = jnp.sum(mask_BN.astype(jnp.int32), axis=1)
  ends_B = lengths_B + generated_B
  segment_ids_BT = (columns_T[None, :] < ends_B[:, None]).astype(jnp.int32)
  return {'tokens': tokens_BT, 'segment_ids': segment_ids_BT,
          'positions': jnp.broadcast_to(columns_T, (batch, total)),
          'response_positions': targets_BN - 1,
          'last_positions': jnp.maximum(ends_B - 1, 0)}


def _at_response(values_BT: jax.Array, response_positions_BN: jax.Array) -> jax.Array:
  if values_BT.ndim == 3:
    return jnp.take_along_axis(values_BT, response_positions_BN[..., None], axis=1)
  return jnp.take_along_axis(values_BT, response_positions_BN, axis=1)


def token_logprobs(model: nn.Module, params: Any, rows: Mapping[str, jax.Array],
                   targets_BN: jax.Array, *, with_entropy: bool = False
                   ) -> tuple[jax.Array, jax.Array | None]:
  """(log pi(c_j | row prefix) [B, N], entropy of that distribution [B, N] or None).

  The model is called through `objectives.forward`, so adapters (LoRA) apply.
  """
  logits_BTV = objectives.forward(model, params, rows, None)
  logits_BNV = _at_response(logits_BTV, rows['response_positions']).astype(jnp.float32)
  logp_BNV = jax.nn.log_softmax(logits_BNV, axis=-1)
  logp_BN = jnp.take_along_axis(logp_BNV, targets_BN[..., None], axis=-1)[..., 0]
  entropy_BN = -jnp.sum(jnp.exp(logp_BNV) * logp_BNV, axis=-1) if with_entropy else None
  return logp_BN, entropy_BN


def state_values(model: nn.Module, value_params: Any, rows: Mapping[str, jax.Array]) -> jax.Array:
  """The value head's V of the state each response token is emitted from, [B, N]."""
  values_BT = objectives.forward(model, value_params, rows, None, head='scalar')
  return _at_response(values_BT, rows['response_positions'])


def completion_texts(tokenizer: Any, tokens_BN: np.ndarray, mask_BN: np.ndarray
                     ) -> list[str]:
  """The text of each row's completion, up to (not including) its stop token."""
  return [chat.parse_completion(tokenizer, [int(t) for t, m in zip(row, row_mask) if m])[0]
          for row, row_mask in zip(tokens_BN, mask_BN)]
