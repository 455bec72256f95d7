"""Packed, sharded, shuffled batches of the pre-tokenized corpus, with Grain.

Pipeline (per process):
  tfds data source -> this process's documents (index i::process_count)
  -> global shuffle, reseeded every epoch -> repeat -> [BOS] + tokens + [EOS]
  -> pack into rows of seq_len (segment_ids, positions) -> batch.

Sharding happens on record indices before anything else, so processes see
disjoint documents that together cover the split. The packer is a Grain
iterator whose state is (the parent state at the document being packed, how
much of it is already emitted), so a restored loader continues exactly.

With a finite number of epochs, processes would pack different numbers of
rows, and a process that stops early leaves the others waiting in a
collective. So every process counts the batches of all of them (from document
lengths, with the same packing rule) and they all yield the same number:
the smallest (drop_remainder=True, training) or the largest, padded with
all-zero batches (drop_remainder=False, evaluation).
"""

from __future__ import annotations

from collections.abc import Iterable
import dataclasses
import math
from typing import Any

import grain
import jax
import numpy as np

from data_pipeline import shards
from data_pipeline import tokenizer

_STATE_VERSION = 1


def _wrap_document(record: dict[str, Any]) -> np.ndarray:
  tokens = record['tokens']
  doc = np.empty(len(tokens) + 2, np.int32)
  doc[0] = tokenizer.BOS_ID
  doc[1:-1] = tokens
  doc[-1] = tokenizer.EOS_ID
  return doc


class _PackIterator(grain.DatasetIterator):
  """Packs documents into rows of `seq_len`, one segment per document piece.

  A document that fits in `seq_len` is never cut: if it does not fit in what is
  left of the row, the row is closed with padding and the document starts the
  next one. A longer document must be cut anyway, so its first piece fills the
  rest of the current row and the following pieces fill whole rows.
  """

  def __init__(self, parent: grain.DatasetIterator, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._arange = np.arange(seq_len, dtype=np.int32)
    self._doc: np.ndarray | None = None  # Document being packed.
    self._offset = 0  # Tokens of self._doc already emitted.
    self._doc_state = None  # Parent state whose next element is self._doc.
    self._exhausted = False

  def _fetch(self) -> None:
    self._doc_state = self._parent.get_state()
    self._offset = 0
    try:
      self._doc = next(self._parent)
    except StopIteration:
      self._doc = None
      self._exhausted = True

  def __next__(self) -> dict[str, np.ndarray]:
    seq_len = self._seq_len
    tokens = np.zeros(seq_len, np.int32)
    segment_ids = np.zeros(seq_len, np.int32)
    positions = np.zeros(seq_len, np.int32)
    used = num_pieces = 0
    while used < seq_len:
      if self._doc is None:
        if self._exhausted:
          break
        self._fetch()
        if self._doc is None:
          break
      doc, start = self._doc, self._offset
      rest, space = len(doc) - start, seq_len - used
      if rest <= space:
        n = rest
      elif len(doc) > seq_len:
        n = space
      else:
        break  # Fits in a fresh row: keep it whole.
      num_pieces += 1
      tokens[used:used + n] = doc[start:start + n]
      segment_ids[used:used + n] = num_pieces
      positions[used:used + n] = self._arange[:n]
      used += n
      if n == rest:
        self._doc = None
      else:
        self._offset += n
    if used == 0:
      raise StopIteration
    return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions}

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {'parent': self._parent.get_state(), 'offset': 0}
    return {'parent': self._doc_state, 'offset': self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state['parent'])
    self._doc, self._offset, self._exhausted = None, 0, False
    if state['offset']:
      self._fetch()
      if self._doc is None or state['offset'] >= len(self._doc):
        raise ValueError(f'loader state does not match the data: {state}')
      self._offset = state['offset']


def _count_rows(lengths: Iterable[int], seq_len: int) -> int:
  """Rows `_PackIterator` makes from documents of these lengths (bos/eos included)."""
  rows = used = 0
  for length in lengths:
    if length <= seq_len:
      if used + length > seq_len:  # Closed with padding.
        rows, used = rows + 1, 0
      used += length
    else:  # Cut: fills the current row, then whole rows.
      full, used = divmod(used + length, seq_len)
      rows += full
    if used == seq_len:
      rows, used = rows + 1, 0
  return rows + (used > 0)


class _PackIterDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, seq_len: int):
    super().__init__(parent)
    self._seq_len = seq_len

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len)


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  missing = batch_size - len(batch['tokens'])
  if not missing:
    return batch
  return {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class LoaderSpec:
  """What fixes the order of batches; saved with the state and checked on restore."""
  split: str
  seq_len: int
  batch_size: int
  seed: int
  num_epochs: int | None
  shuffle: bool
  drop_remainder: bool
  process_index: int
  process_count: int
  num_documents: int


class Loader:
  """Iterator over batches: dicts of int32 [batch_size, seq_len] numpy arrays.

  `num_batches` is the number of batches it yields when num_epochs is finite
  (the same on every process), else None.
  """

  def __init__(self, dataset: grain.IterDataset, spec: LoaderSpec,
               num_batches: int | None = None):
    self.spec = spec
    self.num_batches = num_batches
    self._iterator = iter(dataset)
    self._emitted = 0

  def __iter__(self) -> Loader:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.num_batches is not None and self._emitted >= self.num_batches:
      raise StopIteration
    try:
      batch = next(self._iterator)
    except StopIteration:
      if self.num_batches is None:
        raise
      # Other processes still have batches: take part with padding only.
      shape = (self.spec.batch_size, self.spec.seq_len)
      batch = {k: np.zeros(shape, np.int32) for k in ('tokens', 'segment_ids', 'positions')}
    self._emitted += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state; `set_state` on a loader of the same spec resumes here."""
    return {'version': _STATE_VERSION, 'spec': dataclasses.asdict(self.spec),
            'iterator': self._iterator.get_state(), 'emitted': self._emitted}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get('version') != _STATE_VERSION:
      raise ValueError(f'unknown loader state version {state.get("version")!r}')
    mine = dataclasses.asdict(self.spec)
    diff = {k: (v, mine.get(k)) for k, v in state['spec'].items() if mine.get(k) != v}
    if diff:
      raise ValueError(
          'loader state was saved by a loader with other settings '
          '(saved, now): ' + ', '.join(f'{k}={a!r}, {b!r}' for k, (a, b) in diff.items()))
    self._iterator.set_state(state['iterator'])
    self._emitted = state['emitted']


def _document_order(num_documents: int, process_index: int, process_count: int,
                    shuffle: bool, seed: int, num_epochs: int | None) -> grain.MapDataset:
  """Indices of the documents one process reads, in order."""
  ds = grain.MapDataset.range(num_documents)[process_index::process_count]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  # Shuffle before repeat: repeat hands the shuffle indices past the first
  # epoch, which it reshuffles with seed + epoch.
  return ds.repeat(num_epochs)


def _agreed_num_batches(source, spec: LoaderSpec) -> int:
  """Batches every process yields with a finite num_epochs (module docstring)."""
  lengths = np.array([len(source[i]['tokens']) + 2 for i in range(len(source))])
  counts = []
  for p in range(spec.process_count):
    order = _document_order(len(source), p, spec.process_count, spec.shuffle, spec.seed,
                            spec.num_epochs)
    rows = _count_rows(lengths[np.fromiter(order, np.int64, len(order))], spec.seq_len)
    counts.append(rows / spec.batch_size)
  if spec.drop_remainder:
    return math.floor(min(counts))
  return math.ceil(max(counts))


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
    process_index: int | None = None,
    process_count: int | None = None,
) -> Loader:
  """Batches of packed rows from `<data_dir>/tfds` (see the module docstring).

  Args:
    data_dir: the data workdir (holding `tfds/`).
    split: 'train', 'validation' or 'test'.
    seq_len: row length.
    batch_size: rows per batch on this process (global batch / process_count).
    seed: shuffle seed; each epoch is shuffled differently.
    num_epochs: None repeats forever.
    shuffle: False keeps the stored order (evaluation).
    drop_remainder: False with a finite num_epochs pads the last batch with
      all-zero rows (segment 0), so every token is seen exactly once.
    process_index, process_count: this process's shard; default from jax.
  """
  if seq_len < 2 or batch_size < 1:
    raise ValueError(f'need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}')
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs must be None or >= 1, got {num_epochs}')
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  source = shards.data_source(data_dir, split)
  if process_index >= len(source):
    raise ValueError(
        f'split {split!r} of {shards.dataset_dir(data_dir)} has {len(source)} documents: '
        f'none for process {process_index} of {process_count}')
  spec = LoaderSpec(split, seq_len, batch_size, seed, num_epochs, shuffle,
                    drop_remainder, process_index, process_count, len(source))
  order = _document_order(len(source), process_index, process_count, shuffle, seed,
                          num_epochs)
  ds = order.map(lambda i: _wrap_document(source[i]))
  # Two reader threads match the machines this runs on (2 cores); decoding a
  # record is a memcpy, so more threads only add contention.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
  it = _PackIterDataset(it, seq_len).batch(batch_size, drop_remainder=drop_remainder)
  if not drop_remainder:
    it = it.map(lambda batch: _pad_batch(batch, batch_size))
  num_batches = None if num_epochs is None else _agreed_num_batches(source, spec)
  return Loader(it, spec, num_batches)


def global_batch(local_batch: dict[str, np.ndarray],
                 sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Global arrays from every process's local batch (batch dim concatenated)."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def num_bytes(data_dir: str, split: str) -> int:
  """Total UTF-8 bytes of the split's documents (for bits per byte)."""
  return shards.split_stats(data_dir, split)['bytes']
