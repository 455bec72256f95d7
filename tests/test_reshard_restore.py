"""A checkpoint written on one mesh restores onto another and training continues identically.

Saved on 8 CPU devices as fsdp=8; restored on data=2,fsdp=2,tensor=2 and on a
single device. The next step's loss (and the updated parameters) must match
the step taken on the original mesh. Runs in a subprocess with 8 host devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small model whose every sharded dimension divides by 2 and by 8.
CONFIG = ('tiny,model.vocab_size=256,model.d_model=64,model.num_layers=2,model.num_heads=4,'
          'model.num_kv_heads=2,model.head_dim=16,model.mlp_dim=128,model.max_len=32,seq_len=32,'
          'batch_size=8,num_train_steps=10,optimizer.warmup_steps=2,'
          'optimizer.learning_rate=0.01')
MESHES = {'fsdp8': (1, 8, 1), 'data2_fsdp2_tensor2': (2, 2, 2), 'single': (1, 1, 1)}


def _worker(directory: str) -> None:
  """Runs in the subprocess (8 devices): save on fsdp=8, restore on the others."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import pretrain  # pylint: disable=g-import-not-at-top
  from model import config as model_config_lib  # pylint: disable=g-import-not-at-top
  from model import transformer  # pylint: disable=g-import-not-at-top
  from train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import state as state_lib  # pylint: disable=g-import-not-at-top
  from train import steps as steps_lib  # pylint: disable=g-import-not-at-top

  assert jax.device_count() == 8, jax.devices()

  def setup(name):
    config = pretrain.get_config(CONFIG)
    data, fsdp, tensor = MESHES[name]
    with config.unlocked():
      config.mesh.update(dict(data=data, fsdp=fsdp, tensor=tensor))
    devices = jax.devices()[:data * fsdp * tensor]
    mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
    rules = mesh_lib.logical_rules(config.mesh)
    model = transformer.Transformer(model_config_lib.ModelConfig.from_config(config.model))
    abstract, shardings = state_lib.abstract_state(config, model, mesh)
    batch_sharding = mesh_lib.batch_sharding(mesh, rules)
    step = steps_lib.make_train_step(config, model, mesh, shardings, batch_sharding)
    return config, model, mesh, abstract, shardings, batch_sharding, step

  rng = np.random.default_rng(0)

  def batch(sharding):
    tokens = rng.integers(4, 256, size=(8, 32), dtype=np.int32)
    # Two documents per row, so segment handling is part of what must match.
    segment_ids = np.where(np.arange(32) < 20, 1, 2).astype(np.int32)[None].repeat(8, 0)
    positions = np.where(np.arange(32) < 20, np.arange(32), np.arange(32) - 20)
    positions = positions.astype(np.int32)[None].repeat(8, 0)
    host = {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions}
    return host, {k: jax.device_put(v, sharding) for k, v in host.items()}

  config, model, mesh, _, shardings, batch_sharding, step = setup('fsdp8')
  state, _ = state_lib.create_sharded_state(config, model, mesh, jax.random.key(0))
  host1, b1 = batch(batch_sharding)
  host2, b2 = batch(batch_sharding)
  state, _ = step(state, b1)
  ckpt = checkpoint_lib.Checkpointer(directory, keep=1, keep_best=False)
  ckpt.save(1, state, {'position': 1}, {'train/loss': 0.0})
  ckpt.wait()
  # Per-device shard shapes of the weights, to show the layouts really differ.
  def spec_of(tree):
    return [list(leaf.sharding.shard_shape(leaf.shape)) for leaf in jax.tree.leaves(tree.params)]

  results = {'fsdp8': {'spec': spec_of(state)}}
  state, metrics = step(state, b2)
  results['fsdp8'].update(loss=float(metrics['train/loss']),
                          params=[float(np.sum(np.asarray(x, np.float64)))
                                  for x in jax.tree.leaves(state.params)])
  ckpt.close()

  for name in ('data2_fsdp2_tensor2', 'single'):
    config, model, mesh, abstract, shardings, batch_sharding, step = setup(name)
    reader = checkpoint_lib.Checkpointer(directory, keep=1, keep_best=False)
    restored, loader_state = reader.restore(1, abstract)
    reader.close()
    assert loader_state == {'position': 1}, loader_state
    # Every restored leaf sits in the layout of the new mesh.
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
      assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.sharding, sharding)
    assert int(restored.step) == 1
    spec = spec_of(restored)
    b2 = {k: jax.device_put(v, batch_sharding) for k, v in host2.items()}
    restored, metrics = step(restored, b2)
    results[name] = {'spec': spec, 'num_devices': len(mesh.devices.flat),
                     'loss': float(metrics['train/loss']),
                     'params': [float(np.sum(np.asarray(x, np.float64)))
                                for x in jax.tree.leaves(restored.params)]}
  del host1
  print('RESULT ' + json.dumps(results), flush=True)


def test_checkpoint_restores_onto_other_meshes(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  env.pop('JAX_NUM_CPU_DEVICES', None)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path / 'ckpt')],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  [line] = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  results = json.loads(line[len('RESULT '):])
  reference = results['fsdp8']
  assert results['data2_fsdp2_tensor2']['num_devices'] == 8
  assert results['single']['num_devices'] == 1
  # The layouts differ (otherwise this would not test resharding).
  assert reference['spec'] != results['data2_fsdp2_tensor2']['spec']
  assert reference['spec'] != results['single']['spec']
  for name in ('data2_fsdp2_tensor2', 'single'):
    got = results[name]
    assert abs(got['loss'] - reference['loss']) <= 1e-5 * abs(reference['loss']), (name, got['loss'],
                                                                                reference['loss'])
    for a, b in zip(got['params'], reference['params']):
      assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (name, a, b)


if __name__ == '__main__':
  _worker(sys.argv[1])
