"""Pre-tokenized shards: the TFDS dataset `strata_corpus` in array_record format.

Written without TensorFlow: each document is serialised with the TFDS
features' own (numpy) serializer, appended to ArrayRecord files named the way
TFDS expects, and `tfds.folder_dataset.write_metadata` adds dataset_info.json,
so `tfds.data_source('strata_corpus', data_dir=<workdir>/tfds)` reads it.

Token ids are stored as the raw bytes of an int32 array (a `Tensor` feature
with `encoding='bytes'`): decoding is one `np.frombuffer`, where an int64_list
proto costs ~0.3 s per million tokens to read and ~3 s to write.

A dataset holds documents of one of two framings (`framing` in its metadata):
'document' (pre-training text: the loader adds [BOS] ... [EOS] around the
token ids) or 'sequence' (complete sequences such as rendered conversations,
which already start with BOS and carry their own ends; read as they are).
Besides `tokens`, records may carry aligned per-token fields (`fields`, e.g.
`loss_mask` for SFT), each an int32 array as long as the tokens.

Beside the records, each split gets two small arrays, named in the metadata
(`split_files`), so nothing on the training path has to read a whole split:
`<split>-lengths.npy` (tokens per document, in record order; the loader plans
its packing from them) and `<split>-token_counts.npy` (how often each token id
occurs; the unigram baseline of `train.evaluate`). A dataset written before
they existed still works: they are computed once per process by reading the
split, with a warning that says how to rebuild it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import functools
import io
import os
import shutil

from absl import logging
from array_record.python import array_record_module
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

DATASET_NAME = 'strata_corpus'
VERSION = '1.0.0'
FILE_FORMAT = 'array_record'
# A new shard starts after this many serialised bytes, so no file gets huge.
MAX_SHARD_BYTES = 512 * 2**20
# One record per chunk for random access; zstd level 1 writes ~6x faster than
# the default (brotli) and token ids still shrink by almost half.
_WRITER_OPTIONS = 'group_size:1,zstd:1'
# Token ids are counted in chunks of this many: one bincount per document
# would allocate a vocabulary-sized array per document.
_COUNT_CHUNK_TOKENS = 2**20
LENGTHS = 'lengths'
TOKEN_COUNTS = 'token_counts'


FRAMINGS = ('document', 'sequence')


def _int_sequence() -> tfds.features.Tensor:
  return tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding='bytes')


def features(fields: Sequence[str] = ()) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'tokens': _int_sequence(),
      **{name: _int_sequence() for name in fields},
      'num_bytes': np.int32,
      'id': tfds.features.Text(),
  })


def tfds_data_dir(data_workdir: str) -> str:
  """The TFDS `data_dir` inside a data workdir."""
  return os.path.join(data_workdir, 'tfds')


def dataset_dir(data_workdir: str) -> str:
  return os.path.join(tfds_data_dir(data_workdir), DATASET_NAME, VERSION)


def _shard_path(directory: str, split: str, index: int, count: int) -> str:
  return os.path.join(
      directory, f'{DATASET_NAME}-{split}.{FILE_FORMAT}-{index:05d}-of-{count:05d}')


def _split_file(split: str, kind: str) -> str:
  return f'{split}-{kind}.npy'


class _TokenCounter:
  """Bincount of token ids over many documents, in chunks (see _COUNT_CHUNK_TOKENS)."""

  def __init__(self):
    self.counts = np.zeros(0, np.int64)
    self._pending: list[np.ndarray] = []
    self._pending_tokens = 0

  def add(self, tokens: np.ndarray) -> None:
    self._pending.append(tokens)
    self._pending_tokens += tokens.size
    if self._pending_tokens >= _COUNT_CHUNK_TOKENS:
      self.flush()

  def flush(self) -> np.ndarray:
    if self._pending:
      chunk = np.bincount(np.concatenate(self._pending), minlength=len(self.counts))
      chunk[:len(self.counts)] += self.counts
      self.counts = chunk.astype(np.int64)
      self._pending, self._pending_tokens = [], 0
    return self.counts


def _check_fields(split: str, index: int, doc_id: str, record: dict, tokens: np.ndarray,
                  fields: Sequence[str]) -> dict[str, np.ndarray]:
  out = {}
  for name in fields:
    if name not in record:
      raise ValueError(f'split {split!r} record {index} (id {doc_id!r}): no field {name!r}')
    values = np.asarray(record[name])
    if values.shape != tokens.shape or (values.size and values.dtype.kind not in 'iub'):
      raise ValueError(f'split {split!r} record {index} (id {doc_id!r}): field {name!r} must '
                       f'be ints aligned with the {tokens.size} tokens, got shape '
                       f'{values.shape} dtype {values.dtype}')
    out[name] = values.astype(np.int32)
  return out


def _check_record(split: str, index: int, record, fields: Sequence[str] = ()
                  ) -> tuple[str, np.ndarray, int, dict[str, np.ndarray]]:
  """(id, tokens, num_bytes, extra fields) of a record: a tuple, or a dict with fields."""
  extra_record = record if isinstance(record, dict) else {}
  if isinstance(record, dict):
    record = (record.get('id'), record.get('tokens'), record.get('num_bytes', 0))
  elif fields:
    raise ValueError(f'split {split!r} record {index}: a dataset with fields {list(fields)} '
                     'takes dict records')
  try:
    doc_id, tokens, num_bytes = record
  except (TypeError, ValueError):
    raise ValueError(
        f'split {split!r} record {index}: expected (id, tokens, num_bytes), '
        f'got {type(record).__name__}') from None
  if not isinstance(doc_id, str):
    raise ValueError(f'split {split!r} record {index}: id must be str, got {doc_id!r}')
  # An explicit dtype makes list conversion ~2x faster than inferring one.
  try:
    tokens = tokens if isinstance(tokens, np.ndarray) else np.array(tokens, dtype=np.int64)
  except (TypeError, ValueError, OverflowError) as e:
    raise ValueError(
        f'split {split!r} record {index} (id {doc_id!r}): tokens are not ints: {e}') from None
  if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in 'iu'):
    raise ValueError(
        f'split {split!r} record {index} (id {doc_id!r}): tokens must be a flat '
        f'list of ints, got shape {tokens.shape} dtype {tokens.dtype}')
  if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max):
    raise ValueError(
        f'split {split!r} record {index} (id {doc_id!r}): token ids out of int32 range')
  if not 0 <= int(num_bytes) <= np.iinfo(np.int32).max:
    raise ValueError(
        f'split {split!r} record {index} (id {doc_id!r}): bad num_bytes {num_bytes!r}')
  extra = _check_fields(split, index, doc_id, extra_record, tokens, fields)
  return doc_id, tokens.astype(np.int32), int(num_bytes), extra


def _write_split(directory: str, split: str, records: Iterable, max_shard_bytes: int,
                 fields: Sequence[str] = ()) -> tuple[tfds.core.SplitInfo, dict]:
  feats = features(fields)
  stats = {'documents': 0, 'tokens': 0, 'bytes': 0}
  lengths, counter = [], _TokenCounter()
  shard_lengths, shard_sizes = [], []
  writer, written = None, 0
  for index, record in enumerate(records):
    doc_id, tokens, num_bytes, extra = _check_record(split, index, record, fields)
    example = feats.serialize_example(
        {'tokens': tokens, 'num_bytes': num_bytes, 'id': doc_id, **extra})
    if writer is None or written >= max_shard_bytes:
      if writer is not None:
        writer.close()
      # Shard count is unknown until the end: temporary names, renamed below.
      writer = array_record_module.ArrayRecordWriter(
          _shard_path(directory, split, len(shard_lengths), 0), _WRITER_OPTIONS)
      shard_lengths.append(0)
      shard_sizes.append(0)
      written = 0
    writer.write(example)
    written += len(example)
    shard_lengths[-1] += 1
    shard_sizes[-1] += len(example)
    stats['documents'] += 1
    stats['tokens'] += int(tokens.size)
    stats['bytes'] += num_bytes
    lengths.append(tokens.size)
    counter.add(tokens)
  if writer is None:
    # An empty split still gets its (empty) file, so it can be opened.
    writer = array_record_module.ArrayRecordWriter(
        _shard_path(directory, split, 0, 0), _WRITER_OPTIONS)
    shard_lengths, shard_sizes = [0], [0]
  writer.close()
  for i in range(len(shard_lengths)):
    os.rename(_shard_path(directory, split, i, 0),
              _shard_path(directory, split, i, len(shard_lengths)))
  np.save(os.path.join(directory, _split_file(split, LENGTHS)), np.array(lengths, np.int64))
  np.save(os.path.join(directory, _split_file(split, TOKEN_COUNTS)), counter.flush())
  info = tfds.core.SplitInfo(
      name=split, shard_lengths=shard_lengths, num_bytes=sum(shard_sizes),
      filename_template=None)
  return info, stats


def write_dataset(
    data_workdir: str,
    splits: dict[str, Iterable[tuple[str, list[int], int] | dict]],
    *,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    fields: Sequence[str] = (),
    framing: str = 'document',
) -> dict[str, dict]:
  """Writes (doc id, token ids, num_bytes) records per split as `strata_corpus`.

  With `fields`, records are dicts {'id', 'tokens', 'num_bytes', <field>: ...}.
  `framing` says whether the loader wraps each record in BOS/EOS ('document')
  or reads it as it is ('sequence'); see the module docstring. Any earlier
  version of the dataset in the workdir is replaced. Records keep their order
  (the loader shuffles). Per-document lengths and token counts are written
  beside them. Returns per split {'documents': n, 'tokens': t, 'bytes': b}.
  """
  if not splits:
    raise ValueError('write_dataset: no splits given')
  if framing not in FRAMINGS:
    raise ValueError(f'framing={framing!r} is not one of {FRAMINGS}')
  fields = tuple(fields)
  directory = dataset_dir(data_workdir)
  # Written next to the final place, then moved, so a crash never leaves a
  # half-written dataset that looks complete.
  tmp_directory = directory + '.incomplete'
  shutil.rmtree(tmp_directory, ignore_errors=True)
  os.makedirs(tmp_directory)
  split_infos, stats = [], {}
  for split, records in splits.items():
    info, stats[split] = _write_split(tmp_directory, split, records, max_shard_bytes, fields)
    split_infos.append(info)
  shutil.rmtree(directory, ignore_errors=True)
  os.rename(tmp_directory, directory)
  tfds.folder_dataset.write_metadata(
      data_dir=directory,
      features=features(fields),
      split_infos=split_infos,
      check_data=False,
      description='strata pre-tokenized corpus: token ids per document (no bos/eos).',
      metadata=tfds.core.MetadataDict(
          split_stats=stats,
          framing=framing,
          fields=list(fields),
          split_files={split: {kind: _split_file(split, kind) for kind in (LENGTHS, TOKEN_COUNTS)}
                       for split in stats}),
  )
  return stats


def _builder(data_workdir: str) -> tfds.core.DatasetBuilder:
  directory = dataset_dir(data_workdir)
  if not os.path.exists(os.path.join(directory, 'dataset_info.json')):
    raise FileNotFoundError(
        f'no {DATASET_NAME} dataset in {directory}; prepare it with '
        f'`python -m data_pipeline --config=configs/data.py:stdlib --workdir={data_workdir}`')
  return tfds.builder_from_directory(directory)


def _check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
  if split not in builder.info.splits:
    raise ValueError(
        f'split {split!r} not in {builder.data_dir} '
        f'(has {", ".join(sorted(builder.info.splits))})')


def data_source(data_workdir: str, split: str):
  """Random-access source of one split: `len()`, `[i] -> {'tokens', 'num_bytes', 'id'}`."""
  builder = _builder(data_workdir)
  _check_split(builder, split)
  if builder.info.splits[split].num_examples == 0:
    return []  # TFDS cannot open a split without examples.
  return builder.as_data_source(split=split)


def split_stats(data_workdir: str, split: str) -> dict[str, int]:
  """{'documents', 'tokens', 'bytes'} of one split, from the dataset metadata."""
  builder = _builder(data_workdir)
  _check_split(builder, split)
  stats = (builder.info.metadata or {}).get('split_stats', {}).get(split)
  if stats is None:  # Written by something else: count it.
    source = data_source(data_workdir, split)
    stats = {'documents': len(source), 'tokens': 0, 'bytes': 0}
    for i in range(len(source)):
      record = source[i]
      stats['tokens'] += len(record['tokens'])
      stats['bytes'] += int(record['num_bytes'])
  return {k: int(v) for k, v in stats.items()}


def _split_array(data_workdir: str, split: str, kind: str) -> np.ndarray:
  builder = _builder(data_workdir)
  _check_split(builder, split)
  name = (builder.info.metadata or {}).get('split_files', {}).get(split, {}).get(kind)
  if name is None:
    return _scan_split(data_workdir, split)[kind]
  # Through epath, so a dataset on Cloud Storage is read the same way.
  data = (epath.Path(dataset_dir(data_workdir)) / name).read_bytes()
  return np.load(io.BytesIO(data))


@functools.cache
def _scan_split(data_workdir: str, split: str) -> dict[str, np.ndarray]:
  """Lengths and token counts of a split written without them: read every record, once."""
  logging.warning(
      'The dataset in %s has no per-document lengths (written before they were stored); '
      'reading the whole %r split to count them. Rebuild it (`python -m data_pipeline '
      '--config=<its data config> --workdir=%s`) to skip this.',
      dataset_dir(data_workdir), split, data_workdir)
  source = data_source(data_workdir, split)
  lengths, counter = np.zeros(len(source), np.int64), _TokenCounter()
  for i in range(len(source)):
    tokens = source[i]['tokens']
    lengths[i] = len(tokens)
    counter.add(tokens)
  return {LENGTHS: lengths, TOKEN_COUNTS: counter.flush()}


def layout(data_workdir: str) -> tuple[str, tuple[str, ...]]:
  """(framing, extra per-token fields) of the dataset; ('document', ()) if not recorded."""
  metadata = _builder(data_workdir).info.metadata or {}
  return metadata.get('framing', 'document'), tuple(metadata.get('fields', ()))


def split_names(data_workdir: str) -> tuple[str, ...]:
  """The dataset's splits, sorted."""
  return tuple(sorted(_builder(data_workdir).info.splits))


def document_lengths(data_workdir: str, split: str) -> np.ndarray:
  """Tokens per document of `split` (without bos/eos), in record order, as int64."""
  return _split_array(data_workdir, split, LENGTHS)


def token_counts(data_workdir: str, split: str) -> np.ndarray:
  """How often each token id occurs in `split` (index = id; as long as the largest id + 1)."""
  return _split_array(data_workdir, split, TOKEN_COUNTS)
