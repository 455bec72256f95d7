"""Runs train steps of a small model on a mesh and writes losses and params.

Run by tests/test_steps.py in a subprocess with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`, so the main pytest
process keeps its single CPU device:

  python tests/sharded_step_check.py OUT.npz data=2,fsdp=2,tensor=2

The test runs the same functions in-process on one device and compares.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from configs import pretrain
from model.config import ModelConfig
from model.transformer import Transformer
from train import mesh as mesh_lib
from train import optimizer as optimizer_lib
from train import state as state_lib
from train import steps

NUM_STEPS = 2


def small_config(overrides: str = ''):
  """`tiny` (tied embeddings) as a 2-layer model whose every sharded dimension divides by 2."""
  arg = ('tiny,model.vocab_size=128,model.d_model=32,model.num_layers=2,model.num_heads=4,'
         'model.num_kv_heads=2,model.head_dim=8,model.mlp_dim=64,model.max_len=16,'
         'seq_len=16,batch_size=8,num_train_steps=10,optimizer.warmup_steps=2,'
         'optimizer.learning_rate=1e-2,loss.z_loss=1e-4,model.scan_layers=True')
  return pretrain.get_config(arg + (',' + overrides if overrides else ''))


def make_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens packed as 1-3 segments per row, with padding at the end of some rows."""
  rng = np.random.default_rng(seed)
  batch, length = config.batch_size, config.seq_len
  tokens = rng.integers(4, config.model.vocab_size, (batch, length)).astype(np.int32)
  segment_ids = np.zeros((batch, length), np.int32)
  positions = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(2, length), size=rng.integers(0, 3), replace=False))
    end = length - rng.integers(0, length // 2)  # the rest is padding
    bounds = [0] + [c for c in cuts if c < end] + [end]
    for segment, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
      segment_ids[row, start:stop] = segment
      positions[row, start:stop] = np.arange(stop - start)
    tokens[row, end:] = 0
  return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions}


def build(config):
  """(model, mesh, initial state, state shardings, train step) for `config` on its mesh."""
  model = Transformer(ModelConfig.from_config(config.model))
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.logical_rules(config.mesh)
  state, shardings = state_lib.create_sharded_state(config, model, mesh,
                                                    jax.random.PRNGKey(config.seed))
  train_step = steps.make_train_step(config, model, mesh, shardings,
                                     mesh_lib.batch_sharding(mesh, rules))
  return model, mesh, state, shardings, train_step


def flat_params(params) -> dict[str, np.ndarray]:
  return {optimizer_lib.path_name(path): np.asarray(jax.device_get(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def run(config, num_steps: int = NUM_STEPS) -> tuple[list[float], dict[str, np.ndarray]]:
  """(losses of `num_steps` steps, final params flattened by path) on config.mesh."""
  _, _, state, _, train_step = build(config)
  losses = []
  for i in range(num_steps):
    state, metrics = train_step(state, make_batch(config, seed=i))
    losses.append(float(metrics['train/loss']))
  return losses, flat_params(state.params)


def main(out_path: str, mesh_arg: str) -> None:
  mesh_overrides = ','.join(f'mesh.{item}' for item in mesh_arg.split(','))
  config = small_config(mesh_overrides)
  mesh = mesh_lib.make_mesh(config.mesh)
  assert jax.device_count() == 8, jax.devices()
  wanted = {k: int(v) for k, v in (item.split('=') for item in mesh_arg.split(','))}
  assert all(mesh.shape[k] == v for k, v in wanted.items()), (mesh.shape, wanted)
  losses, params = run(config)
  np.savez(out_path, losses=np.asarray(losses), **{'param/' + k: v for k, v in params.items()})
  print('losses', losses)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
