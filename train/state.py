"""The train state and its creation directly in its sharded layout.

Nothing is ever materialised on one device and then scattered: the init
function is traced with `jax.eval_shape`, its logical partition specs become
`NamedSharding`s through the rules, and `jax.jit(init, out_shardings=...)`
makes every device compute only its own shards.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from train import mesh as mesh_lib
from train import optimizer as optimizer_lib


class TrainState(struct.PyTreeNode):
  """Everything a step changes. `apply_fn` is deliberately not stored (not a pytree)."""
  step: jax.Array      # int32 scalar: number of optimizer updates done
  params: Any          # plain arrays (the logical-partitioning boxes are removed)
  opt_state: Any
  rng: jax.Array       # raw uint32 key; the step folds `step` into it


def _as_raw_key(rng: jax.Array) -> jax.Array:
  """Raw uint32 key data: checkpoints store a plain array, not a typed key."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return rng


def _dummy_tokens(config: Any) -> jax.Array:
  # Parameter shapes do not depend on the length; seq_len keeps attention
  # kernels with block-size constraints happy.
  return jnp.zeros((1, int(config.seq_len)), jnp.int32)


def _boxed_params(config: Any, model: nn.Module, rng: jax.Array) -> Any:
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({'params': params_rng, 'dropout': dropout_rng},
                         _dummy_tokens(config), deterministic=True)
  return variables['params']


def _init_fn(config: Any, model: nn.Module, tx: optax.GradientTransformation):
  return state_init_fn(
      lambda rng: nn.meta.unbox(_boxed_params(config, model, rng)), tx)


def state_init_fn(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation
                  ) -> Callable[[jax.Array], TrainState]:
  """rng -> a fresh TrainState over `init_params(rng)`'s trainable tree.

  The full model's params for a plain run; only the adapters for a LoRA run
  (train/lora.py), whose base params are never part of the state.
  """
  def init(rng: jax.Array) -> TrainState:
    rng = _as_raw_key(rng)
    init_rng, state_rng = jax.random.split(rng)
    params = init_params(init_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=state_rng)
  return init


def boxed_param_shapes(config: Any, model: nn.Module) -> Any:
  """The model's params as ShapeDtypeStructs in their logical-partitioning boxes (no compute)."""
  return jax.eval_shape(lambda rng: _boxed_params(config, model, rng), jax.random.PRNGKey(0))


def param_shardings(config: Any, model: nn.Module, mesh: jax.sharding.Mesh) -> Any:
  """NamedSharding per parameter, from the model's logical axis names and the rules."""
  rules = mesh_lib.logical_rules(config.mesh)
  logical_specs = nn.get_partition_spec(boxed_param_shapes(config, model))
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def shardings_for(tx: optax.GradientTransformation, abstract: TrainState, params: Any,
                  mesh: jax.sharding.Mesh) -> TrainState:
  """The state's shardings given its params' (`params`): moments mirror them."""
  replicated = mesh_lib.replicated(mesh)
  # Optimizer moments mirror the parameters' layout; counters are replicated.
  opt_state = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract.opt_state, params,
      transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=params, opt_state=opt_state, rng=replicated)


def _state_shardings(config: Any, model: nn.Module, mesh: jax.sharding.Mesh,
                     tx: optax.GradientTransformation, abstract: TrainState) -> TrainState:
  return shardings_for(tx, abstract, param_shardings(config, model, mesh), mesh)


def abstract_state(config: Any, model: nn.Module, mesh: jax.sharding.Mesh
                   ) -> tuple[TrainState, TrainState]:
  """(ShapeDtypeStruct tree carrying shardings, shardings); allocates nothing.

  Used to restore checkpoints onto a mesh and to AOT-compile the step.
  """
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
  shapes = jax.eval_shape(_init_fn(config, model, tx), jax.random.PRNGKey(0))
  shardings = _state_shardings(config, model, mesh, tx, shapes)
  abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  return abstract, shardings


def create_sharded_state(config: Any, model: nn.Module, mesh: jax.sharding.Mesh,
                         rng: jax.Array) -> tuple[TrainState, TrainState]:
  """Initialises the state with every array created directly in its sharding."""
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
  init = _init_fn(config, model, tx)
  _, shardings = abstract_state(config, model, mesh)
  # A host copy of the key: it may be committed to some other device.
  rng = np.asarray(jax.device_get(_as_raw_key(rng)))
  state = jax.jit(init, in_shardings=mesh_lib.replicated(mesh), out_shardings=shardings)(rng)
  return state, shardings


def trainable_params(abstract: TrainState) -> int:
  """How many numbers the optimizer trains (the adapters only, in a LoRA run)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params)))


def optimizer_bytes(abstract: TrainState) -> int:
  """Bytes of the optimizer state (moments and counters), over all devices."""
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(abstract.opt_state)))
