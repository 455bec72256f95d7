"""Batched autoregressive generation with the KV cache, and an uncached reference.

`decode_tokens` is pure and jittable (sampling knobs, lengths and the model are
static): one prefill call writes the whole right-padded prompt batch into the
cache, then a single `lax.while_loop` feeds one token per step until every row
has produced EOS or `max_new_tokens` tokens. `generate` wraps it for callers on
the host: it takes a list of prompts (or a padded array and lengths), caches
the compiled function, and can run under a mesh and logical-axis rules so that
parameters sharded as in training are used in place.

Padding. Prompts are right-padded (`prompt_BP[b, :lengths[b]]` is row b) and
the padding goes in with segment id 0. The cache (see model.attention) never
attends a slot with segment id 0 and moves each row's write index to just after
its last real token, so a row's generated tokens overwrite its own padding and
follow its prompt with contiguous positions `lengths[b], lengths[b] + 1, ...`.
A finished row feeds padding (segment id 0), which leaves its cache untouched.

Log-probabilities. `logprobs` is the log-prob of each emitted token under the
raw model distribution (log_softmax of the logits, no temperature or
truncation) -- what RL's importance ratios and KL terms need.
`sampling_logprobs` is under the distribution the token was actually drawn
from (after temperature / top-k / top-p; 0 under greedy). Both are 0 where
`mask` is False.

The prompts are token ids as given: a model trained on [BOS] + text + [EOS]
documents wants its prompts to start with BOS (train.generate adds it).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from model.sampling import SamplingConfig, sample_with_logprobs
from model.transformer import init_cache


@flax.struct.dataclass
class DecodeOutput:
  """What generation returns; N = max_new_tokens.

  tokens: [B, N] int32, the generated tokens (the EOS included), pad_id after.
  logprobs: [B, N] float32, raw model log-prob of each token (0 where not mask).
  sampling_logprobs: [B, N] float32, log-prob under the sampling distribution.
  mask: [B, N] bool, True where a token was generated (up to and with EOS).
  done: [B] bool, True for rows that produced EOS (or another stop id).
  lengths: [B] int32, number of generated tokens per row (= mask.sum(1)).
  num_steps: int32 scalar, token positions the loop ran (< N if it stopped early).
  """
  tokens: jax.Array
  logprobs: jax.Array
  sampling_logprobs: jax.Array
  mask: jax.Array
  done: jax.Array
  lengths: jax.Array
  num_steps: jax.Array


@flax.struct.dataclass
class _LoopState:
  step: jax.Array       # next column of the output to fill
  tokens_BN: jax.Array
  logprobs_BN: jax.Array
  sampling_logprobs_BN: jax.Array
  mask_BN: jax.Array
  done_B: jax.Array
  extra: Any           # the cache (cached path) or the token buffer (uncached path)


# ------------------------------------------------------------------- the loop

def _empty_state(batch: int, max_new_tokens: int, pad_id: int, extra: Any) -> _LoopState:
  shape = (batch, max_new_tokens)
  return _LoopState(step=jnp.zeros((), jnp.int32),
                    tokens_BN=jnp.full(shape, pad_id, jnp.int32),
                    logprobs_BN=jnp.zeros(shape, jnp.float32),
                    sampling_logprobs_BN=jnp.zeros(shape, jnp.float32),
                    mask_BN=jnp.zeros(shape, jnp.bool_),
                    done_B=jnp.zeros((batch,), jnp.bool_),
                    extra=extra)


def stop_ids(eos_id: int | Sequence[int]) -> tuple[int, ...]:
  """`eos_id` as a tuple: generation stops at any of them (EOS, or `<|end|>` for chat)."""
  return (int(eos_id),) if isinstance(eos_id, (int, np.integer)) else tuple(map(int, eos_id))


def _emit(state: _LoopState, logits_BV: jax.Array, rng: jax.Array, sampling: SamplingConfig,
          eos_id: int | tuple[int, ...] | None, pad_id: int) -> _LoopState:
  """Samples column `state.step` from `logits_BV`; finished rows get pad."""
  step = state.step
  # Folding in the step gives both paths (cached, uncached) the same draws.
  token_B, logprob_B, sampling_logprob_B = sample_with_logprobs(
      jax.random.fold_in(rng, step), logits_BV, sampling)
  active_B = ~state.done_B
  token_B = jnp.where(active_B, token_B, pad_id)
  done_B = state.done_B
  if eos_id is not None:
    stops = jnp.asarray(stop_ids(eos_id), jnp.int32)
    done_B = done_B | (active_B & jnp.isin(token_B, stops))

  def put(values_BN, column_B):
    return jax.lax.dynamic_update_slice_in_dim(values_BN, column_B[:, None], step, axis=1)

  return state.replace(
      step=step + 1,
      tokens_BN=put(state.tokens_BN, token_B),
      logprobs_BN=put(state.logprobs_BN, jnp.where(active_B, logprob_B, 0.0)),
      sampling_logprobs_BN=put(state.sampling_logprobs_BN,
                               jnp.where(active_B, sampling_logprob_B, 0.0)),
      mask_BN=put(state.mask_BN, active_B),
      done_B=done_B)


def _run(first_logits_BV: jax.Array, extra: Any,
         next_logits: Callable[[_LoopState], tuple[jax.Array, Any]], rng: jax.Array, *,
         max_new_tokens: int, sampling: SamplingConfig, eos_id: int | tuple[int, ...] | None,
         pad_id: int) -> DecodeOutput:
  """Emits column 0 from the prompt's logits, then loops `next_logits` + emit."""
  emit = functools.partial(_emit, rng=rng, sampling=sampling, eos_id=eos_id, pad_id=pad_id)
  state = _empty_state(first_logits_BV.shape[0], max_new_tokens, pad_id, extra)
  state = emit(state, first_logits_BV)

  def cond(state: _LoopState) -> jax.Array:
    return (state.step < max_new_tokens) & ~jnp.all(state.done_B)

  def body(state: _LoopState) -> _LoopState:
    logits_BV, extra = next_logits(state)
    return emit(state.replace(extra=extra), logits_BV)

  state = jax.lax.while_loop(cond, body, state)
  return DecodeOutput(tokens=state.tokens_BN, logprobs=state.logprobs_BN,
                      sampling_logprobs=state.sampling_logprobs_BN, mask=state.mask_BN,
                      done=state.done_B, lengths=state.mask_BN.sum(axis=1).astype(jnp.int32),
                      num_steps=state.step)


def _last_column(state: _LoopState) -> jax.Array:
  """The token emitted in the previous step (column step - 1), [B]."""
  return jax.lax.dynamic_index_in_dim(state.tokens_BN, state.step - 1, axis=1, keepdims=False)


def _prompt_inputs(prompt_BP: jax.Array, lengths_B: jax.Array, pad_id: int):
  length = prompt_BP.shape[1]
  real_BP = jnp.arange(length)[None, :] < lengths_B[:, None]
  tokens_BP = jnp.where(real_BP, prompt_BP, pad_id).astype(jnp.int32)
  positions_BP = jnp.where(real_BP, jnp.arange(length, dtype=jnp.int32)[None, :], 0)
  return tokens_BP, real_BP.astype(jnp.int32), positions_BP


def _at(values_BLV: jax.Array, index_B: jax.Array) -> jax.Array:
  return jnp.take_along_axis(values_BLV, index_B[:, None, None], axis=1)[:, 0]


# ------------------------------------------------------------ the two decoders

def decode_tokens(model: nn.Module, params: Any, prompt_BP: jax.Array, lengths_B: jax.Array,
                  rng: jax.Array, *, max_new_tokens: int, sampling: SamplingConfig,
                  eos_id: int | tuple[int, ...] | None, pad_id: int = 0, cache_len: int | None = None
                  ) -> DecodeOutput:
  """Cached generation; pure and jittable with everything after `rng` static.

  prompt_BP: right-padded prompts, int32; lengths_B: their lengths (>= 1), int32.
  cache_len: KV-cache slots per row; default P + max_new_tokens. It must hold
    every row's prompt and its new tokens (max(lengths) + max_new_tokens).
  """
  batch, prompt_len = prompt_BP.shape
  cache_len = cache_len or prompt_len + max_new_tokens
  lengths_B = lengths_B.astype(jnp.int32)
  tokens_BP, segments_BP, positions_BP = _prompt_inputs(prompt_BP, lengths_B, pad_id)
  cache = init_cache(model.config, batch, cache_len)
  logits_BPV, variables = model.apply(
      {'params': params, 'cache': cache}, tokens_BP, segment_ids=segments_BP,
      positions=positions_BP, decode=True, mutable=['cache'])
  first_logits_BV = _at(logits_BPV, lengths_B - 1)

  def next_logits(state: _LoopState):
    active_B = ~state.done_B
    token_B1 = jnp.where(active_B, _last_column(state), pad_id)[:, None]
    positions_B1 = (lengths_B + state.step - 1)[:, None]
    logits_B1V, variables = model.apply(
        {'params': params, 'cache': state.extra}, token_B1,
        segment_ids=active_B.astype(jnp.int32)[:, None], positions=positions_B1,
        decode=True, mutable=['cache'])
    return logits_B1V[:, 0], variables['cache']

  return _run(first_logits_BV, variables['cache'], next_logits, rng,
              max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id, pad_id=pad_id)


def decode_tokens_uncached(model: nn.Module, params: Any, prompt_BP: jax.Array,
                           lengths_B: jax.Array, rng: jax.Array, *, max_new_tokens: int,
                           sampling: SamplingConfig, eos_id: int | tuple[int, ...] | None, pad_id: int = 0,
                           cache_len: int | None = None) -> DecodeOutput:
  """Reference: every step recomputes the full forward pass over prompt + output.

  Same loop, same draws as `decode_tokens`; only where the next logits come
  from differs. Row b's sequence is its prompt followed by its generated tokens
  in one buffer of length P + max_new_tokens; positions are 0, 1, 2, ...
  `cache_len` is accepted for a uniform signature and ignored.
  """
  del cache_len
  batch, prompt_len = prompt_BP.shape
  total = prompt_len + max_new_tokens
  lengths_B = lengths_B.astype(jnp.int32)
  tokens_BP, _, _ = _prompt_inputs(prompt_BP, lengths_B, pad_id)
  buffer_BL = jnp.pad(tokens_BP, ((0, 0), (0, max_new_tokens)), constant_values=pad_id)
  positions_BL = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (batch, total))

  def forward(buffer_BL, filled_B):
    segments_BL = (positions_BL < filled_B[:, None]).astype(jnp.int32)
    logits_BLV = model.apply({'params': params}, buffer_BL, segment_ids=segments_BL,
                             positions=positions_BL, deterministic=True)
    return _at(logits_BLV, filled_B - 1)

  def next_logits(state: _LoopState):
    # Append the previous token at its row's end, then score the next position.
    rows_B = jnp.arange(batch)
    buffer_BL = state.extra.at[rows_B, lengths_B + state.step - 1].set(_last_column(state))
    return forward(buffer_BL, lengths_B + state.step), buffer_BL

  return _run(forward(buffer_BL, lengths_B), buffer_BL, next_logits, rng,
              max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id, pad_id=pad_id)


# -------------------------------------------------------- host-side wrappers

def _under_mesh(decoder: Callable[..., DecodeOutput]) -> Callable[..., DecodeOutput]:
  """`decoder` traced under `mesh` and logical-axis `rules` (both static).

  Entered while tracing (an abstract mesh, as train.steps does), so the model's
  logical activation constraints resolve against the training mesh, and the
  mesh and rules are part of the compilation cache key.
  """
  def traced(model, params, prompt_BP, lengths_B, rng, *, mesh, rules, **kwargs):
    context = contextlib.ExitStack()
    with context:
      if mesh is not None:
        context.enter_context(jax.sharding.use_abstract_mesh(mesh.abstract_mesh))
      if rules is not None:
        context.enter_context(nn.logical_axis_rules(rules))
      return decoder(model, params, prompt_BP, lengths_B, rng, **kwargs)

  static = ('model', 'max_new_tokens', 'sampling', 'eos_id', 'pad_id', 'cache_len', 'mesh',
            'rules')
  return jax.jit(traced, static_argnames=static)


_decode_jit = _under_mesh(decode_tokens)
_decode_uncached_jit = _under_mesh(decode_tokens_uncached)


def _hashable_rules(rules):
  if rules is None:
    return None
  return tuple((str(name), tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in rules)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0,
                multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token-id lists into ([B, P] int32, lengths [B] int32).

  P is the longest prompt rounded up to `multiple` (fewer distinct shapes,
  fewer compilations when prompt lengths vary).
  """
  if not prompts:
    raise ValueError('No prompts given.')
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError(f'Prompt {int(lengths.argmin())} is empty; a prompt needs at least one '
                     'token (usually BOS).')
  width = -(-int(lengths.max()) // multiple) * multiple
  out = np.full((len(prompts), width), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    out[row, :len(prompt)] = prompt
  return out, lengths


def _generate(decoder: Callable[..., DecodeOutput], model: nn.Module, params: Any,
              prompts, prompt_lengths, *, max_new_tokens: int, rng: jax.Array,
              temperature: float, top_k: int, top_p: float, greedy: bool,
              eos_id: int | tuple[int, ...] | None, pad_id: int, max_len: int | None,
              mesh: jax.sharding.Mesh | None, rules: Sequence[tuple[str, Any]] | None
              ) -> DecodeOutput:
  if prompt_lengths is None:
    prompt_BP, lengths_B = pad_prompts(prompts, pad_id)
  else:
    prompt_BP, lengths_B = prompts, prompt_lengths
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}.')
  needed = int(np.max(np.asarray(lengths_B))) + max_new_tokens
  cache_len = max_len or int(prompt_BP.shape[1]) + max_new_tokens
  if needed > cache_len:
    raise ValueError(f'The longest prompt plus max_new_tokens needs {needed} cache slots but '
                     f'max_len is {cache_len}.')
  if needed > model.config.max_len:
    raise ValueError(f'The longest prompt plus max_new_tokens is {needed} tokens, more than the '
                     f"model's max_len {model.config.max_len}.")
  sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
  return decoder(model, params, jnp.asarray(prompt_BP, jnp.int32),
                 jnp.asarray(lengths_B, jnp.int32), rng, max_new_tokens=max_new_tokens,
                 sampling=sampling, eos_id=eos_id, pad_id=pad_id, cache_len=cache_len,
                 mesh=mesh, rules=_hashable_rules(rules))


def generate(model: nn.Module, params: Any,
             prompts: Sequence[Sequence[int]] | jax.Array | np.ndarray,
             prompt_lengths: jax.Array | np.ndarray | None = None, *, max_new_tokens: int,
             rng: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             greedy: bool = False, eos_id: int | tuple[int, ...] | None, pad_id: int = 0,
             max_len: int | None = None, mesh: jax.sharding.Mesh | None = None,
             rules: Sequence[tuple[str, Any]] | None = None) -> DecodeOutput:
  """Generates up to `max_new_tokens` per prompt with the KV cache (jitted).

  prompts: a list of token-id lists, or a right-padded [B, P] array with
    `prompt_lengths` [B]. eos_id: a token id or a tuple of them (a chat model
    stops at `<|end|>` or EOS); None never stops early.
  max_len: KV-cache slots per row (default: P + max_new_tokens).
  mesh, rules: trace under this mesh and these logical-axis rules (as in
    training), so sharded params are used where they live.
  See the module docstring for the outputs and their log-probs.
  """
  return _generate(_decode_jit, model, params, prompts, prompt_lengths,
                   max_new_tokens=max_new_tokens, rng=rng, temperature=temperature, top_k=top_k,
                   top_p=top_p, greedy=greedy, eos_id=eos_id, pad_id=pad_id, max_len=max_len,
                   mesh=mesh, rules=rules)


def generate_uncached(model: nn.Module, params: Any,
                      prompts: Sequence[Sequence[int]] | jax.Array | np.ndarray,
                      prompt_lengths: jax.Array | np.ndarray | None = None, *,
                      max_new_tokens: int, rng: jax.Array, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                      eos_id: int | tuple[int, ...] | None, pad_id: int = 0, max_len: int | None = None,
                      mesh: jax.sharding.Mesh | None = None,
                      rules: Sequence[tuple[str, Any]] | None = None) -> DecodeOutput:
  """`generate` recomputing the whole forward pass every step (reference, benchmark)."""
  return _generate(_decode_uncached_jit, model, params, prompts, prompt_lengths,
                   max_new_tokens=max_new_tokens, rng=rng, temperature=temperature, top_k=top_k,
                   top_p=top_p, greedy=greedy, eos_id=eos_id, pad_id=pad_id, max_len=max_len,
                   mesh=mesh, rules=rules)
