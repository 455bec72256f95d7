"""Mesh sizes, logical-axis rules and the batch sharding.

The 8-device mesh itself is built in tests/sharded_step_check.py (subprocess).
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from train import mesh as mesh_lib


def _cfg(**sizes) -> ml_collections.ConfigDict:
  cfg = dict(data=-1, fsdp=1, tensor=1, num_slices=1, rules_preset='fsdp_tp', rules=None)
  cfg.update(sizes)
  return ml_collections.ConfigDict(cfg)


@pytest.mark.parametrize('sizes,devices,expected', [
    (dict(data=-1), 8, (8, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (dict(data=1, fsdp=-1, tensor=1), 64, (1, 64, 1)),
    (dict(data=2, fsdp=2, tensor=2), 8, (2, 2, 2)),
])
def test_mesh_shape_fills_minus_one(sizes, devices, expected):
  assert mesh_lib.mesh_shape(_cfg(**sizes), devices) == expected


@pytest.mark.parametrize('sizes,devices,message', [
    (dict(data=2, fsdp=2, tensor=1), 8, 'there are 8 devices'),
    (dict(data=3, fsdp=-1), 8, 'cannot fill 8 devices'),
    (dict(data=-1, fsdp=-1), 8, 'at most one'),
    (dict(data=0), 8, 'positive or -1'),
])
def test_mesh_shape_errors_are_clear(sizes, devices, message):
  with pytest.raises(ValueError, match=message):
    mesh_lib.mesh_shape(_cfg(**sizes), devices)


def test_make_mesh_on_this_host():
  mesh = mesh_lib.make_mesh(_cfg(data=1, fsdp=-1, tensor=1))
  assert mesh.axis_names == ('data', 'fsdp', 'tensor')
  assert mesh.shape['fsdp'] == jax.device_count()
  with pytest.raises(ValueError, match='multiple of num_slices'):
    mesh_lib.make_mesh(_cfg(data=-1, num_slices=2))


def test_rule_presets_map_logical_names():
  fsdp_tp = mesh_lib.logical_rules(_cfg())
  assert nn.logical_to_mesh_axes(('embed', 'mlp'), fsdp_tp) == P('fsdp', 'tensor')
  assert nn.logical_to_mesh_axes(('layers', 'embed', 'heads', 'kv'), fsdp_tp) == \
      P(None, 'fsdp', 'tensor', None)
  assert nn.logical_to_mesh_axes(('vocab', 'embed'), fsdp_tp) == P('tensor', 'fsdp')
  assert nn.logical_to_mesh_axes(('norm',), fsdp_tp) == P(None)
  assert nn.logical_to_mesh_axes(
      ('activation_batch', 'activation_length', 'activation_embed'), fsdp_tp) == \
      P(('data', 'fsdp'), None, None)
  fsdp = mesh_lib.logical_rules(_cfg(rules_preset='fsdp'))
  assert nn.logical_to_mesh_axes(('embed', 'mlp'), fsdp) == P('fsdp', None)
  tp = mesh_lib.logical_rules(_cfg(rules_preset='tp'))
  assert nn.logical_to_mesh_axes(('embed', 'mlp'), tp) == P(None, 'tensor')
  with pytest.raises(KeyError, match='rules_preset'):
    mesh_lib.logical_rules(_cfg(rules_preset='zero3'))


def test_explicit_rules_override_the_preset():
  rules = mesh_lib.logical_rules(_cfg(rules=(('embed', 'tensor'), ('activation_batch', 'data'))))
  assert rules == (('embed', 'tensor'), ('activation_batch', 'data'))
  with pytest.raises(ValueError, match="'model' is not a mesh axis"):
    mesh_lib.logical_rules(_cfg(rules=(('embed', 'model'),)))


def test_batch_sharding_splits_batch_over_data_axes():
  mesh = mesh_lib.make_mesh(_cfg())
  sharding = mesh_lib.batch_sharding(mesh, mesh_lib.logical_rules(_cfg()))
  assert sharding.spec == P(('data', 'fsdp'), None)


def test_batch_fields_of_every_rank_share_the_batch_split():
  """[B] per-example values and [B, L] fields: rows live together on the same devices."""
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  from data_pipeline import loader  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config('tiny')
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.logical_rules(config.mesh)
  two = mesh_lib.batch_sharding(mesh, rules)
  local = {'tokens': np.arange(32, dtype=np.int32).reshape(4, 8),
           'reward': np.arange(4, dtype=np.float32)}
  batch = loader.global_batch(local, two, 4)
  assert batch['reward'].shape == (4,) and batch['tokens'].shape == (4, 8)
  np.testing.assert_array_equal(np.asarray(batch['reward']), local['reward'])
  assert batch['tokens'].sharding == two
  reward_spec = batch['reward'].sharding.spec
  assert reward_spec[0] == two.spec[0] and len(reward_spec) == 1
