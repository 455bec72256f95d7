"""Shards: the array_record dataset round-trips per split (no TensorFlow), lengths and counts too."""

from __future__ import annotations

import collections
import json
import logging
import os
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipeline import shards


def _records(n: int, seed: int, prefix: str) -> list[tuple[str, list[int], int]]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    tokens = rng.integers(0, 50_000, size=int(rng.integers(0, 300))).tolist()
    out.append((f'{prefix}/{i}', tokens, int(rng.integers(0, 10_000))))
  return out


def _read(source) -> list[tuple[str, list[int], int]]:
  out = []
  for i in range(len(source)):
    record = source[i]
    assert record['tokens'].dtype == np.int32
    out.append((record['id'].decode('utf-8'), record['tokens'].tolist(),
                int(record['num_bytes'])))
  return out


def test_round_trip_per_split(tmp_path):
  splits = {'train': _records(50, 0, 'tr'), 'validation': _records(7, 1, 'va'),
            'test': _records(5, 2, 'te')}
  # Any iterable works, including a generator, and numpy token arrays.
  gen = ((i, np.asarray(t, np.int32), b) for i, t, b in splits['validation'])
  stats = shards.write_dataset(str(tmp_path), {
      'train': splits['train'], 'validation': gen, 'test': iter(splits['test'])})
  for split, records in splits.items():
    assert stats[split] == {
        'documents': len(records),
        'tokens': sum(len(t) for _, t, _ in records),
        'bytes': sum(b for _, _, b in records)}
    assert shards.split_stats(str(tmp_path), split) == stats[split]
    # Readable by name through TFDS, and through the builder directory.
    by_name = tfds.data_source(shards.DATASET_NAME, data_dir=str(tmp_path / 'tfds'), split=split)
    assert _read(by_name) == records
    assert _read(shards.data_source(str(tmp_path), split)) == records
  builder = tfds.builder_from_directory(shards.dataset_dir(str(tmp_path)))
  assert builder.info.name == 'strata_corpus' and str(builder.info.version) == '1.0.0'
  assert builder.info.file_format.value == 'array_record'
  assert 'tensorflow' not in sys.modules


def test_many_shards_keep_order(tmp_path):
  records = _records(40, 3, 'doc')
  shards.write_dataset(str(tmp_path), {'train': records}, max_shard_bytes=2000)
  files = [f for f in os.listdir(shards.dataset_dir(str(tmp_path))) if 'train.array_record' in f]
  assert len(files) > 3
  assert all(f.endswith(f'-of-{len(files):05d}') for f in files)
  assert _read(shards.data_source(str(tmp_path), 'train')) == records


def test_empty_split_and_rewrite(tmp_path):
  shards.write_dataset(str(tmp_path), {'train': _records(5, 4, 'old'), 'test': []})
  assert len(shards.data_source(str(tmp_path), 'test')) == 0
  assert shards.split_stats(str(tmp_path), 'test') == {'documents': 0, 'tokens': 0, 'bytes': 0}
  new = _records(3, 5, 'new')
  shards.write_dataset(str(tmp_path), {'train': new})
  assert _read(shards.data_source(str(tmp_path), 'train')) == new
  with pytest.raises(ValueError, match="split 'test' not in"):
    shards.data_source(str(tmp_path), 'test')


def test_bad_records_name_the_record(tmp_path):
  with pytest.raises(ValueError, match=r"split 'train' record 1 \(id 'b'\): token ids out of int32"):
    shards.write_dataset(str(tmp_path), {'train': [('a', [1], 1), ('b', [-5], 1)]})
  with pytest.raises(ValueError, match=r"split 'train' record 0 .*flat list of ints"):
    shards.write_dataset(str(tmp_path), {'train': [('a', [[1, 2]], 1)]})
  with pytest.raises(ValueError, match=r"record 0: expected \(id, tokens, num_bytes\)"):
    shards.write_dataset(str(tmp_path), {'train': ['oops']})
  with pytest.raises(FileNotFoundError, match='no strata_corpus dataset'):
    shards.data_source(str(tmp_path / 'nowhere'), 'train')


def test_lengths_and_token_counts_match_the_records(tmp_path):
  splits = {'train': _records(30, 6, 'tr'), 'test': _records(4, 7, 'te'), 'validation': []}
  shards.write_dataset(str(tmp_path), splits, max_shard_bytes=3000)
  for split, records in splits.items():
    source = shards.data_source(str(tmp_path), split)
    lengths = shards.document_lengths(str(tmp_path), split)
    assert lengths.tolist() == [len(source[i]['tokens']) for i in range(len(source))]
    assert lengths.tolist() == [len(t) for _, t, _ in records]
    counts = shards.token_counts(str(tmp_path), split)
    expected = collections.Counter(t for _, tokens, _ in records for t in tokens)
    assert {i: int(c) for i, c in enumerate(counts) if c} == dict(expected)


def test_dataset_without_lengths_is_counted_once(tmp_path, caplog):
  records = _records(6, 8, 'old')
  shards.write_dataset(str(tmp_path), {'train': records})
  # As written before the lengths existed: no files, no mention in the metadata.
  directory = shards.dataset_dir(str(tmp_path))
  for name in os.listdir(directory):
    if name.endswith('.npy'):
      os.remove(os.path.join(directory, name))
  with open(os.path.join(directory, 'metadata.json')) as f:
    metadata = json.load(f)
  del metadata['split_files']
  with open(os.path.join(directory, 'metadata.json'), 'w') as f:
    json.dump(metadata, f)
  with caplog.at_level(logging.WARNING):
    assert shards.document_lengths(str(tmp_path), 'train').tolist() == [
        len(t) for _, t, _ in records]
    assert shards.token_counts(str(tmp_path), 'train').sum() == sum(len(t) for _, t, _ in records)
  assert sum('has no per-document lengths' in r.message for r in caplog.records) == 1
