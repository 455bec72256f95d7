"""Low-rank adapters (LoRA) over the model's parameter tree, for any fine-tuning stage.

A targeted weight W (a projection whose '/'-joined path matches `lora.targets`)
is used as

  W' = W + (alpha / rank) * A @ B,   A: [in..., rank] random, B: [rank, out...] zero,

so at step 0 the model is exactly the base. Only A and B are trained: the
state's `params` are the adapters (and the optimizer moments theirs); the base
params are a frozen tree, `frozen['base']`, passed to every step as a jitted
argument of its own (never donated, no gradient, no optimizer state). DPO and
RL use that same `frozen['base']` as their reference policy: the base without
adapters, at no extra memory.

How the adapters reach the model. Every stage calls the model through
`objectives.forward(model, params, ...)`. `wrap_loss` hands the stage's loss a
`LoraParams` (base + adapters + dropout keys) instead of a plain tree, and
`forward` turns it into the model's parameter tree in which each targeted leaf
is a `LoraWeight`. The layers read their weights as `jnp.asarray(w, dtype)`,
which calls `LoraWeight.__jax_array__`: W + scale * A @ B is formed there, in
float32, per layer and inside the layer scan, so the temporary is one layer's
weight, never a second copy of the model (see README "LoRA" for the 7b compile
memory). The model code needs no LoRA branch, and no stage needs LoRA code.

A and B are float32 whatever the base dtype, and are sharded with the logical
axes of the weight they adapt: A [in_axes..., 'lora_rank'], B ['lora_rank',
out_axes...] ('lora_rank' is replicated). The fan-in axes of a weight are its
first axis, except for a projection back to the residual stream (last axis
'embed', e.g. attn/wo [heads, kv, embed]), whose fan-in is every other axis.

`lora.dropout` zeroes, per step and per layer, a random subset of A's input
features (scaled by 1/(1-p)): dropout of the adapter's input, with one mask
shared by all tokens of the step (the adapter is applied as a merged weight,
so a per-token mask is not available).

Checkpoints of a LoRA run hold the adapters and their optimizer state only;
every step's `meta` records the base: {'path', 'step', 'fingerprint'}.
`fingerprint` hashes every base parameter's bytes (two index-weighted integer
sums of the raw bits per array, computed on device and exact whatever the
sharding, then SHA-256 over names, shapes, dtypes and sums): any changed
value changes it (not a cryptographic guarantee). A resume, `train.generate`
or `train.evaluate` against a base whose fingerprint differs is refused.

`merge` folds the adapters into the base for decoding and export: in float32,
then one cast to the base dtype (never an accumulation in bfloat16).
`run_dir.load_run` / `run_dir.load_params` return merged params for a LoRA run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import string
from typing import Any, Callable

from etils import epath
import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs.cli import UserError
from train import checkpoint as checkpoint_lib
from train import mesh as mesh_lib
from train import optimizer as optimizer_lib
from train import paths
from train import run_files
from train import state as state_lib

# The key of a step's `meta` that records the base of a LoRA run.
META_KEY = 'lora_base'
RANK_AXIS = 'lora_rank'
# Folded into the step's rng for the adapters' dropout masks.
_DROPOUT_SALT = 0x10A


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int
  alpha: float
  dropout: float
  targets: str

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> LoraConfig | None:
    """The config's `lora` section, or None when LoRA is off (no section, or rank 0)."""
    section = config.get('lora')
    if section is None or not int(section.rank):
      return None
    return cls(rank=int(section.rank), alpha=float(section.alpha),
               dropout=float(section.dropout), targets=str(section.targets))


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted weight: where it is and how its axes split into fan-in and fan-out."""
  path: tuple[str, ...]
  shape: tuple[int, ...]       # the weight's, stacked-layer axes included
  names: tuple[str, ...]       # its logical axis names
  num_lead: int                # leading stacked-layer axes ('layers', from nn.scan)
  num_in: int                  # fan-in axes after those

  @property
  def name(self) -> str:
    return '/'.join(self.path)

  def a_shape(self, rank: int) -> tuple[int, ...]:
    return self.shape[:self.num_lead + self.num_in] + (rank,)

  def b_shape(self, rank: int) -> tuple[int, ...]:
    lead = self.shape[:self.num_lead]
    return lead + (rank,) + self.shape[self.num_lead + self.num_in:]

  def a_names(self) -> tuple[str, ...]:
    return self.names[:self.num_lead + self.num_in] + (RANK_AXIS,)

  def b_names(self) -> tuple[str, ...]:
    return self.names[:self.num_lead] + (RANK_AXIS,) + self.names[self.num_lead + self.num_in:]

  @property
  def fan_in(self) -> int:
    return math.prod(self.shape[self.num_lead:self.num_lead + self.num_in])


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """What is adapted and how (static, hashable: it rides along traced code)."""
  targets: tuple[Target, ...]
  rank: int
  scale: float
  dropout: float


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def make_spec(lora: LoraConfig, boxed_params: Any) -> LoraSpec:
  """The targets of `lora.targets` among the model's (boxed, abstract) params.

  Raises UserError when the expression matches nothing or a parameter with
  fewer than two axes (a norm scale, a bias).
  """
  pattern = re.compile(lora.targets)
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed_params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
  targets, names = [], []
  for key_path, box in leaves:
    path = tuple(_key_name(k) for k in key_path)
    name = '/'.join(path)
    names.append(name)
    if not pattern.search(name):
      continue
    axes = tuple(box.names) if isinstance(box, nn.LogicallyPartitioned) else ()
    shape = tuple(box.value.shape if isinstance(box, nn.meta.AxisMetadata) else box.shape)
    num_lead = sum(1 for a in axes[:1] if a == 'layers')
    own = axes[num_lead:]
    if len(shape) - num_lead < 2 or len(axes) != len(shape):
      raise UserError(f'config key lora.targets={lora.targets!r} matches {name} (shape '
                      f'{shape}), which is not a matrix; LoRA adapts projections.')
    num_in = len(own) - 1 if own[-1] == 'embed' else 1
    targets.append(Target(path=path, shape=shape, names=axes, num_lead=num_lead,
                          num_in=num_in))
  if not targets:
    shown = ', '.join(names[:12]) + (' ...' if len(names) > 12 else '')
    raise UserError(f'config key lora.targets={lora.targets!r} matches no parameter; the '
                    f'parameters are: {shown}')
  return LoraSpec(targets=tuple(targets), rank=lora.rank, scale=lora.scale,
                  dropout=lora.dropout)


# ------------------------------------------------------------------- trees

def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for part in path:
    tree = tree[part]
  return tree


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def _copy_dicts(tree: Any) -> Any:
  """The nested dicts of `tree` copied (leaves shared), so leaves can be replaced."""
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def adapter_tree(spec: LoraSpec, make: Callable[[Target], tuple[Any, Any]]) -> dict:
  """{...path...: {'lora_a': A, 'lora_b': B}} with (A, B) = make(target)."""
  tree: dict = {}
  for target in spec.targets:
    a, b = make(target)
    _set(tree, target.path, {'lora_a': a, 'lora_b': b})
  return tree


def init_adapters(spec: LoraSpec, rng: jax.Array) -> dict:
  """A ~ N(0, 1/fan_in) (independent per layer), B = 0; float32."""
  def make(target):
    index = spec.targets.index(target)
    a = jax.random.normal(jax.random.fold_in(rng, index), target.a_shape(spec.rank),
                          jnp.float32) / math.sqrt(target.fan_in)
    return a, jnp.zeros(target.b_shape(spec.rank), jnp.float32)
  return adapter_tree(spec, make)


def adapter_shardings(spec: LoraSpec, mesh: jax.sharding.Mesh, rules: Any) -> dict:
  """NamedShardings of the adapters: the adapted weight's logical axes, rank replicated."""
  rules = tuple(rules) + ((RANK_AXIS, None),)
  def make(target):
    return tuple(nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec(*names), mesh, rules)
                 for names in (target.a_names(), target.b_names()))
  return adapter_tree(spec, make)


# ------------------------------------------------------- the adapted weight

def _delta(a: jax.Array, b: jax.Array, num_in: int, scale: float) -> jax.Array:
  """scale * A @ B in float32, shaped like the weight; leading stacked axes batched.

  An einsum over named letters rather than reshapes, so every axis keeps its
  sharding; HIGHEST precision so TPUs do not round the float32 product to bf16.
  """
  num_lead = a.ndim - num_in - 1
  num_out = b.ndim - num_lead - 1
  letters = iter(string.ascii_letters)
  lead = ''.join(next(letters) for _ in range(num_lead))
  fan_in = ''.join(next(letters) for _ in range(num_in))
  fan_out = ''.join(next(letters) for _ in range(num_out))
  rank = next(letters)
  product = jnp.einsum(f'{lead}{fan_in}{rank},{lead}{rank}{fan_out}->{lead}{fan_in}{fan_out}',
                       a.astype(jnp.float32), b.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)
  return product * jnp.float32(scale)


def merged_float32(w: jax.Array, a: jax.Array, b: jax.Array, num_in: int,
                   scale: float) -> jax.Array:
  """W + scale * A @ B in float32 (the one formula of training and `merge`)."""
  return w.astype(jnp.float32) + _delta(a, b, num_in, scale)


class LoraWeight(struct.PyTreeNode):
  """A targeted weight as the model reads it: `jnp.asarray(w)` gives W + scale * A @ B.

  A pytree (w, a, b, key), so `nn.scan` slices it per layer like any parameter.
  The layer's `jnp.asarray(w, dtype)` calls `__jax_array__`, which merges in
  float32 (the layer then casts to its compute dtype). `key`: raw dropout key,
  None without dropout.
  """
  w: jax.Array
  a: jax.Array
  b: jax.Array
  key: jax.Array | None
  num_in: int = struct.field(pytree_node=False)
  scale: float = struct.field(pytree_node=False)
  dropout: float = struct.field(pytree_node=False)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.w.shape

  @property
  def dtype(self) -> Any:
    return jnp.dtype(jnp.float32)

  @property
  def ndim(self) -> int:
    return self.w.ndim

  def __jax_array__(self) -> jax.Array:
    a = self.a
    if self.key is not None and self.dropout > 0:
      keep = jax.random.bernoulli(self.key, 1.0 - self.dropout, a.shape[:-1])
      a = jnp.where(keep[..., None], a / (1.0 - self.dropout), 0.0)
    return merged_float32(self.w, a, self.b, self.num_in, self.scale)


class LoraParams(struct.PyTreeNode):
  """What a stage's loss gets as `params` in a LoRA run; `objectives.forward` reads it."""
  base: Any
  adapters: Any
  keys: Any                     # raw dropout keys per target, or None
  spec: LoraSpec = struct.field(pytree_node=False)

  def model_params(self) -> Any:
    """The model's parameter tree with every target a `LoraWeight`."""
    tree = _copy_dicts(self.base)
    for target in self.spec.targets:
      adapter = _get(self.adapters, target.path)
      key = None if self.keys is None else _get(self.keys, target.path)
      _set(tree, target.path, LoraWeight(
          w=_get(self.base, target.path), a=adapter['lora_a'], b=adapter['lora_b'], key=key,
          num_in=target.num_in, scale=self.spec.scale, dropout=self.spec.dropout))
    return tree


def dropout_keys(spec: LoraSpec, rng: jax.Array) -> dict:
  """A raw key per target (per stacked layer too), drawn from a raw step key."""
  tree: dict = {}
  for index, target in enumerate(spec.targets):
    key = jax.random.fold_in(rng, index)
    lead = target.shape[:target.num_lead]
    if lead:
      key = jax.random.split(key, math.prod(lead))
      key = key.reshape(*lead, *key.shape[1:])
    _set(tree, target.path, key)
  return tree


def wrap_loss(loss_fn: Callable[..., Any], spec: LoraSpec) -> Callable[..., Any]:
  """The stage's loss over (adapters, batch, rng, frozen), the base read from frozen['base'].

  The stage's own loss gets a `LoraParams` as its `params` and the same
  `frozen` (with 'base'), so it runs unchanged; dropout only when rng is given.
  """
  def lora_loss(adapters, batch, rng, frozen):
    keys = None
    if rng is not None and spec.dropout > 0:
      keys = dropout_keys(spec, jax.random.fold_in(rng, _DROPOUT_SALT))
    params = LoraParams(base=frozen['base'], adapters=adapters, keys=keys, spec=spec)
    return loss_fn(params, batch, rng, frozen)
  return lora_loss


def merge(base: Any, adapters: Any, spec: LoraSpec) -> Any:
  """The base with the adapters folded in: float32 sum, one cast to the base dtype.

  Jitted with the base's shardings, so no device holds more than its shards.
  """
  def fold(base, adapters):
    tree = _copy_dicts(base)
    for target in spec.targets:
      w = _get(base, target.path)
      adapter = _get(adapters, target.path)
      merged = merged_float32(w, adapter['lora_a'], adapter['lora_b'], target.num_in,
                              spec.scale)
      _set(tree, target.path, merged.astype(w.dtype))
    return tree
  shardings = jax.tree.map(lambda x: getattr(x, 'sharding', None), base)
  return jax.jit(fold, out_shardings=shardings)(base, adapters)


# --------------------------------------------------------------- set-up

@dataclasses.dataclass(frozen=True)
class Setup:
  """A LoRA run's abstract state (adapters), and its base's abstract params."""
  spec: LoraSpec
  abstract_state: state_lib.TrainState
  state_shardings: state_lib.TrainState
  base_abstract: Any
  base_shardings: Any

  def init_state(self, config: ml_collections.ConfigDict, rng: jax.Array
                 ) -> state_lib.TrainState:
    """A fresh state: new adapters, a fresh optimizer, every array in its sharding."""
    tx, _ = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
    init = state_lib.state_init_fn(lambda key: init_adapters(self.spec, key), tx)
    rng = np.asarray(jax.device_get(jax.random.key_data(rng)))
    return jax.jit(init, out_shardings=self.state_shardings)(rng)


def setup(config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh,
          lora: LoraConfig) -> Setup:
  """Targets, abstract adapter state and abstract base params; allocates nothing."""
  boxed = state_lib.boxed_param_shapes(config, model)
  spec = make_spec(lora, boxed)
  rules = mesh_lib.logical_rules(config.mesh)
  base_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  base_abstract = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      nn.meta.unbox(boxed), base_shardings)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
  shapes = jax.eval_shape(state_lib.state_init_fn(lambda key: init_adapters(spec, key), tx),
                          jax.random.PRNGKey(0))
  shardings = state_lib.shardings_for(tx, shapes, adapter_shardings(spec, mesh, rules), mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return Setup(spec=spec, abstract_state=abstract, state_shardings=shardings,
               base_abstract=base_abstract, base_shardings=base_shardings)


def describe(spec: LoraSpec) -> str:
  shown = ', '.join(t.name for t in spec.targets[:8])
  more = f' and {len(spec.targets) - 8} more' if len(spec.targets) > 8 else ''
  return (f'LoRA rank {spec.rank} (scale {spec.scale:g}, dropout {spec.dropout:g}) on '
          f'{len(spec.targets)} weights: {shown}{more}')


# ----------------------------------------------------------------- the base

def _as_bits(x: jax.Array) -> jax.Array:
  """The raw bits of `x` as uint32 (8-byte types as two uint32 words)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  small = {1: jnp.uint8, 2: jnp.uint16}[size]
  return jax.lax.bitcast_convert_type(x, small).astype(jnp.uint32)


def _leaf_sums(x: jax.Array) -> jax.Array:
  bits = _as_bits(x)
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride)
    stride = (stride * bits.shape[axis]) % 2**32
  weight = index * jnp.uint32(2654435761) + jnp.uint32(1)
  # Integer sums wrap modulo 2**32: exact and the same in any order or sharding.
  return jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                    jnp.sum(bits * weight, dtype=jnp.uint32),
                    jnp.sum((bits ^ (index * jnp.uint32(40503))) * jnp.uint32(2246822519),
                            dtype=jnp.uint32)])


def fingerprint(params: Any) -> str:
  """A content hash of `params`: every array's bytes, names, shapes and dtypes."""
  sums = jax.device_get(jax.jit(lambda tree: jax.tree.map(_leaf_sums, tree))(params))
  digest = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for (key_path, leaf), (_, leaf_sums) in zip(flat,
                                              jax.tree_util.tree_flatten_with_path(sums)[0]):
    name = '/'.join(_key_name(k) for k in key_path)
    digest.update(f'{name}:{tuple(leaf.shape)}:{jnp.dtype(leaf.dtype).name}:'
                  f'{[int(v) for v in np.asarray(leaf_sums)]};'.encode())
  return digest.hexdigest()


def restore_base(source: str, step: int | None, base_abstract: Any) -> tuple[int, Any]:
  """(step, params) of run `source` at `step` (None: its newest good checkpoint)."""
  directory = os.fspath(epath.Path(source) / run_files.CHECKPOINT_DIR)
  reader = checkpoint_lib.Checkpointer(directory, read_only=True)
  try:
    return reader.restore_params(step, base_abstract)
  except checkpoint_lib.CheckpointMismatchError:
    raise
  except checkpoint_lib.CheckpointError as e:
    raise UserError(f'LoRA base {source}: {e}') from None
  finally:
    reader.close()


def load_base(source: str, setup_: Setup, recorded: dict[str, Any] | None
              ) -> tuple[Any, dict[str, Any]]:
  """(base params, their record) for a LoRA run.

  `recorded` None (a fresh run): `source`'s newest checkpoint, fingerprinted.
  Otherwise (a resume, or generate/evaluate): the recorded step of `source`
  (the recorded path when `source` is None), and its fingerprint must be the
  recorded one, else UserError.
  """
  source = paths.resolve_str(source or recorded['path'])
  step = None if recorded is None else int(recorded['step'])
  if recorded is not None:
    directory = os.fspath(epath.Path(source) / run_files.CHECKPOINT_DIR)
    if not epath.Path(directory).exists():
      raise UserError(f'The LoRA base {source} is gone (no {run_files.CHECKPOINT_DIR}); this '
                      f'run was trained on step {step} of {recorded["path"]}.')
  step, base = restore_base(source, step, setup_.base_abstract)
  record = {'path': source, 'step': int(step), 'fingerprint': fingerprint(base)}
  if recorded is not None and record['fingerprint'] != recorded['fingerprint']:
    raise UserError(
        f'The LoRA base {source} (step {step}, fingerprint {record["fingerprint"][:12]}) is '
        f'not the base this run\'s adapters were trained on ({recorded["path"]} step '
        f'{recorded["step"]}, fingerprint {recorded["fingerprint"][:12]}); use that base, or '
        'a new workdir.')
  return base, record


def recorded_base(checkpointer: checkpoint_lib.Checkpointer, step: int | None = None
                  ) -> dict[str, Any] | None:
  """The base recorded in `step`'s meta (None = the newest step), or None."""
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    return None
  return checkpointer.metadata(step).get(META_KEY)

