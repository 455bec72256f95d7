"""Runs one command as N JAX processes on this machine, the way a TPU pod runs one per host.

    python -m launch.local --num_processes=2 --devices_per_process=4 -- \
        python -m train --config=configs/pretrain.py:tiny --workdir=runs/tiny_2proc

Each process gets CPU devices of its own and the environment variables that
`train.distributed` reads (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`), so together they form one global mesh of
`num_processes * devices_per_process` devices, talking over gloo on localhost.
Their output is streamed with a `[p0]`, `[p1]`, ... prefix. If any process
fails, the others are terminated and this exits with that process's status.
SIGTERM or SIGINT (Ctrl-C) to the launcher is passed on to every process and
the launcher waits for them, so a preemption reaches the training processes
(which checkpoint and exit) instead of leaving them orphaned; a second signal
kills them.
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

from configs import cli


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


def _send(procs: Sequence[subprocess.Popen], signum: int) -> None:
  """Sends `signum` to each running process's group (its own children included)."""
  for proc in procs:
    if proc.poll() is None:
      try:
        os.killpg(proc.pid, signum)
      except ProcessLookupError:  # exited since poll()
        pass


def _terminate(procs: Sequence[subprocess.Popen], grace_seconds: float) -> None:
  _send(procs, signal.SIGTERM)
  deadline = time.monotonic() + grace_seconds
  for proc in procs:
    try:
      proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      _send([proc], signal.SIGKILL)
      proc.wait()


class _SignalsToForward:
  """Records SIGTERM/SIGINT to the launcher while `launch` runs; the loop forwards them.

  The handler only appends: forwarding and printing happen in the loop, so a
  signal arriving while the loop holds the output lock cannot deadlock.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: list[int] = []
    self.forwarded = 0
    self._previous = {}

  def __enter__(self) -> '_SignalsToForward':
    # Handlers can only be installed from the main thread; elsewhere (a library
    # caller's worker thread) the caller owns signal handling.
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum: int, frame) -> None:
    del frame
    self.received.append(signum)


def launch(command: Sequence[str], *, num_processes: int, devices_per_process: int,
           port: int = 0, grace_seconds: float = 5.0, out: TextIO | None = None) -> int:
  """Starts the processes, streams their output and returns the exit status.

  0 when all succeed; otherwise the status of the first process that failed
  (the others are terminated), or 128 + the signal number after SIGTERM/SIGINT.
  """
  if not command:
    raise cli.UserError('No command given: put it after `--`.')
  if num_processes < 1 or devices_per_process < 1:
    raise cli.UserError(f'--num_processes ({num_processes}) and --devices_per_process '
                        f'({devices_per_process}) must be >= 1.')
  out = sys.stdout if out is None else out
  coordinator = f'127.0.0.1:{port or free_port()}'
  lock = threading.Lock()
  procs, pumps = [], []
  status = 0
  # Installed before the first process starts, so no signal can orphan one.
  with _SignalsToForward() as signals:
    for process_id in range(num_processes):
      env = process_env(dict(os.environ), coordinator=coordinator, num_processes=num_processes,
                        process_id=process_id, devices_per_process=devices_per_process)
      try:
        # Each process leads a process group of its own: a Ctrl-C in the terminal
        # reaches only the launcher, which passes it on exactly once (to the
        # group, so a wrapper script's children get it too). Reading stdin from a
        # background group would stop the process silently, so stdin is empty.
        proc = subprocess.Popen(list(command), env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, process_group=0)
      except OSError as e:
        _terminate(procs, grace_seconds)
        raise cli.UserError(f'cannot start {command[0]!r}: {e.strerror}') from e
      procs.append(proc)
      pump = threading.Thread(target=_pump, args=(proc.stdout, f'[p{process_id}] ', out, lock),
                              daemon=True)
      pump.start()
      pumps.append(pump)

    running = set(range(num_processes))
    while running:
      if len(signals.received) > signals.forwarded:
        # The first signal asks the processes to stop (a training run saves a
        # checkpoint first); a second one means "now".
        signum = signals.received[-1]
        forward = signum if signals.forwarded == 0 else signal.SIGKILL
        signals.forwarded = len(signals.received)
        with lock:
          out.write(f'[launch.local] got {signal.Signals(signum).name}; '
                    f'sending {signal.Signals(forward).name} to the processes and waiting '
                    'for them.\n')
          out.flush()
        _send(procs, forward)
        status = 128 + signals.received[0]
      for process_id in sorted(running):
        code = procs[process_id].poll()
        if code is None:
          continue
        running.discard(process_id)
        if code != 0 and not signals.received:
          with lock:
            out.write(f'[launch.local] process {process_id} exited with status {code}; '
                      f'stopping the others.\n')
            out.flush()
          status = code
          _terminate(procs, grace_seconds)
          running.clear()
          break
      time.sleep(0.05)
  for pump in pumps:
    pump.join(timeout=5)
  # A negative status means killed by a signal; report it the way a shell does.
  return 128 - status if status < 0 else status


class _Parser(argparse.ArgumentParser):
  """argparse with its usage errors as one `error:` line (status 2), like every entry point."""

  def error(self, message: str):
    cli.fail(f'{message} (see `{self.prog} --help`)')


def parser() -> argparse.ArgumentParser:
  # argparse, not absl flags: the launched command (e.g. `python -m train`) has
  # absl flags of the same names (--num_processes), and tests import both.
  p = _Parser(prog='python -m launch.local', description=__doc__.split('\n')[0])
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
  try:
    return launch(command, num_processes=args.num_processes,
                  devices_per_process=args.devices_per_process, port=args.port,
                  grace_seconds=args.grace_seconds)
  except cli.UserError as e:
    cli.fail(e)


if __name__ == '__main__':
  sys.exit(main())
