"""Where a compiled step's time goes: a `jax.profiler` trace, summed per XLA op.

`benchmarks.train_step --profile_steps=N` traces N steps after its timed ones
and adds the summary to its JSON report:

  python -m benchmarks.train_step --config=configs/pretrain.py:bench_cpu --profile_steps=2

Each op of the trace is matched by name with the compiled program's
optimized HLO (`compiled.as_text()`) and put in one category:

- 'matmul': a dot or convolution, a fusion that contains one, or a GEMM
  library call (cuBLAS, or any custom call whose target names gemm/matmul);
- 'attention': a fused attention library call (cuDNN's fmha, flash);
- 'collective': all-reduce, all-gather, reduce-scatter, all-to-all,
  collective-permute (and their async halves);
- 'copy': copy, transpose, dynamic-update-slice, concatenate, slices;
- 'fusion': every other fusion (elementwise work, reductions, the softmax);
- 'other': everything else that ran.

While loops, calls and conditionals are left out of the sums: their events
span the ops inside them, which are counted themselves. On a CPU the ops of
the op's own thread times it (one op may use several cores, and ops of two
threads may overlap), so set the sums beside both the step time and
`cpu_seconds_per_step`; on an accelerator they are the device's op time, and
their gap to the step time is time the device sat idle.
"""

from __future__ import annotations

import collections
import glob
import os
import re
from typing import Iterable

_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$')
_INSTRUCTION = re.compile(
    r'^\s+(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*.*?\s(?P<opcode>[a-z][\w\-]*)\((?P<rest>.*)$')
_CALLS = re.compile(r'(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-, %]+)\}?')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]+)"')

_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute',
                'all-reduce-start', 'all-reduce-done', 'all-gather-start', 'all-gather-done',
                'collective-permute-start', 'collective-permute-done')
_COPIES = ('copy', 'copy-start', 'copy-done', 'transpose', 'dynamic-update-slice',
           'dynamic-slice', 'slice', 'concatenate', 'pad')
_CONTROL = ('while', 'call', 'conditional')
CATEGORIES = ('matmul', 'attention', 'collective', 'copy', 'fusion', 'other')


def _target_category(target: str) -> str | None:
  target = target.lower()
  if any(s in target for s in ('fmha', 'flash', 'attention')):
    return 'attention'
  if any(s in target for s in ('gemm', 'matmul', 'dot')):
    return 'matmul'
  return None


def _own_kind(opcode: str, target: str | None) -> str | None:
  """'matmul' / 'attention' for an instruction that is one itself, else None."""
  if opcode in ('dot', 'convolution'):
    return 'matmul'
  return _target_category(target) if target else None


def _strongest(kinds) -> str | None:
  """'attention' over 'matmul' over None: what a computation holding these kinds is."""
  return 'attention' if 'attention' in kinds else 'matmul' if 'matmul' in kinds else None


def hlo_ops(hlo_text: str) -> dict[str, dict[str, str]]:
  """{instruction name: {'category', 'opcode', 'source'}} for every instruction of the module."""
  computations: dict[str, list[tuple[str, str, list[str], str | None, str]]] = {}
  current = None
  for line in hlo_text.splitlines():
    if not line.startswith((' ', '\t')):
      found = _COMPUTATION.match(line)
      current = found.group('name') if found else None
      if current is not None:
        computations[current] = []
      continue
    found = _INSTRUCTION.match(line)
    if current is None or found is None:
      continue
    rest = found.group('rest')
    called = []
    for group in _CALLS.findall(rest):
      called += [c.strip().lstrip('%') for c in group.split(',') if c.strip()]
    target = _TARGET.search(rest)
    op_name = _OP_NAME.search(rest)
    computations[current].append((found.group('name'), found.group('opcode'), called,
                                  target.group(1) if target else None,
                                  op_name.group(1) if op_name else ''))

  inner: dict[str, str | None] = {}

  def contains(computation: str) -> str | None:
    """'attention' / 'matmul' if the computation (or one it calls) holds one, else None.

    HLO's call graph has no cycles, so the recursion ends."""
    if computation not in inner:
      body = computations.get(computation, ())
      inner[computation] = _strongest(
          [_own_kind(opcode, target) for _, opcode, _, target, _ in body]
          + [contains(sub) for _, _, called, _, _ in body for sub in called])
    return inner[computation]

  ops = {}
  for instructions in computations.values():
    for name, opcode, called, target, op_name in instructions:
      if opcode in _CONTROL:
        category = 'control'
      elif _own_kind(opcode, target):
        category = _own_kind(opcode, target)
      elif opcode == 'custom-call':
        category = 'other'
      elif opcode == 'fusion':
        category = _strongest([contains(c) for c in called]) or 'fusion'
      elif opcode in _COLLECTIVES:
        category = 'collective'
      elif opcode in _COPIES:
        category = 'copy'
      else:
        category = 'other'
      ops[name] = {'category': category, 'opcode': opcode,
                   'source': '/'.join(op_name.split('/')[-3:])}
  return ops


def trace_events(trace_dir: str, module: str) -> Iterable[tuple[str, float]]:
  """(XLA op name, seconds) of every op the trace recorded for the named module.

  A device plane (GPU/TPU) gives its 'XLA Ops' line where the trace has one,
  else the events (kernels) that carry an `hlo_op` stat, summed per op; the
  host CPU plane gives every event that carries one (XLA:CPU's thunks).
  """
  import jax  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))
  if not files:
    raise FileNotFoundError(f'No *.xplane.pb trace under {trace_dir}.')
  profile = jax.profiler.ProfileData.from_file(files[-1])
  for plane in profile.planes:
    on_device = plane.name.startswith('/device:')
    if not on_device and plane.name != '/host:CPU':
      continue
    lines = list(plane.lines)
    op_lines = [line for line in lines if line.name == 'XLA Ops'] if on_device else []
    for line in op_lines or lines:
      for event in line.events:
        stats = dict(event.stats)
        if not op_lines and 'hlo_op' not in stats:
          continue
        if 'hlo_module' in stats and not str(stats['hlo_module']).startswith(module):
          continue
        yield str(stats.get('hlo_op', event.name)), event.duration_ns * 1e-9


def summarize(events: Iterable[tuple[str, float]], ops: dict[str, dict[str, str]],
              steps: int, top: int = 15) -> dict:
  """Seconds per step by category and the `top` ops, from (op name, seconds) events."""
  seconds, calls = collections.Counter(), collections.Counter()
  for name, duration in events:
    seconds[name] += duration
    calls[name] += 1
  unknown = {'category': 'other', 'opcode': '?', 'source': ''}
  by_category = collections.Counter()
  for name, total in seconds.items():
    category = ops.get(name, unknown)['category']
    if category != 'control':
      by_category[category] += total
  op_seconds = sum(by_category.values())
  ranked = sorted((n for n in seconds if ops.get(n, unknown)['category'] != 'control'),
                  key=lambda n: -seconds[n])
  return {
      'steps': steps,
      'op_seconds_per_step': op_seconds / steps,
      'by_category': {c: {'seconds_per_step': by_category[c] / steps,
                          'share': by_category[c] / op_seconds if op_seconds else 0.0}
                      for c in CATEGORIES if by_category[c]},
      'top_ops': [{'op': n, **ops.get(n, unknown), 'seconds_per_step': seconds[n] / steps,
                   'calls_per_step': calls[n] / steps} for n in ranked[:top]],
  }
