"""Runs one command as N JAX processes on this machine, the way a TPU pod runs one per host.

    python -m launch.local --num_processes=2 --devices_per_process=4 -- \
        python -m train --config=configs/pretrain.py:tiny --workdir=runs/tiny_2proc

Each process gets CPU devices of its own and the environment variables that
`train.distributed` reads (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`), so together they form one global mesh of
`num_processes * devices_per_process` devices, talking over gloo on localhost.
Their output is streamed with a `[p0]`, `[p1]`, ... prefix. If any process
fails, the others are terminated and this exits with that process's status.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence, TextIO



def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def process_env(base: dict[str, str], *, coordinator: str, num_processes: int, process_id: int,
                devices_per_process: int) -> dict[str, str]:
  """The environment of process `process_id`: CPU devices plus the coordinator."""
  env = dict(base)
  env.update({
      'JAX_COORDINATOR_ADDRESS': coordinator,
      'JAX_NUM_PROCESSES': str(num_processes),
      'JAX_PROCESS_ID': str(process_id),
      'JAX_PLATFORMS': 'cpu',
      # Takes precedence over --xla_force_host_platform_device_count in XLA_FLAGS.
      'JAX_NUM_CPU_DEVICES': str(devices_per_process),
      'JAX_CPU_COLLECTIVES_IMPLEMENTATION': 'gloo',
      'PYTHONUNBUFFERED': '1',
  })
  return env


def _pump(stream: TextIO, prefix: str, out: TextIO, lock: threading.Lock) -> None:
  for line in iter(stream.readline, ''):
    with lock:
      out.write(prefix + line if line.endswith('\n') else prefix + line + '\n')
      out.flush()
  stream.close()


def _terminate(procs: Sequence[subprocess.Popen], grace_seconds: float) -> None:
  for proc in procs:
    if proc.poll() is None:
      proc.terminate()
  deadline = time.monotonic() + grace_seconds
  for proc in procs:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def launch(command: Sequence[str], *, num_processes: int, devices_per_process: int,
           port: int = 0, grace_seconds: float = 5.0, out: TextIO | None = None) -> int:
  """Starts the processes, streams their output and returns the exit status.

  0 when all succeed; otherwise the status of the first process that failed
  (the others are terminated).
  """
  if not command:
    raise ValueError('No command given: put it after `--`.')
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError('num_processes and devices_per_process must be >= 1.')
  out = sys.stdout if out is None else out
  coordinator = f'127.0.0.1:{port or free_port()}'
  lock = threading.Lock()
  procs, pumps = [], []
  for process_id in range(num_processes):
    env = process_env(dict(os.environ), coordinator=coordinator, num_processes=num_processes,
                      process_id=process_id, devices_per_process=devices_per_process)
    proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    procs.append(proc)
    pump = threading.Thread(target=_pump, args=(proc.stdout, f'[p{process_id}] ', out, lock),
                            daemon=True)
    pump.start()
    pumps.append(pump)

  status = 0
  try:
    running = set(range(num_processes))
    while running:
      for process_id in sorted(running):
        code = procs[process_id].poll()
        if code is None:
          continue
        running.discard(process_id)
        if code != 0:
          with lock:
            out.write(f'[launch.local] process {process_id} exited with status {code}; '
                      f'stopping the others.\n')
            out.flush()
          status = code
          _terminate(procs, grace_seconds)
          running.clear()
          break
      time.sleep(0.05)
  except KeyboardInterrupt:
    _terminate(procs, grace_seconds)
    status = 128 + signal.SIGINT
  for pump in pumps:
    pump.join(timeout=5)
  # A negative status means killed by a signal; report it the way a shell does.
  return 128 - status if status < 0 else status


def parser() -> argparse.ArgumentParser:
  # argparse, not absl flags: the launched command (e.g. `python -m train`) has
  # absl flags of the same names (--num_processes), and tests import both.
  p = argparse.ArgumentParser(prog='python -m launch.local', description=__doc__.split('\n')[0])
  p.add_argument('--num_processes', type=int, default=2, help='How many processes to start.')
  p.add_argument('--devices_per_process', type=int, default=4,
                 help='CPU devices each process gets (jax_num_cpu_devices).')
  p.add_argument('--port', type=int, default=0,
                 help='Coordinator port on 127.0.0.1; 0 picks a free one.')
  p.add_argument('--grace_seconds', type=float, default=5.0,
                 help='After one process fails, how long the others get to exit on SIGTERM '
                 'before they are killed.')
  p.add_argument('command', nargs=argparse.REMAINDER,
                 help='After --: the command every process runs.')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser().error('give the command after `--`, e.g. '
                   '`python -m launch.local --num_processes=2 -- python -m train ...`.')
  return launch(command, num_processes=args.num_processes,
                devices_per_process=args.devices_per_process, port=args.port,
                grace_seconds=args.grace_seconds)


if __name__ == '__main__':
  sys.exit(main())
