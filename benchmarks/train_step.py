"""Train-step throughput and MFU of a pretrain preset, on random tokens.

  python -m benchmarks.train_step --config=configs/pretrain.py:tiny
  python -m benchmarks.train_step --config=configs/pretrain.py:bench_cpu --steps=20

Prints one JSON object: step time (median of --steps timed steps after
compilation and --warmup steps), tokens/s, model FLOPs per token
(`model.config.flops_per_token`: 6N + attention), achieved model FLOP/s, and
MFU against the peak (`train.mfu`: the vendor table on TPU/GPU, a measured
float32 matmul on CPU). No dataset is needed.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from configs import cli
from model.config import ModelConfig, flops_per_token, num_params
from model.transformer import Transformer
from train import console
from train import mesh as mesh_lib
from train import mfu as mfu_lib
from train import state as state_lib
from train import steps as steps_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Pretrain config file and preset.',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')


def random_batch(config, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens, one document per row (the packed layout the loader gives)."""
  rng = np.random.default_rng(seed)
  shape = (config.batch_size, config.seq_len)
  return {
      'tokens': rng.integers(4, config.model.vocab_size, shape, dtype=np.int32),
      'segment_ids': np.ones(shape, np.int32),
      'positions': np.broadcast_to(np.arange(config.seq_len, dtype=np.int32), shape).copy(),
  }


def benchmark(config, num_steps: int, warmup: int) -> dict:
  model_cfg = ModelConfig.from_config(config.model)
  model = Transformer(model_cfg)
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.logical_rules(config.mesh)
  state, shardings = state_lib.create_sharded_state(config, model, mesh,
                                                    jax.random.PRNGKey(config.seed))
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  train_step = steps_lib.make_train_step(config, model, mesh, shardings, batch_sharding)
  batch = jax.device_put(random_batch(config), batch_sharding)

  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start

  # The compiled executable takes the step's bound trailing arguments (the
  # frozen trees, None here) explicitly.
  bound = train_step.bound
  for _ in range(warmup):
    state, metrics = compiled(state, batch, *bound)
  jax.block_until_ready(metrics)
  times = []
  cpu_start = time.process_time()
  for _ in range(num_steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, *bound)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)

  # Host CPU seconds per step (all threads): on a shared CPU this is steadier
  # than wall time, which grows with whatever else runs.
  cpu_s = (time.process_time() - cpu_start) / num_steps
  step_s = statistics.median(times)
  tokens_per_step = config.batch_size * config.seq_len
  tokens_per_sec = tokens_per_step / step_s
  model_flops = flops_per_token(model_cfg, config.seq_len)
  achieved = model_flops * tokens_per_sec
  peak, peak_source = mfu_lib.peak_flops(mesh.devices.flat)
  return {
      'preset': config.get('preset', None),
      'params': num_params(model_cfg),
      'batch_size': config.batch_size,
      'seq_len': config.seq_len,
      'grad_accum_steps': config.optimizer.grad_accum_steps,
      'dtype': model_cfg.dtype,
      'scan_layers': model_cfg.scan_layers,
      'remat_policy': model_cfg.remat_policy,
      'step_time_s': step_s,
      'step_time_min_s': min(times),
      'steps_timed': num_steps,
      'cpu_seconds_per_step': cpu_s,
      'tokens_per_sec': tokens_per_sec,
      'model_flops_per_token': model_flops,
      'achieved_flops_per_sec': achieved,
      'peak_flops_per_sec': peak,
      'peak_source': peak_source,
      'mfu': mfu_lib.mfu(model_flops, tokens_per_sec, peak),
      'compile_time_s': compile_s,
      'final_loss': float(metrics['train/loss']),
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'mesh': dict(mesh.shape),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }


def main(argv):
  del argv
  console.quiet_libraries()  # library INFO logs would bury the report
  print(json.dumps(benchmark(_CONFIG.value, _STEPS.value, _WARMUP.value)))


if __name__ == '__main__':
  cli.run(main)
