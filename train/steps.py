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

from model.platform import mesh_platform
from train import mesh as mesh_lib
from train import objectives
from train import optimizer as optimizer_lib
from train.state import TrainState

Batch = objectives.Batch

# On CPU the steps ask XLA for no YNNPACK library fusions: every dot is XLA's
# own dot kernel (its DotThunk) and the elementwise work and reductions are its
# own fusions. By default YNNPACK also takes in the elementwise ops and
# reductions next to a dot; in attention's gradient that fused its small
# batched dots with the softmax's row sums, which then ran at ~8 GFLOP/s.
# Measured on `bench_cpu` (README, Performance), each time in paired,
# alternated runs in one process: one YNNPACK call per dot
# ('LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT') was 2-3% faster than the default,
# and no library fusion at all 3% faster again (paired 0.976, 0.971, 0.971;
# `tiny` 0.957); XLA's dot kernel is also faster alone at the step's smaller
# shapes (173 against 158 GFLOP/s for [4096, 384] x [384, 384]).
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}


def compiler_options(mesh: jax.sharding.Mesh) -> dict[str, str] | None:
  """The XLA options the steps are compiled with on `mesh`'s platform (CPU only)."""
  return dict(CPU_COMPILER_OPTIONS) if mesh_platform(mesh) == 'cpu' else None


@dataclasses.dataclass(frozen=True)
class Step:
  """A pure step function together with how it is jitted."""
  fn: Callable[..., Any]
  in_shardings: Any
  out_shardings: Any
  donate_argnums: tuple[int, ...]
  # Trailing arguments passed to every call (a stage's frozen trees), so the
  # loop calls step(state, batch) whatever the stage.
  bound: tuple[Any, ...] = ()
  compiler_options: dict[str, str] | None = None

  jitted: Any = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    # Jitted once here, so every call reuses the same compiled executable.
    object.__setattr__(self, 'jitted', jax.jit(
        self.fn, in_shardings=self.in_shardings, out_shardings=self.out_shardings,
        donate_argnums=self.donate_argnums, compiler_options=self.compiler_options))

  def __call__(self, *args):
    return self.jitted(*args, *self.bound)

  def lower(self, *args):
    return self.jitted.lower(*args, *self.bound)


@contextlib.contextmanager
def sharding_context(mesh: jax.sharding.Mesh, rules: mesh_lib.Rules):
  """Makes the model's logical activation constraints resolve against `mesh`.

  An abstract mesh (not `jax.set_mesh`) so it can be entered while tracing,
  and so the same code lowers for a TPU topology that is not attached.
  """
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


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


def averaged_metrics(aux_sums: Mapping[str, jax.Array], prefix: str) -> dict[str, jax.Array]:
  """`<prefix>/<name>`: each sum over the count, `num_*` as totals (train/objectives.py).

  Per-group sums (`<name>/<group>`, see `evaluate_batches`) are left out: a
  batch holds too few of a group for a figure worth logging every step.
  """
  count = aux_sums['count']
  denominator = jnp.maximum(count, 1.0)
  out = {}
  for name, value in aux_sums.items():
    if name == 'count' or '/' in name:
      continue
    out[f'{prefix}/{name}'] = value if name.startswith('num_') else value / denominator
  return out


def default_loss(config: Any, model: nn.Module) -> objectives.LossFn:
  """Pre-training's objective: next-token cross-entropy plus the configured z-loss."""
  return objectives.next_token(model, z_loss=float(config.loss.z_loss),
                               dropout=float(config.model.dropout_rate) > 0.0)


def make_train_step(config: Any, model: nn.Module, mesh: jax.sharding.Mesh,
                    state_shardings: TrainState, batch_sharding: Any, *,
                    loss_fn: objectives.LossFn | None = None, frozen: Any = None,
                    frozen_shardings: Any = None, num_train_steps: int | None = None) -> Step:
  """`train_step(state, batch) -> (state, metrics)` with the state donated.

  `loss_fn(params, batch, rng, frozen) -> (sum_loss, aux_sums)` (default: the
  next-token loss) is differentiated as a sum and divided by the count of the
  whole global batch, also under gradient accumulation (micro-batch sums add
  up), so the gradient is exactly that of the batch mean. `frozen` (a tree of
  arrays the stage does not train, placed with `frozen_shardings`) is passed to
  every call as a jitted argument of its own: never donated, never updated.
  `batch_sharding`: one sharding for every batch field, a dict per field, or
  None to take each field's sharding from the array itself.
  """
  rules = mesh_lib.logical_rules(config.mesh)
  length = int(config.num_train_steps if num_train_steps is None else num_train_steps)
  tx, schedule = optimizer_lib.make_optimizer(config.optimizer, length)
  accum_steps = int(config.optimizer.grad_accum_steps)
  loss_fn = loss_fn or default_loss(config, model)
  param_shardings = state_shardings.params
  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Batch, frozen_tree: Any
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    with sharding_context(mesh, rules):
      rng = jax.random.fold_in(state.rng, state.step)
      if accum_steps == 1:
        grads, aux_sums = grad_fn(state.params, batch, rng, frozen_tree)
      else:
        micro_batches = _split_micro_batches(batch, accum_steps)

        def accumulate(carry, xs):
          grads_acc, aux_acc = carry
          micro_batch, index = xs
          grads, aux = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index),
                               frozen_tree)
          return (jax.tree.map(jnp.add, grads_acc, grads),
                  jax.tree.map(jnp.add, aux_acc, aux)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
        aux_shapes = jax.eval_shape(
            lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro_batches), rng,
                            frozen_tree)[1])
        aux_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes)
        (grads, aux_sums), _ = jax.lax.scan(
            accumulate, (zeros, aux_zeros), (micro_batches, jnp.arange(accum_steps)))

      # The gradient of the sum over the global count: the gradient of the mean.
      scale = 1.0 / jnp.maximum(aux_sums['count'], 1.0)
      grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
      grad_norm = optax.global_norm(grads)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
      metrics = averaged_metrics(aux_sums, 'train')
      metrics['train/grad_norm'] = grad_norm
      metrics['train/learning_rate'] = schedule(state.step)
      return new_state, metrics

  replicated = mesh_lib.replicated(mesh)
  return Step(fn=train_step,
              in_shardings=(state_shardings, batch_sharding, frozen_shardings),
              out_shardings=(state_shardings, replicated),
              donate_argnums=(0,), bound=(frozen,), compiler_options=compiler_options(mesh))


def make_eval_step(config: Any, model: nn.Module, mesh: jax.sharding.Mesh,
                   param_shardings: Any, batch_sharding: Any, *,
                   loss_fn: objectives.LossFn | None = None, frozen: Any = None,
                   frozen_shardings: Any = None) -> Step:
  """`eval_step(params, batch) -> aux_sums` of `loss_fn` (no dropout, no z-loss).

  For the next-token loss that is {'loss' (nats), 'count' (target tokens), ...};
  `evaluate_batches` adds them up over a split.
  """
  rules = mesh_lib.logical_rules(config.mesh)
  loss_fn = loss_fn or objectives.next_token(model)

  def eval_step(params: Any, batch: Batch, frozen_tree: Any) -> dict[str, jax.Array]:
    with sharding_context(mesh, rules):
      _, aux_sums = loss_fn(params, batch, None, frozen_tree)
      return aux_sums

  return Step(fn=eval_step,
              in_shardings=(param_shardings, batch_sharding, frozen_shardings),
              out_shardings=mesh_lib.replicated(mesh),
              donate_argnums=(), bound=(frozen,), compiler_options=compiler_options(mesh))


def evaluate_batches(eval_step: Callable[[Any, Batch], Mapping[str, jax.Array]], params: Any,
                     batches: Iterable[Batch]) -> dict[str, float]:
  """The loss's sums over all `batches`, each divided by the total count.

  Returns {'loss', 'perplexity', 'nats' (the summed loss), 'count',
  'num_tokens', and every other aux entry averaged (or totalled for num_*)}.
  An entry `<name>/<group>` is a sum over one group of the units (e.g. the
  preference pairs of one kind) and is averaged over `count/<group>`, which
  is reported as a total; a group with no unit in the split is left out.
  Per-batch sums stay on device until the end (no host sync per batch) and are
  added in float64 on the host.
  """
  results = jax.device_get([eval_step(params, batch) for batch in batches])
  if not results:
    raise ValueError('evaluate_batches: no batches.')
  sums = {k: float(np.sum([np.float64(r[k]) for r in results])) for k in results[0]}
  count = sums['count']
  if count == 0:
    raise ValueError('evaluate_batches: the batches hold nothing to score (count 0).')
  out = {}
  for name, value in sums.items():
    base, _, group = name.partition('/')
    if name == 'count' or (group and not sums[f'count/{group}']):
      continue
    if name.startswith('num_') or base == 'count':
      out[name] = value
    else:
      out[name] = value / (sums[f'count/{group}'] if group else count)
  out.update(count=count, nats=sums['loss'], perplexity=math.exp(min(out['loss'], 700.0)))
  out.setdefault('num_tokens', count)
  return out
