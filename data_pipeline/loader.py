"""Packed, shuffled global batches of the pre-tokenized corpus; each process reads its rows.

The global batch at step s is a function of the data, the seed, the row shape
and s only, never of the number of processes:

  per-document lengths (from the dataset metadata, no record read)
  -> epoch e: a permutation of ALL documents seeded by (seed, e)
  -> its packing plan (`data_pipeline.packing`): rows of [BOS] + tokens + [EOS] pieces
  -> epochs concatenated; global batch s = rows [s * B, (s + 1) * B).

Each process materialises only the rows of the batch it holds: the rows of its
addressable shards of the batch sharding (`process_rows`), so a mesh whose
processes share a batch slice works too. `global_batch` assembles the global
arrays from them with `jax.make_array_from_callback`. Building batch s reads
only the documents of those rows; Grain builds the next batches on threads.

The state is (spec, step) and identical on every process, so a run saved by N
processes resumes on M at the exact next batch. With a finite number of epochs
the number of batches follows from the plan and is the same everywhere:
drop_remainder=False pads the last batch with all-zero rows (segment 0), so
evaluation sees every token exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
import threading
from typing import Any

from absl import logging
import grain
import jax
import numpy as np

from data_pipeline import packing
from data_pipeline import shards
from data_pipeline import tokenizer

_STATE_VERSION = 2
# Aligned per-token fields of a row, each int32 [seq_len]; padding is 0.
FIELDS = ('tokens', 'segment_ids', 'positions')
# Batches are numbered up to here when the data repeats forever.
_NO_END = 2**62
_PLANS_KEPT = 4


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
  """What fixes the batches; saved with the state and checked on restore."""
  split: str
  seq_len: int
  batch_size: int  # Global: rows of one batch over all processes.
  seed: int
  num_epochs: int | None
  shuffle: bool
  drop_remainder: bool
  num_documents: int


def _document_fields(record: dict[str, Any], framing: str,
                     fields: Sequence[str]) -> dict[str, np.ndarray]:
  """A document's aligned per-token fields; pieces of rows are slices of them.

  'document' framing: [BOS] + tokens + [EOS], the extra fields 0 at both ends;
  'sequence' framing: the record as it is (it has its BOS and its end).
  """
  out = {}
  if framing == 'sequence':
    out['tokens'] = np.asarray(record['tokens'], np.int32)
    for name in fields:
      out[name] = np.asarray(record[name], np.int32)
    return out
  tokens = record['tokens']
  doc = np.empty(len(tokens) + 2, np.int32)
  doc[0] = tokenizer.BOS_ID
  doc[1:-1] = tokens
  doc[-1] = tokenizer.EOS_ID
  out['tokens'] = doc
  for name in fields:
    out[name] = np.pad(np.asarray(record[name], np.int32), 1)
  return out


class _Epochs:
  """Packing plans of the epochs, built when first needed, and where each epoch starts.

  Thread-safe: Grain builds several batches at once.
  """

  def __init__(self, spec: LoaderSpec, lengths: np.ndarray, framing: str = 'document'):
    self._spec = spec
    # 'document' records are read with bos and eos around them.
    self._lengths = lengths + 2 if framing == 'document' else lengths
    self._lock = threading.Lock()
    self._plans: dict[int, packing.Plan] = {}
    self._first_epoch = 0
    self._starts = [0]  # Global first row of epochs _first_epoch, _first_epoch + 1, ...

  def _order(self, epoch: int) -> np.ndarray:
    n = self._spec.num_documents
    if not self._spec.shuffle:
      return np.arange(n)
    return np.random.default_rng([self._spec.seed, epoch]).permutation(n)

  def plan(self, epoch: int) -> packing.Plan:
    with self._lock:
      return self._plan(epoch)

  def _plan(self, epoch: int) -> packing.Plan:
    if epoch not in self._plans:
      if len(self._plans) >= _PLANS_KEPT:
        del self._plans[min(self._plans)]
      self._plans[epoch] = packing.plan_epoch(self._order(epoch), self._lengths,
                                              self._spec.seq_len)
    return self._plans[epoch]

  def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Epoch and its first global row, of each global row; epoch == num_epochs past the end."""
    num_epochs = self._spec.num_epochs
    with self._lock:
      if rows.min() < self._starts[0]:
        raise ValueError(f'row {rows.min()} is before epoch {self._first_epoch}, where this '
                         'loader resumed')
      while True:
        last = self._first_epoch + len(self._starts) - 1
        if rows.max() < self._starts[-1] or (num_epochs is not None and last >= num_epochs):
          break
        self._starts.append(self._starts[-1] + self._plan(last).num_rows)
      k = np.searchsorted(self._starts, rows, side='right') - 1
      return self._first_epoch + k, np.asarray(self._starts)[k]

  def resume_at(self, epoch: int, start: int) -> None:
    """Trusts a saved (epoch, first row), so the epochs before it need no plan."""
    with self._lock:
      self._first_epoch, self._starts = epoch, [start]

  def total_rows(self) -> int:
    assert self._spec.num_epochs is not None
    return int(self.locate(np.array([_NO_END]))[1][0])


class Loader:
  """Iterator over this process's part of each global batch.

  Yields dicts of int32 [len(rows), seq_len] numpy arrays (`FIELDS` and the
  dataset's extra per-token fields, e.g. `loss_mask`): the rows
  `rows` (global row indices within a batch) of batch 0, 1, .... `num_batches`
  is the number of batches when num_epochs is finite (the same on every
  process), else None.
  """

  def __init__(self, source: Any, spec: LoaderSpec, lengths: np.ndarray, rows: np.ndarray,
               framing: str = 'document', fields: Sequence[str] = ()):
    self.spec = spec
    self.rows = rows
    self.fields = FIELDS + tuple(fields)
    self._source = source
    self._framing, self._extra_fields = framing, tuple(fields)
    self._epochs = _Epochs(spec, lengths, framing)
    self._arange = np.arange(spec.seq_len, dtype=np.int32)
    self._step = 0
    self._iterator = None
    self.num_batches = None
    if spec.num_epochs is not None:
      rounding = math.floor if spec.drop_remainder else math.ceil
      self.num_batches = rounding(self._epochs.total_rows() / spec.batch_size)

  def __iter__(self) -> Loader:
    return self

  @property
  def step(self) -> int:
    """The number of the batch `next` yields."""
    return self._step

  def __next__(self) -> dict[str, np.ndarray]:
    end = _NO_END if self.num_batches is None else self.num_batches
    if self._step >= end:
      raise StopIteration
    if self._iterator is None:
      batches = grain.MapDataset.range(self._step, end).map(self.batch)
      # Two threads match the machines this runs on (2 cores); a batch is a
      # few record reads and copies.
      self._iterator = iter(batches.to_iter_dataset(
          grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
    batch = next(self._iterator)
    self._step += 1
    return batch

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`."""
    rows = step * self.spec.batch_size + self.rows
    epochs, starts = self._epochs.locate(rows)
    out = {k: np.zeros((len(rows), self.spec.seq_len), np.int32) for k in self.fields}
    for epoch in np.unique(epochs).tolist():
      if epoch == self.spec.num_epochs:
        continue  # Past the end of the data: padding rows.
      plan = self._epochs.plan(epoch)
      [mine] = np.nonzero(epochs == epoch)
      which, piece = plan.pieces(rows[mine] - starts[mine])
      pieces = zip(mine[which].tolist(), plan.doc[piece].tolist(), plan.start[piece].tolist(),
                   plan.length[piece].tolist(), plan.col[piece].tolist(),
                   plan.segment[piece].tolist())
      # One read per record: the source's batched read starts threads on every
      # call, which costs more than the few records of a batch.
      docs = {d: _document_fields(self._source[d], self._framing, self._extra_fields)
              for d in set(plan.doc[piece].tolist())}
      for i, doc, start, n, col, segment in pieces:
        for name, values in docs[doc].items():
          out[name][i, col:col + n] = values[start:start + n]
        out['segment_ids'][i, col:col + n] = segment
        out['positions'][i, col:col + n] = self._arange[:n]
    return out

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable, the same on every process; `set_state` resumes at the next batch."""
    epoch, start = self._epochs.locate(np.array([self._step * self.spec.batch_size]))
    return {'version': _STATE_VERSION, 'spec': dataclasses.asdict(self.spec),
            'step': self._step, 'epoch': int(epoch[0]), 'epoch_start': int(start[0])}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get('version') == 1 and 'emitted' in state:
      # Per-process packing (before version 2) has no equivalent position in
      # the global plan; keep the step count, so a run goes on rather than stopping.
      logging.warning('Loader state of version 1 (per-process packing): the data order has '
                      'changed; continuing at batch %d of the new order.', state['emitted'])
      self._step, self._iterator = int(state['emitted']), None
      return
    if state.get('version') != _STATE_VERSION:
      raise ValueError(f'unknown loader state version {state.get("version")!r} (this loader '
                       f'writes {_STATE_VERSION}; version 1 was per process)')
    mine = dataclasses.asdict(self.spec)
    diff = {k: (v, mine.get(k)) for k, v in state['spec'].items() if mine.get(k) != v}
    if diff:
      raise ValueError(
          'loader state was saved by a loader with other settings '
          '(saved, now): ' + ', '.join(f'{k}={a!r}, {b!r}' for k, (a, b) in diff.items()))
    self._epochs.resume_at(state['epoch'], state['epoch_start'])
    self._step, self._iterator = state['step'], None


def process_rows(sharding: jax.sharding.Sharding, batch_size: int, seq_len: int,
                 devices: Sequence[jax.Device] | None = None) -> np.ndarray:
  """Sorted global rows of a [batch_size, seq_len] batch that `devices` hold.

  `devices` defaults to this process's addressable devices; tests pass another
  set to stand for another process.
  """
  shape = (batch_size, seq_len)
  if devices is None:
    index_map = sharding.addressable_devices_indices_map(shape)
  else:
    index_map = {d: i for d, i in sharding.devices_indices_map(shape).items() if d in devices}
  all_rows = np.arange(batch_size)
  return np.unique(np.concatenate([all_rows[index[0]] for index in index_map.values()]))


def make_loader(
    data_dir: str,
    split: str,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
    sharding: jax.sharding.Sharding | None = None,
    rows: Sequence[int] | None = None,
) -> Loader:
  """Batches of packed rows from `<data_dir>/tfds` (see the module docstring).

  Args:
    data_dir: the data workdir (holding `tfds/`).
    split: 'train', 'validation' or 'test'.
    seq_len: row length.
    batch_size: rows per global batch (all processes together).
    seed: shuffle seed; each epoch is shuffled differently.
    num_epochs: None repeats forever.
    shuffle: False keeps the stored order (evaluation).
    drop_remainder: False with a finite num_epochs pads the last batch with
      all-zero rows (segment 0), so every token is seen exactly once.
    sharding: the batch sharding; this process reads the rows its devices
      hold (`process_rows`). None: all rows.
    rows: the global rows to read, instead of `sharding` (to simulate a process).
  """
  if seq_len < 2 or batch_size < 1:
    raise ValueError(f'need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}')
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs must be None or >= 1, got {num_epochs}')
  if rows is None:
    rows = (np.arange(batch_size) if sharding is None
            else process_rows(sharding, batch_size, seq_len))
  rows = np.asarray(rows, np.int64)
  if not len(rows) or rows.min() < 0 or rows.max() >= batch_size:
    raise ValueError(f'rows must be a non-empty subset of [0, {batch_size}), got {rows}')
  source = shards.data_source(data_dir, split)
  if not len(source):
    raise ValueError(f'split {split!r} of {shards.dataset_dir(data_dir)} has no documents')
  lengths = shards.document_lengths(data_dir, split)
  framing, fields = shards.layout(data_dir)
  spec = LoaderSpec(split, seq_len, batch_size, seed, num_epochs, shuffle, drop_remainder,
                    len(source))
  return Loader(source, spec, lengths, rows, framing, fields)


def global_batch(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding,
                 batch_size: int) -> dict[str, jax.Array]:
  """Global [batch_size, ...] arrays from this process's rows (`process_rows` order).

  `sharding` is the [batch, length] sharding; a field of another rank ([B]
  per-example values, say) gets the same split of its batch axis.
  """
  first = next(iter(local_batch.values()))
  num_local, seq_len = first.shape[0], first.shape[1]
  rows = process_rows(sharding, batch_size, seq_len)
  if len(rows) != num_local:
    raise ValueError(f'{num_local} local rows, but this process holds {len(rows)} rows of a '
                     f'batch of {batch_size} under {sharding}')
  where = np.full(batch_size, -1)  # Global row -> local row.
  where[rows] = np.arange(len(rows))

  def make(local: np.ndarray) -> jax.Array:
    shape = (batch_size,) + local.shape[1:]
    field_sharding = _like(sharding, local.ndim)
    return jax.make_array_from_callback(
        shape, field_sharding,
        lambda index: local[(where[np.arange(batch_size)[index[0]]],) + tuple(index[1:])])

  return {name: make(local) for name, local in local_batch.items()}


def _like(sharding: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
  """`sharding` (of [B, L]) for a field of rank `ndim`: the batch axis split alike."""
  if ndim == 2 or not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = tuple(sharding.spec) + (None,) * 2
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
      *(spec[:1] if ndim == 1 else spec[:2] + (None,) * (ndim - 2))))


def num_bytes(data_dir: str, split: str) -> int:
  """Total UTF-8 bytes of the split's documents (for bits per byte)."""
  return shards.split_stats(data_dir, split)['bytes']
