"""Starts JAX's multi-controller runtime: one process per host, one global mesh.

On a Cloud TPU pod slice every host runs the same command; `initialize()`
with no arguments asks the TPU metadata server who the coordinator is and how
many hosts there are. Anywhere else (several processes on one machine via
`python -m launch.local`, GPU clusters) the coordinator address, the number of
processes and this process's id come from flags or from the environment
variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.

This must run before anything that touches a JAX backend (`jax.devices()`,
`jax.numpy` arrays, `jax.jit` calls): the runtime can only join processes
whose backends have not started yet. Importing jax is fine.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
import sys
from typing import Mapping

from absl import flags
import jax

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'

_MODE = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'auto: join a multi-process run when a coordinator is given (flags or '
    'JAX_* environment variables) or when running on a Cloud TPU VM; '
    'on: always call jax.distributed.initialize(); off: single process.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    f'host:port of process 0 (default: ${ENV_COORDINATOR}).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, f'Number of processes (default: ${ENV_NUM_PROCESSES}).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, f'This process, 0..num_processes-1 (default: ${ENV_PROCESS_ID}).')


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `maybe_initialize` decided to do, and with which arguments."""
  mode: str  # 'single' | 'explicit' | 'detect' (the TPU runtime / cluster finds its peers)
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM: libtpu is installed and TPU chips are attached."""
  if importlib.util.find_spec('libtpu') is None:
    return False
  # TPU chips show up as /dev/accel* (v2-v4) or as VFIO groups (v5e and later).
  return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def _int_or_none(value: str | None, name: str) -> int | None:
  if value is None or value == '':
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name} must be an integer, got {value!r}.') from None


def plan(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, *, mode: str = 'auto',
         environ: Mapping[str, str] | None = None, tpu_vm: bool | None = None) -> Plan:
  """Decides how to start: arguments win over environment variables."""
  environ = os.environ if environ is None else environ
  coordinator_address = coordinator_address or environ.get(ENV_COORDINATOR) or None
  if num_processes is None:
    num_processes = _int_or_none(environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _int_or_none(environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
  if mode == 'off':
    return Plan('single')
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if all(given):
    if not 0 <= process_id < num_processes:
      raise ValueError(f'process_id={process_id} is not in [0, num_processes={num_processes}).')
    if ':' not in coordinator_address:
      raise ValueError(f'coordinator_address {coordinator_address!r} must be host:port.')
    if num_processes == 1 and mode == 'auto':
      return Plan('single')
    return Plan('explicit', coordinator_address, num_processes, process_id)
  if any(given):
    names = [n for n, g in zip(('coordinator_address', 'num_processes', 'process_id'), given)
             if not g]
    raise ValueError(f'Multi-process run is missing {", ".join(names)} (flags --{names[0]} or '
                     f'environment {ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID}).')
  if tpu_vm is None:
    tpu_vm = on_cloud_tpu_vm()
  if tpu_vm or mode == 'on':
    # The TPU runtime finds the coordinator and the host count itself.
    return Plan('detect')
  return Plan('single')


def maybe_initialize(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, *, mode: str = 'auto') -> Plan:
  """Calls `jax.distributed.initialize` if this is a multi-process run.

  Safe to call more than once. Returns the plan it carried out.
  """
  the_plan = plan(coordinator_address, num_processes, process_id, mode=mode)
  if jax.distributed.is_initialized() or the_plan.mode == 'single':
    return the_plan
  if the_plan.mode == 'detect':
    jax.distributed.initialize()
  else:
    # CPU processes exchange data through gloo over TCP (the default in jax
    # 0.10; explicit so a changed default cannot silently break multi-process
    # CPU runs). GPU and TPU backends bring their own collectives.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=the_plan.coordinator_address,
                               num_processes=the_plan.num_processes,
                               process_id=the_plan.process_id)
  _fail_fast_on_uncaught_exception()
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return the_plan


def _fail_fast_on_uncaught_exception() -> None:
  """Makes a crashing process exit at once instead of waiting for its peers.

  At exit, jax.distributed waits for every process to reach shutdown, and the
  healthy ones are blocked in a collective waiting for the crashed one: each
  waits on the other until a timeout minutes later. Exiting without the
  shutdown handshake lets the launcher (or the TPU runtime's heartbeat) see the
  failure and stop the rest.
  """
  previous = sys.excepthook

  def hook(exc_type, exc, tb):
    previous(exc_type, exc, tb)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)

  sys.excepthook = hook


def initialize_from_flags() -> Plan:
  """`maybe_initialize` with this module's absl flags; call first in `main`."""
  return maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                          mode=_MODE.value)
