"""Metrics sinks: `<workdir>/metrics.jsonl`, TensorBoard events and a console line.

`metrics.jsonl` holds one JSON object per logged step, e.g.
  {"step": 200, "tokens": 409600, "train/loss": 3.21, "train/learning_rate": 0.001,
   "train/grad_norm": 0.8, "perf/tokens_per_sec": 15000.0, "perf/mfu": 0.21,
   "perf/step_time": 0.136, "eval/loss": 3.4, "eval/perplexity": 30.0}
Non-finite floats are written as the strings "nan"/"inf"/"-inf" so the file
stays strict JSON; `float()` reads them back.

On resume the writer moves records newer than the restored step (they belong
to the interrupted run's lost future) to `metrics.discarded.jsonl` and drops a
torn last line, so the file always tells one consistent history and nothing
is deleted. Only process 0 writes.

A workdir on Cloud Storage (`gs://...`): an object cannot be appended to, so
the writer keeps the run's records in memory and rewrites the whole
`metrics.jsonl` object at most every `remote_sync_seconds` (and on `flush()`
and `close()`); the content is the same as a local file's. TensorBoard events
go straight to `gs://` when tensorboardX can write there (it needs
`google-cloud-storage`); otherwise they are written to a local temporary
folder and copied to `<workdir>/tensorboard/` through epath at the same times.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Mapping

from absl import logging
from etils import epath
import jax

from train import paths

METRICS_FILE = 'metrics.jsonl'
DISCARDED_FILE = 'metrics.discarded.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def _plain(value: Any) -> Any:
  """JSON-ready scalar: numpy/jax scalars to Python; non-finite floats to strings."""
  if hasattr(value, 'item') and getattr(value, 'size', 1) == 1:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # 'nan', 'inf', '-inf'
  return value


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All complete records of `<workdir>/metrics.jsonl` (a torn last line is skipped)."""
  path = epath.Path(workdir) / METRICS_FILE
  records = []
  if not path.exists():
    return records
  # One read, then split: remote objects are read whole anyway.
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue
  return records


def format_duration(seconds: float) -> str:
  seconds = max(int(seconds), 0)
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}h{minutes:02d}m{secs:02d}s' if hours else f'{minutes}m{secs:02d}s'


def _si(value: float) -> str:
  for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(value) >= scale:
      return f'{value / scale:.1f}{unit}'
  return f'{value:.0f}'


def progress_line(step: int, total: int | None, record: Mapping[str, Any],
                  eta_seconds: float | None) -> str:
  """`step 120/1000 | loss 3.2101 | 15.2k tok/s | MFU 21.0% | 0.136 s/step | ETA 2m00s`."""
  parts = [f'step {step}/{total}' if total else f'step {step}']
  if isinstance(record.get('train/loss'), (int, float)):
    parts.append(f'loss {record["train/loss"]:.4f}')
  elif 'train/loss' in record:
    parts.append(f'loss {record["train/loss"]}')
  if isinstance(record.get('eval/loss'), (int, float)):
    parts.append(f'eval {record["eval/loss"]:.4f}')
  if record.get('perf/tokens_per_sec'):
    parts.append(f'{_si(record["perf/tokens_per_sec"])} tok/s')
  if record.get('perf/mfu') is not None:
    parts.append(f'MFU {100 * record["perf/mfu"]:.1f}%')
  if record.get('perf/step_time'):
    parts.append(f'{record["perf/step_time"]:.3f} s/step')
  if eta_seconds is not None:
    parts.append(f'ETA {format_duration(eta_seconds)}')
  return ' | '.join(parts)


def _import_tensorboardx() -> Any:
  """tensorboardX, imported without PyTorch.

  When torch is installed, tensorboardX imports it at once, only so that it can
  accept torch tensors; that costs 2-3 s of every run's start, and we give it
  numpy values and Python floats. Hiding torch during the import makes its
  `try: import torch` fall back; a torch that is already imported is left alone,
  and a later `import torch` works as usual.
  """
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None  # `import torch` now raises ImportError.
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    if hide:
      del sys.modules['torch']
  return tensorboardX


class MetricsWriter:
  """Writes metric records to metrics.jsonl, TensorBoard and the console."""

  def __init__(self, workdir: str, *, total_steps: int | None = None, start_step: int = 0,
               tensorboard: bool = True, console: bool = True,
               remote_sync_seconds: float = 30.0):
    self.workdir = workdir
    self.total_steps = total_steps
    self.start_step = start_step
    self.console = console
    self.is_primary = jax.process_index() == 0
    self.remote = paths.is_remote(workdir)
    self.path = epath.Path(workdir) / METRICS_FILE
    self.remote_sync_seconds = remote_sync_seconds
    self._start_time = time.time()
    self._tb = None
    self._tb_local: str | None = None   # local folder mirrored to a remote workdir
    self._records: list[str] = []       # a remote workdir's lines, rewritten whole
    self._last_sync = time.monotonic()
    if not self.is_primary:
      return
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    kept = self._truncate_after(start_step)
    if self.remote:
      self._records = kept
      self._file = None
    else:
      self._file = self.path.open('a')
    if tensorboard:
      self._tb = self._tensorboard_writer(start_step)

  def _tensorboard_writer(self, start_step: int) -> Any:
    tensorboardX = _import_tensorboardx()
    from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
    target = os.fspath(epath.Path(self.workdir) / TENSORBOARD_DIR)
    logdir = target
    if self.remote and not (target.startswith('gs://')
                            and getattr(record_writer, 'GCS_ENABLED', False)):
      # tensorboardX writes gs:// only with google-cloud-storage installed;
      # write here and copy the files over through epath instead.
      self._tb_local = tempfile.mkdtemp(prefix='strata_tensorboard_')
      logdir = self._tb_local
      logging.warning('TensorBoard: tensorboardX cannot write %s directly (it needs '
                      'google-cloud-storage for gs://); events go to %s and are copied there '
                      'every %.0f s and at the end.', target, logdir, self.remote_sync_seconds)
    # purge_step hides events the interrupted run wrote after the restored step.
    return tensorboardX.SummaryWriter(logdir, purge_step=start_step + 1 if start_step else None)

  def _truncate_after(self, step: int) -> list[str]:
    """Moves records newer than `step` to metrics.discarded.jsonl; returns the kept lines.

    They belong to a future the restored state never had (steps after the
    last checkpoint, or a whole history whose checkpoints were all corrupt),
    but are kept aside rather than deleted.
    """
    if not self.path.exists():
      return []
    records = read_metrics(self.workdir)
    kept = [json.dumps(r) + '\n' for r in records if int(r.get('step', 0)) <= step]
    dropped = [json.dumps(r) + '\n' for r in records if int(r.get('step', 0)) > step]
    if dropped:
      discarded = epath.Path(self.workdir) / DISCARDED_FILE
      previous = discarded.read_text() if discarded.exists() else ''
      paths.write_text_atomic(discarded, previous + ''.join(dropped))
    paths.write_text_atomic(self.path, ''.join(kept))
    return kept

  def write(self, step: int, metrics: Mapping[str, Any], *, print_line: bool = True,
            eta_seconds: float | None = None) -> dict[str, Any]:
    """Appends one record; returns it as written."""
    record = {'step': int(step)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    if not self.is_primary:
      return record
    line = json.dumps(record) + '\n'
    if self.remote:
      self._records.append(line)
    else:
      self._file.write(line)
      self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != 'step' and isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(key, value, step)
    if self.remote and time.monotonic() - self._last_sync >= self.remote_sync_seconds:
      self._sync_remote()
    if self.console and print_line:
      print(progress_line(step, self.total_steps, record, eta_seconds), flush=True)
    return record

  def _sync_remote(self) -> None:
    """Rewrites the remote metrics.jsonl and copies local TensorBoard files over."""
    self.path.write_text(''.join(self._records))
    if self._tb_local is not None:
      if self._tb is not None:
        self._tb.flush()
      target = epath.Path(self.workdir) / TENSORBOARD_DIR
      target.mkdir(parents=True, exist_ok=True)
      for local in epath.Path(self._tb_local).iterdir():
        local.copy(target / local.name, overwrite=True)
    self._last_sync = time.monotonic()

  def message(self, text: str) -> None:
    """A console line (process 0 only), e.g. evaluation or checkpoint notices."""
    if self.is_primary and self.console:
      print(text, flush=True)

  def error(self, text: str) -> None:
    if self.is_primary:
      print(text, file=sys.stderr, flush=True)

  def flush(self) -> None:
    if self.is_primary:
      if self._tb is not None:
        self._tb.flush()
      if self.remote:
        self._sync_remote()
      else:
        self._file.flush()

  def close(self) -> None:
    if self.is_primary:
      if self._tb is not None:
        self._tb.close()
        self._tb = None
      if self.remote:
        self._sync_remote()
      else:
        self._file.close()
      if self._tb_local is not None:
        shutil.rmtree(self._tb_local, ignore_errors=True)   # a local temporary folder
        self._tb_local = None
