"""Train-step throughput and MFU of a pretrain preset, on random tokens.

  python -m benchmarks.train_step --config=configs/pretrain.py:tiny
  python -m benchmarks.train_step --config=configs/pretrain.py:bench_cpu --steps=20
  python -m benchmarks.train_step --config=configs/pretrain.py:bench_cpu --peer
  python -m benchmarks.train_step --config=configs/pretrain.py:bench_cpu --profile_steps=2

Prints one JSON object: step time (median of --steps timed steps after
compilation and --warmup steps), tokens/s, model FLOPs per token
(`model.config.flops_per_token`: 6N + attention), achieved model FLOP/s, and
MFU against the peak (`train.mfu`: the vendor table on TPU/GPU, a measured
float32 matmul on CPU), with the XLA flags and the step's own compiler
options (`train/steps.py`; on CPU: no YNNPACK library fusions). No
dataset is needed.

`--documents_per_row=K` packs K equal documents in each row (segment ids and
positions as the loader gives them), which is what the attention cores'
packing masks see; the default is one.

`--profile_steps=N` also traces N steps with `jax.profiler` and adds where
their time went, per category of XLA op and the top ops (benchmarks/profile.py);
`--profile_dir` keeps the trace for TensorBoard / Perfetto.

`--peer` (CPU, needs torch importable) also runs the nanoGPT-style PyTorch
peer (`--peer_script`, default ../shared/peers/nanogpt_cpu.py next to the
repository, with `--compile`) at the same shape, alternating with this step
for `--peer_rounds` rounds, and reports the median over rounds of
ours / peer model FLOP/s, both counted the peer's way: 6N (N without the
embedding lookup, the readout counted once) + 6 L T d for causal attention,
half of the attention term of `flops_per_token`. On a shared machine only
this alternating ratio means much.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from benchmarks import profile as profile_lib
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
_PEER = flags.DEFINE_bool('peer', False, 'Alternate with the PyTorch nanoGPT peer and report '
                          'the median FLOP/s ratio (needs torch).')
_PEER_ROUNDS = flags.DEFINE_integer('peer_rounds', 3, 'Alternating rounds with --peer.')
_PROFILE_STEPS = flags.DEFINE_integer('profile_steps', 0, 'Steps to trace with jax.profiler '
                                      'after the timed ones (0: none).')
_PROFILE_DIR = flags.DEFINE_string('profile_dir', None, 'Where to keep the trace (default: a '
                                   'temporary folder, removed).')
_DOCUMENTS = flags.DEFINE_integer('documents_per_row', 1, 'Documents packed in each row of '
                                  'the random batch (equal lengths).')
_PEER_SCRIPT = flags.DEFINE_string(
    'peer_script', os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                '..', 'shared', 'peers', 'nanogpt_cpu.py'),
    'The peer script (prints model_gflops_per_s=...).')


def random_batch(config, seed: int = 0, documents: int = 1) -> dict[str, np.ndarray]:
  """Random tokens, `documents` equal documents packed per row (the loader packs them)."""
  rng = np.random.default_rng(seed)
  shape = (config.batch_size, config.seq_len)
  document_T = np.arange(config.seq_len) * documents // config.seq_len
  starts_T = np.searchsorted(document_T, document_T)   # each token's document start
  return {
      'tokens': rng.integers(4, config.model.vocab_size, shape, dtype=np.int32),
      'segment_ids': np.broadcast_to(1 + document_T, shape).astype(np.int32),
      'positions': np.broadcast_to(np.arange(config.seq_len) - starts_T, shape).astype(np.int32),
  }


def peer_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token as the nanoGPT peer counts them: 6N + 6 L T d."""
  n = num_params(cfg) - cfg.vocab_size * cfg.d_model  # no embedding lookup
  if cfg.tie_embeddings:
    n += cfg.vocab_size * cfg.d_model  # the readout, counted once
  return float(6 * n + 6 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim)


def compiled_step(config, documents: int = 1):
  """(run(num_steps) -> list of step seconds, info): the compiled train step on random tokens."""
  model_cfg = ModelConfig.from_config(config.model)
  model = Transformer(model_cfg)
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.logical_rules(config.mesh)
  state, shardings = state_lib.create_sharded_state(config, model, mesh,
                                                    jax.random.PRNGKey(config.seed))
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  train_step = steps_lib.make_train_step(config, model, mesh, shardings, batch_sharding)
  batch = jax.device_put(random_batch(config, documents=documents), batch_sharding)

  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  # The compiled executable takes the step's bound trailing arguments (the
  # frozen trees, None here) explicitly.
  bound = train_step.bound
  holder = {'state': state, 'metrics': None}

  def run(num_steps: int) -> list[float]:
    times = []
    for _ in range(num_steps):
      start = time.perf_counter()
      holder['state'], holder['metrics'] = compiled(holder['state'], batch, *bound)
      jax.block_until_ready(holder['metrics'])
      times.append(time.perf_counter() - start)
    return times

  return run, {'model_cfg': model_cfg, 'mesh': mesh, 'compile_s': compile_s, 'holder': holder,
               'hlo': compiled.as_text, 'compiler_options': train_step.compiler_options}


def profile(run, info, num_steps: int, trace_dir: str | None = None) -> dict:
  """Traces `num_steps` steps; their op time by category and the top ops (benchmarks/profile.py)."""
  with tempfile.TemporaryDirectory() as scratch:
    trace_dir = trace_dir or scratch
    with jax.profiler.trace(trace_dir):
      run(num_steps)
    events = list(profile_lib.trace_events(trace_dir, 'jit_train_step'))
  return profile_lib.summarize(events, profile_lib.hlo_ops(info['hlo']()), num_steps)


def benchmark(config, num_steps: int, warmup: int, run=None, info=None,
              profile_steps: int = 0, profile_dir: str | None = None,
              documents: int = 1) -> dict:
  if run is None:
    run, info = compiled_step(config, documents)
  model_cfg, mesh = info['model_cfg'], info['mesh']
  run(warmup)
  cpu_start = time.process_time()
  times = run(num_steps)
  # Host CPU seconds per step (all threads): on a shared CPU this is steadier
  # than wall time, which grows with whatever else runs.
  cpu_s = (time.process_time() - cpu_start) / num_steps
  step_s = statistics.median(times)
  tokens_per_step = config.batch_size * config.seq_len
  tokens_per_sec = tokens_per_step / step_s
  model_flops = flops_per_token(model_cfg, config.seq_len)
  achieved = model_flops * tokens_per_sec
  peak, peak_source = mfu_lib.peak_flops(mesh.devices.flat)
  report = {
      'preset': config.get('preset', None),
      'params': num_params(model_cfg),
      'batch_size': config.batch_size,
      'seq_len': config.seq_len,
      'grad_accum_steps': config.optimizer.grad_accum_steps,
      'dtype': model_cfg.dtype,
      'scan_layers': model_cfg.scan_layers,
      'remat_policy': model_cfg.remat_policy,
      'attention_impl': model_cfg.attention_impl,
      'documents_per_row': documents,
      'loss_chunk_size': model_cfg.loss_chunk_size,
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
      'compile_time_s': info['compile_s'],
      'final_loss': float(info['holder']['metrics']['train/loss']),
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'mesh': dict(mesh.shape),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'compiler_options': info['compiler_options'] or {},  # train/steps.py, per platform
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),  # train/host_memory.py
  }
  if profile_steps:
    report['profile'] = profile(run, info, profile_steps, profile_dir)
  return report


def peer_command(config, script: str, num_steps: int) -> list[str]:
  """The peer at this config's shape (it has d_model / num_heads heads of that width)."""
  m = config.model
  return [sys.executable, script, '--layers', str(m.num_layers), '--d', str(m.d_model),
          '--heads', str(m.num_heads), '--seq', str(config.seq_len),
          '--batch', str(config.batch_size), '--vocab', str(m.vocab_size),
          '--steps', str(num_steps), '--compile']


def run_peer(command: list[str]) -> float:
  """The peer's model GFLOP/s (it prints model_gflops_per_s=...)."""
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  found = re.search(r'model_gflops_per_s=([0-9.]+)', result.stdout)
  if result.returncode or not found:
    raise RuntimeError(f'peer {" ".join(command)} failed (exit {result.returncode}): '
                       f'{(result.stderr or result.stdout)[-2000:]}')
  return float(found.group(1))


def benchmark_with_peer(config, num_steps: int, warmup: int, rounds: int, script: str) -> dict:
  """`benchmark`, alternated with the PyTorch peer `rounds` times; the median ratio."""
  if importlib.util.find_spec('torch') is None:
    report = benchmark(config, num_steps, warmup)
    report['peer'] = {'skipped': 'torch is not importable'}
    return report
  if not os.path.exists(script):
    raise FileNotFoundError(f'--peer_script {script} does not exist.')
  run, info = compiled_step(config)
  per_token = peer_flops_per_token(info['model_cfg'], config.seq_len)
  command = peer_command(config, script, num_steps)
  report, per_round = None, []
  for _ in range(rounds):
    report = benchmark(config, num_steps, warmup, run, info)
    ours = report['tokens_per_sec'] * per_token / 1e9
    theirs = run_peer(command)
    per_round.append({'ours_gflops_per_s': round(ours, 2), 'peer_gflops_per_s': theirs,
                      'ratio': round(ours / theirs, 4)})
  report['peer'] = {
      'command': ' '.join(command),
      'flops_per_token_peer_count': per_token,
      'rounds': per_round,
      'median_ratio': statistics.median(r['ratio'] for r in per_round),
  }
  return report


def main(argv):
  del argv
  console.quiet_libraries()  # library INFO logs would bury the report
  if _PEER.value:
    report = benchmark_with_peer(_CONFIG.value, _STEPS.value, _WARMUP.value, _PEER_ROUNDS.value,
                                 _PEER_SCRIPT.value)
  else:
    report = benchmark(_CONFIG.value, _STEPS.value, _WARMUP.value,
                       profile_steps=_PROFILE_STEPS.value, profile_dir=_PROFILE_DIR.value,
                       documents=_DOCUMENTS.value)
  print(json.dumps(report))


if __name__ == '__main__':
  cli.run(main)
