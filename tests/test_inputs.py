"""inputs: the fingerprint of what a source reads, and what changed between two."""

from __future__ import annotations

import os

import ml_collections

from data_pipeline import inputs


def test_fingerprint_lists_sizes_times_hashes_and_skips(tmp_path):
  (tmp_path / 'a.txt').write_text('alpha')
  os.mkfifo(tmp_path / 'pipe.txt')
  config = ml_collections.ConfigDict({'kind': 'files', 'paths': str(tmp_path)})
  paths = inputs.source_files(config)
  fp = inputs.fingerprint(paths)
  a = fp['files'][str(tmp_path / 'a.txt')]
  assert a['size'] == 5 and a['mtime_ns'] == os.stat(tmp_path / 'a.txt').st_mtime_ns
  assert len(a['blake2b']) == 32 and fp['hashed']
  assert fp['files'][str(tmp_path / 'pipe.txt')] == {'skipped': 'not_a_regular_file'}
  assert 'blake2b' not in inputs.fingerprint(paths, hash_limit=0)['files'][str(tmp_path / 'a.txt')]


def test_differences_name_each_file():
  def entry(size, mtime, digest=None):
    return {'size': size, 'mtime_ns': mtime, **({'blake2b': digest} if digest else {})}

  old = {'files': {'same': entry(1, 1, 'h'), 'touched': entry(1, 1, 'h'),
                   'edited': entry(1, 1, 'h'), 'grown': entry(1, 1), 'stale': entry(1, 1),
                   'gone': entry(1, 1), 'fifo': {'skipped': 'not_a_regular_file'}}}
  new = {'files': {'same': entry(1, 1, 'h'), 'touched': entry(1, 2, 'h'),
                   'edited': entry(1, 1, 'x'), 'grown': entry(2, 1), 'stale': entry(1, 2),
                   'added': entry(1, 1), 'fifo': entry(1, 1)}}
  assert inputs.differences(old, new) == [
      'added: new file', 'gone: gone', 'edited: content changed',
      'fifo: was not_a_regular_file, now a file', 'grown: size 1 -> 2 bytes',
      'stale: modified (new modification time)']
  assert inputs.differences(new, new) == []
