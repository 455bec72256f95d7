"""What a source reads, as a fingerprint: the files, their sizes, times and hashes.

A finished workdir records the fingerprint of its inputs in DONE; a later run
compares it with the inputs as they are now and names what changed, so a
dataset is never reused after its inputs were edited in place.

Each file the source would read (or count as skipped) is listed with its size
and modification time, and with a BLAKE2b hash of its content when the inputs
are small enough to hash cheaply (HASH_LIMIT_BYTES in all; hashing runs at
about 400 MB/s from the page cache: the 1,790 files / 31.5 MB of the stdlib
corpus take 0.1 s with hashes, 0.01 s without). A file whose hash is unchanged
is unchanged even if it was touched; without hashes, a new modification time
counts as a change.

TFDS inputs are the files of the prepared dataset's folder under its data_dir.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Any, Iterable

import ml_collections

from configs.cli import UserError
from data_pipeline import sources

VERSION = 1
HASH_LIMIT_BYTES = 2**30  # Above this (seconds of hashing), sizes and times only.
_CHUNK = 1 << 20


def _hash(path: str) -> str:
  digest = hashlib.blake2b(digest_size=16)
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def source_files(config: ml_collections.ConfigDict) -> list[str]:
  """The files the `source` config block reads, as the pipeline will name them."""
  if config.kind == 'stdlib':
    return list(sources.stdlib_files(config.get('stdlib_dir') or None))
  if config.kind == 'files':
    return sources.expand_paths(config.paths)
  if config.kind == 'tfds':
    data_dir = os.path.expanduser(config.tfds_data_dir or '~/tensorflow_datasets')
    folder = os.path.join(data_dir, config.tfds_name.split(':')[0].split('/')[0])
    if not config.tfds_name or not os.path.isdir(folder):
      return []  # The source itself reports the missing dataset.
    return [os.path.join(d, f) for d, _, names in sorted(os.walk(folder)) for f in sorted(names)]
  raise UserError(
      f"Unknown source.kind {config.kind!r}; expected 'stdlib', 'files' or 'tfds'.")


def fingerprint(paths: Iterable[str], hash_limit: int = HASH_LIMIT_BYTES) -> dict[str, Any]:
  """{'version', 'hashed', 'files': {path: {size, mtime_ns[, blake2b]} or {skipped}}}."""
  files: dict[str, dict[str, Any]] = {}
  for path in paths:
    try:
      info = os.stat(path)
    except OSError as e:
      files[path] = {'skipped': e.strerror or 'unreadable'}
      continue
    if not stat.S_ISREG(info.st_mode):  # Never opened: a FIFO would block.
      files[path] = {'skipped': 'not_a_regular_file'}
      continue
    files[path] = {'size': info.st_size, 'mtime_ns': info.st_mtime_ns}
  total = sum(f.get('size', 0) for f in files.values())
  hashed = total <= hash_limit
  if hashed:
    for path, entry in files.items():
      if 'size' in entry:
        try:
          entry['blake2b'] = _hash(path)
        except OSError as e:  # The source counts it as unreadable; so does this.
          files[path] = {'skipped': e.strerror or 'unreadable'}
  return {'version': VERSION, 'hashed': hashed, 'files': files}


def _change(old: dict[str, Any], new: dict[str, Any]) -> str | None:
  """How one file's entry changed, or None if it did not."""
  if old.get('skipped') != new.get('skipped'):
    return f'was {old.get("skipped") or "a file"}, now {new.get("skipped") or "a file"}'
  if old.get('size') != new.get('size'):
    return f'size {old.get("size")} -> {new.get("size")} bytes'
  if 'blake2b' in old and 'blake2b' in new:
    return None if old['blake2b'] == new['blake2b'] else 'content changed'
  if old.get('mtime_ns') != new.get('mtime_ns'):
    return 'modified (new modification time)'
  return None


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """What changed between two fingerprints, one phrase per file."""
  before, after = old.get('files', {}), new.get('files', {})
  out = [f'{path}: new file' for path in sorted(set(after) - set(before))]
  out += [f'{path}: gone' for path in sorted(set(before) - set(after))]
  for path in sorted(set(before) & set(after)):
    change = _change(before[path], after[path])
    if change:
      out.append(f'{path}: {change}')
  return out
