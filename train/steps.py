"""The pure train and eval steps, jitted once with explicit shardings.

`make_train_step` returns a `Step`: call it like the jitted function, or take
its pure `fn`, `in_shardings`, `out_shardings` and `donate_argnums` to lower
it for another topology with abstract inputs (AOT compilation):

  step = make_train_step(config, model, mesh, state_shardings, batch_sharding)
  step.lower(abstract_state, abstract_batch).compile()
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import losses
from train import mesh as mesh_lib
from train import optimizer as optimizer_lib
from train.state import TrainState

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Step:
  """A pure step function together with how it is jitted."""
  fn: Callable[..., Any]
  in_shardings: Any
  out_shardings: Any
  donate_argnums: tuple[int, ...]

  jitted: Any = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    # Jitted once here, so every call reuses the same compiled executable.
    object.__setattr__(self, 'jitted', jax.jit(
        self.fn, in_shardings=self.in_shardings, out_shardings=self.out_shardings,
        donate_argnums=self.donate_argnums))

  def __call__(self, *args):
    return self.jitted(*args)

  def lower(self, *args):
    return self.jitted.lower(*args)


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, rules: mesh_lib.Rules):
  """Makes the model's logical activation constraints resolve against `mesh`.

  An abstract mesh (not `jax.set_mesh`) so it can be entered while tracing,
  and so the same code lowers for a TPU topology that is not attached.
  """
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def _forward(model: nn.Module, params: Any, batch: Batch, *, deterministic: bool,
             rng: jax.Array | None) -> jax.Array:
  rngs = {} if rng is None else {'dropout': rng}
  return model.apply({'params': params}, batch['tokens'],
                     segment_ids=batch.get('segment_ids'), positions=batch.get('positions'),
                     deterministic=deterministic, rngs=rngs)


def _split_micro_batches(batch: Batch, k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, ...

  Strided rather than contiguous so that every device holds an equal part of
  every micro-batch (the batch dimension stays sharded, no data moves).
  """
  def split(x: jax.Array) -> jax.Array:
    if x.shape[0] % k:
      raise ValueError(f'batch size {x.shape[0]} is not divisible by grad_accum_steps={k}.')
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
  return {name: split(x) for name, x in batch.items()}


def make_train_step(config: Any, model: nn.Module, mesh: jax.sharding.Mesh,
                    state_shardings: TrainState,
                    batch_sharding: jax.sharding.Sharding) -> Step:
  """`train_step(state, batch) -> (state, metrics)` with the state donated.

  The loss is the mean NLL over every target token of the global batch (plus
  z-loss), also under gradient accumulation: micro-batch losses are sums
  divided by the global token count, so their gradients add up exactly.
  """
  rules = mesh_lib.logical_rules(config.mesh)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
  accum_steps = int(config.optimizer.grad_accum_steps)
  z_loss = float(config.loss.z_loss)
  deterministic = float(config.model.dropout_rate) == 0.0
  param_shardings = state_shardings.params

  def loss_fn(params, batch, rng, denominator):
    logits_BLV = _forward(model, params, batch, deterministic=deterministic, rng=rng)
    targets_BL, weights_BL = losses.next_token_targets(batch)
    sum_loss, sum_z, _ = losses.cross_entropy(logits_BLV, targets_BL, weights_BL, z_loss)
    return (sum_loss + sum_z) / denominator, (sum_loss, sum_z)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
    with sharding_context(mesh, rules):
      rng = jax.random.fold_in(state.rng, state.step)
      _, weights_BL = losses.next_token_targets(batch)
      num_tokens = jnp.sum(weights_BL)
      denominator = jnp.maximum(num_tokens, 1.0)

      if accum_steps == 1:
        (_, (sum_loss, sum_z)), grads = grad_fn(state.params, batch, rng, denominator)
      else:
        micro_batches = _split_micro_batches(batch, accum_steps)

        def accumulate(carry, xs):
          grads_acc, loss_acc, z_acc = carry
          micro_batch, index = xs
          (_, (sum_loss, sum_z)), grads = grad_fn(
              state.params, micro_batch, jax.random.fold_in(rng, index), denominator)
          grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
          return (grads_acc, loss_acc + sum_loss, z_acc + sum_z), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
        init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        (grads, sum_loss, sum_z), _ = jax.lax.scan(
            accumulate, init, (micro_batches, jnp.arange(accum_steps)))

      grad_norm = optax.global_norm(grads)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
      metrics = {
          'train/loss': sum_loss / denominator,
          'train/z_loss': sum_z / denominator,
          'train/grad_norm': grad_norm,
          'train/learning_rate': schedule(state.step),
          'train/num_tokens': num_tokens,
      }
      return new_state, metrics

  replicated = mesh_lib.replicated(mesh)
  return Step(fn=train_step,
              in_shardings=(state_shardings, batch_sharding),
              out_shardings=(state_shardings, replicated),
              donate_argnums=(0,))


def make_eval_step(config: Any, model: nn.Module, mesh: jax.sharding.Mesh,
                   param_shardings: Any, batch_sharding: jax.sharding.Sharding) -> Step:
  """`eval_step(params, batch) -> {'nats', 'num_tokens'}` (sums, no z-loss, no dropout)."""
  rules = mesh_lib.logical_rules(config.mesh)

  def eval_step(params: Any, batch: Batch) -> dict[str, jax.Array]:
    with sharding_context(mesh, rules):
      logits_BLV = _forward(model, params, batch, deterministic=True, rng=None)
      targets_BL, weights_BL = losses.next_token_targets(batch)
      nats, _, num_tokens = losses.cross_entropy(logits_BLV, targets_BL, weights_BL)
      return {'nats': nats, 'num_tokens': num_tokens}

  return Step(fn=eval_step,
              in_shardings=(param_shardings, batch_sharding),
              out_shardings=mesh_lib.replicated(mesh),
              donate_argnums=())


def evaluate_batches(eval_step: Callable[[Any, Batch], Mapping[str, jax.Array]], params: Any,
                     batches: Iterable[Batch]) -> dict[str, float]:
  """Mean NLL per target token over all `batches`: {'loss','perplexity','nats','num_tokens'}.

  Per-batch sums stay on device until the end (no host sync per batch) and are
  added in float64 on the host.
  """
  results = [eval_step(params, batch) for batch in batches]
  results = jax.device_get(results)
  nats = float(np.sum([np.float64(r['nats']) for r in results]))
  num_tokens = float(np.sum([np.float64(r['num_tokens']) for r in results]))
  if num_tokens == 0:
    raise ValueError('evaluate_batches: the batches hold no target tokens.')
  loss = nats / num_tokens
  return {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)),
          'nats': nats, 'num_tokens': num_tokens}
