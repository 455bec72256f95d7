"""Two test guards: a hang becomes a failure, and "nothing changed" is checked byte for byte."""

from __future__ import annotations

import contextlib
import os
import signal


@contextlib.contextmanager
def fails_if_it_hangs(seconds: int):
  """A read that blocks (a FIFO) or a walk that never ends becomes a failure, not a hung suite."""

  def hung(*_):
    raise TimeoutError(f'still running after {seconds} s: blocked on an input?')

  previous = signal.signal(signal.SIGALRM, hung)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def snapshot(folder, mtimes: bool = False) -> dict[str, object]:
  """Every file under `folder` (relative path) with its bytes, and its mtime if asked."""
  out = {}
  for dirpath, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        data = f.read()
      out[os.path.relpath(path, folder)] = (data, os.stat(path).st_mtime_ns) if mtimes else data
  return out
