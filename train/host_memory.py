"""Host memory: XLA:CPU's per-step scratch buffer on transparent huge pages.

XLA:CPU gives each execution of a compiled program one temporary buffer that
holds every intermediate (for a `bench_cpu` train step, 1.75 GB) and frees it
when the execution ends. glibc's malloc serves a request that large with a
fresh `mmap` and gives it back with `munmap`, so every step faults the whole
buffer in again, 4 KiB at a time: ~430k minor page faults and 1.0-1.5 s of
kernel time per `bench_cpu` step (8 CPU-seconds in all on 2 cores). With
glibc's `glibc.malloc.hugetlb=1` tunable, malloc asks the kernel for
transparent huge pages on its mappings (`madvise`, which is the default
setting of most Linux systems): 2 MiB per fault, ~1.4k faults and ~0.2 s of
kernel time per step, and the memory use is unchanged.

A glibc tunable is read only when a process starts, so a `python -m train...`
or `python -m benchmarks...` command re-executes itself once with the tunable
added to GLIBC_TUNABLES (`reexec_with_huge_pages`, called when the package is
first imported, which for `-m` is before anything else runs: same process id,
arguments, stdin and stdout). It does so only where it helps:

- Linux with glibc 2.35 or later (older ones ignore the tunable);
- CPU-only processes: JAX_PLATFORMS names only cpu, or it is unset and no
  TPU or GPU device file is visible (on an accelerator the activations live
  in device memory);
- not when GLIBC_TUNABLES already sets `glibc.malloc.hugetlb` (the user's
  choice stands, and the re-executed process stops there).

`STRATA_HUGE_PAGES=0` turns it off; `=1` applies it on any host. In a
notebook or under pytest nothing is re-executed; start the process with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1 for the same effect.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from typing import Mapping

TUNABLE = 'glibc.malloc.hugetlb'
ENV = 'STRATA_HUGE_PAGES'
ACCELERATOR_DEVICE_FILES = ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*')


def cpu_only(environ: Mapping[str, str] = os.environ,
             device_files: tuple[str, ...] = ACCELERATOR_DEVICE_FILES) -> bool:
  """Will this process run XLA on the CPU only?"""
  platforms = environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return {p.strip() for p in platforms.split(',') if p.strip()} == {'cpu'}
  return not any(glob.glob(pattern) for pattern in device_files)


def _glibc_at_least(major: int, minor: int) -> bool:
  name, version = platform.libc_ver()
  if name != 'glibc':
    return False
  try:
    return tuple(int(x) for x in version.split('.')[:2]) >= (major, minor)
  except ValueError:
    return False


def huge_pages_environment(environ: Mapping[str, str] = os.environ,
                           device_files: tuple[str, ...] = ACCELERATOR_DEVICE_FILES,
                           system: str | None = None, glibc_ok: bool | None = None
                           ) -> dict[str, str] | None:
  """The environment to re-execute with, or None where nothing should change."""
  mode = environ.get(ENV, '').strip()
  if mode == '0':
    return None
  if mode not in ('', '1'):
    print(f"{ENV}={mode!r} is not 0 or 1; huge pages are left alone.", file=sys.stderr)
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if TUNABLE in tunables:
    return None
  system = platform.system() if system is None else system
  glibc_ok = _glibc_at_least(2, 35) if glibc_ok is None else glibc_ok
  if system != 'Linux' or not glibc_ok:
    return None
  if mode != '1' and not cpu_only(environ, device_files):
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}=1' if tunables else f'{TUNABLE}=1'
  return env


def reexec_with_huge_pages() -> None:
  """Re-executes a `python -m <package>...` command with huge pages (module docstring).

  Acts only while Python is locating the `-m` module (sys.argv[0] is '-m'
  then), so importing the package anywhere else changes nothing.
  """
  if sys.argv[:1] != ['-m'] or not getattr(sys, 'orig_argv', None):
    return
  env = huge_pages_environment()
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

