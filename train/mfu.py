"""Peak FLOP/s of the devices in use, and model FLOPs utilisation.

MFU = model FLOPs per token (6N + attention, `model.config.flops_per_token`)
x tokens per second / peak FLOP/s of all devices in use. Accelerator peaks
are the vendors' dense bf16 figures per JAX device; a CPU has no such figure,
so its "peak" is what a large float32 matmul achieves on all its cores,
measured once per process.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per JAX device, matched against `device.device_kind`
# (lower-cased) in this order, so more specific names come first. TPU v2 and
# v3 expose each TensorCore as a device (two per chip): half the chip's figure.
PEAK_FLOPS_PER_DEVICE: tuple[tuple[str, float], ...] = (
    ('tpu v2', 22.5e12),
    ('tpu v3', 61.5e12),
    ('tpu v4', 275e12),
    ('tpu v5 lite', 197e12),   # v5e
    ('tpu v5e', 197e12),
    ('tpu v5p', 459e12),
    ('tpu v5', 459e12),        # v5p reports 'TPU v5'
    ('tpu v6 lite', 918e12),   # v6e (Trillium)
    ('tpu v6e', 918e12),
    ('tpu7x', 2307e12),
    ('a100', 312e12),
    ('h100 pcie', 756e12),
    ('h100', 989e12),          # SXM
    ('h200', 989e12),
    ('b200', 2250e12),
)


def table_peak(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device of this kind, or None if unknown."""
  kind = device_kind.lower()
  for name, peak in PEAK_FLOPS_PER_DEVICE:
    if name in kind:
      return peak
  return None


@functools.cache
def measure_cpu_matmul_flops(size: int = 1024, repeats: int = 4, trials: int = 3) -> float:
  """Float32 FLOP/s of a jitted `size`^3 matmul chain on all the host's cores.

  It runs at every start on CPU, so it is kept short: 0.6 s on two cores, where
  2048 took 4.8 s for the same figure (63-65 GFLOP/s against 62-66, three
  runs each).

  The chain of `repeats` dependent matmuls runs inside one executable so that
  dispatch is negligible. Each trial is timed by the wall clock and by the
  process's CPU time; FLOPs per CPU-second times the number of usable cores is
  what the cores give when nothing else runs, so a machine shared with other
  jobs does not report a deflated peak (and an MFU above 1 later). The result
  is the best of both over `trials`.
  """
  cpu = jax.devices('cpu')[0]
  a = jax.device_put(jnp.full((size, size), 1.0 / size, jnp.float32), cpu)
  b = jax.device_put(jnp.eye(size, dtype=jnp.float32), cpu)

  @jax.jit
  def chain(a, b):
    for _ in range(repeats):
      a = a @ b
    return a

  chain(a, b).block_until_ready()  # compile
  flops = 2.0 * size ** 3 * repeats
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  best = 0.0
  for _ in range(trials):
    wall, cpu_time = time.perf_counter(), time.process_time()
    chain(a, b).block_until_ready()
    wall, cpu_time = time.perf_counter() - wall, time.process_time() - cpu_time
    best = max(best, flops / wall, flops / max(cpu_time, 1e-9) * cores)
  return best


def peak_flops(devices: Sequence[jax.Device] | None = None) -> tuple[float, str]:
  """(total peak FLOP/s of `devices`, where the figure comes from).

  CPU devices share the host's cores (also with
  --xla_force_host_platform_device_count), so the host's measured matmul
  rate is the peak of all of them together.
  """
  devices = list(jax.devices() if devices is None else devices)
  kind = devices[0].device_kind
  if devices[0].platform == 'cpu':
    return measure_cpu_matmul_flops(), 'measured float32 matmul (all CPU cores)'
  per_device = table_peak(kind)
  if per_device is None:
    raise KeyError(f'No peak FLOP/s known for device kind {kind!r}; add it to '
                   'train/mfu.py PEAK_FLOPS_PER_DEVICE.')
  return per_device * len(devices), f'table: {kind} dense bf16 x {len(devices)}'


def mfu(flops_per_token: float, tokens_per_sec: float, peak: float) -> float:
  """Model FLOPs utilisation in [0, 1]."""
  return flops_per_token * tokens_per_sec / peak
