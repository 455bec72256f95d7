"""The device mesh and the logical-axis rules that map model names onto it.

The mesh always has the three axes ('data', 'fsdp', 'tensor'):
  - data:   pure data parallelism (replicated parameters); across slices on
            multi-slice TPU, where only the gradient all-reduce crosses DCN.
  - fsdp:   data parallelism with parameters and optimizer state sharded
            (ZeRO-3 style); gathered per layer inside a slice.
  - tensor: Megatron-style tensor parallelism over heads and the MLP width.
The batch is split over ('data', 'fsdp'). Layers never name mesh axes: they
name logical axes ('embed', 'mlp', 'activation_batch', ...) and the rules here
(chosen in the config) say which mesh axis each one lives on.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
import numpy as np

AXES = ('data', 'fsdp', 'tensor')

Rules = tuple[tuple[str, Any], ...]

# Activation rules are shared: the batch is split over every data-like axis and
# the tensor-parallel dimensions follow the parameters they come from.
_ACTIVATIONS: Rules = (
    ('activation_batch', ('data', 'fsdp')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv_heads', 'tensor'),
    ('activation_kv', None),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
)

RULE_PRESETS: dict[str, Rules] = {
    # FSDP over 'embed' plus tensor parallelism over heads / MLP / vocab. With
    # fsdp=1 or tensor=1 the corresponding part is a no-op, so this one preset
    # also covers plain data parallelism.
    'fsdp_tp': (
        ('embed', 'fsdp'),
        ('mlp', 'tensor'),
        ('heads', 'tensor'),
        ('kv_heads', 'tensor'),
        ('vocab', 'tensor'),
        ('layers', None),
        ('kv', None),
        ('norm', None),
    ) + _ACTIVATIONS,
    # Parameters sharded over 'fsdp' only; a 'tensor' axis of size > 1 would
    # just replicate the work, so meshes for this preset keep tensor=1.
    'fsdp': (
        ('embed', 'fsdp'),
        ('mlp', None),
        ('heads', None),
        ('kv_heads', None),
        ('vocab', None),
        ('layers', None),
        ('kv', None),
        ('norm', None),
    ) + tuple(  # the shared activation rules, with nothing on 'tensor'
        (name, None if axis == 'tensor' else axis) for name, axis in _ACTIVATIONS),
    # Tensor parallelism only; parameters are replicated over data and fsdp.
    'tp': (
        ('embed', None),
        ('mlp', 'tensor'),
        ('heads', 'tensor'),
        ('kv_heads', 'tensor'),
        ('vocab', 'tensor'),
        ('layers', None),
        ('kv', None),
        ('norm', None),
    ) + _ACTIVATIONS,
}


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves the ('data', 'fsdp', 'tensor') sizes; one of them may be -1."""
  sizes = [int(mesh_cfg[axis]) for axis in AXES]
  unknown = [axis for axis, size in zip(AXES, sizes) if size == -1]
  if len(unknown) > 1:
    raise ValueError(f'mesh: at most one of {AXES} may be -1, got {dict(zip(AXES, sizes))}.')
  if any(size == 0 or size < -1 for size in sizes):
    raise ValueError(f'mesh: sizes must be positive or -1, got {dict(zip(AXES, sizes))}.')
  known = math.prod(size for size in sizes if size != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(
          f'mesh: {dict(zip(AXES, sizes))} cannot fill {num_devices} devices '
          f'({num_devices} is not a multiple of {known}).')
    sizes[AXES.index(unknown[0])] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f'mesh: data*fsdp*tensor = {math.prod(sizes)} ({dict(zip(AXES, sizes))}) '
        f'but there are {num_devices} devices.')
  return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  num_slices = int(mesh_cfg.get('num_slices', 1) or 1)
  if num_slices > 1:
    data = shape[0]
    if data % num_slices:
      raise ValueError(
          f'mesh: data={data} must be a multiple of num_slices={num_slices} '
          '(the data axis is the one that spans slices).')
    # Only 'data' crosses the slow DCN links; fsdp and tensor stay in a slice.
    ici_shape = (data // num_slices, shape[1], shape[2])
    dcn_shape = (num_slices, 1, 1)
    device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  else:
    # create_device_mesh orders TPU devices by their physical torus position;
    # on CPU / single GPU host it is a plain reshape.
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(np.asarray(device_array), AXES)


def logical_rules(mesh_cfg: Any) -> Rules:
  """The logical-axis rules: `mesh.rules` if set, else `RULE_PRESETS[mesh.rules_preset]`."""
  rules = mesh_cfg.get('rules', None)
  if rules:
    return tuple((str(name), _as_axes(axes)) for name, axes in rules)
  preset = mesh_cfg.get('rules_preset', 'fsdp_tp')
  if preset not in RULE_PRESETS:
    raise KeyError(f'mesh.rules_preset={preset!r} is unknown; valid: {sorted(RULE_PRESETS)}')
  return RULE_PRESETS[preset]


def _as_axes(axes: Any) -> Any:
  """Normalises a rule's target: None, a mesh axis name, or a tuple of them."""
  if axes is None or isinstance(axes, str):
    if axes is not None and axes not in AXES:
      raise ValueError(f'mesh.rules: {axes!r} is not a mesh axis {AXES}.')
    return axes
  axes = tuple(axes)
  for axis in axes:
    if axis not in AXES:
      raise ValueError(f'mesh.rules: {axis!r} is not a mesh axis {AXES}.')
  return axes


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> jax.sharding.NamedSharding:
  """Sharding of a [batch, length] input array: batch over the data-like axes.

  Fields of another rank ([B] per-example values) split their batch axis the
  same way (`data_pipeline.loader.global_batch` derives their sharding).
  """
  spec = nn.logical_to_mesh_axes(('activation_batch', 'activation_length'), rules)
  return jax.sharding.NamedSharding(mesh, spec)


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """A sharding that puts a full copy on every device (scalars, metrics)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
