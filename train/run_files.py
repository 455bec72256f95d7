"""A run workdir's own files, and the checks made before any of them is written.

A start that is refused must change no file of the run. So a stage:
  1. checks the workdir (`check_workdir`) and the config, before anything;
  2. reads the data's tokenizer and fingerprint (`data_fingerprint`) and, when
     the workdir already holds a checkpoint, refuses to resume on data or a
     tokenizer other than the ones the run started with (`check_same_data`);
  3. restores (or initialises) its state, which checks the checkpoint's tree;
  4. only then writes `config.json`, `tokenizer.model` and `data.json`
     (`record_start`).

`data.json` records the tokenizer's SHA-256 and the prepared dataset's
per-split statistics and shard files, so rebuilding the data under a run
(a new tokenizer of the same vocabulary size, say) is caught on resume.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from configs.cli import UserError
from train import paths

CONFIG_FILE = 'config.json'
DATA_FILE = 'data.json'
TOKENIZER_FILE = 'tokenizer.model'
CHECKPOINT_DIR = 'checkpoints'
# The repository's packages: a workdir inside one would write runs into the source.
SOURCE_PACKAGES = ('configs', 'data_pipeline', 'model', 'train', 'launch', 'benchmarks', 'tests')


def _repository_root() -> str | None:
  root = epath.Path(__file__).resolve().parent.parent
  return os.fspath(root) if (root / 'setup.py').exists() else None


def _gcs_available() -> bool:
  """Whether etils.epath can reach gs:// here (gcsfs, or TensorFlow's gfile)."""
  if importlib.util.find_spec('tensorflow') is not None:
    return True
  import fsspec  # pylint: disable=g-import-not-at-top
  try:
    fsspec.get_filesystem_class('gs')
  except (ImportError, ValueError):
    return False
  return True


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.normpath(path), os.path.normpath(folder)
  return path == folder or path.startswith(folder + os.sep)


def check_workdir(workdir: str | None, data_workdir: str | None = None) -> str:
  """The resolved workdir, or a UserError: empty, a file, the data, or the source tree."""
  if workdir is None or not str(workdir).strip():
    raise UserError('--workdir is empty; give the run directory, e.g. --workdir=runs/tiny.')
  resolved = paths.resolve_str(workdir)
  if paths.is_remote(resolved):
    if resolved.startswith('gs://') and not _gcs_available():
      raise UserError(f'--workdir={workdir} is on Cloud Storage, which needs the tpu extra: '
                      "pip install -e '.[tpu]' (it adds gcsfs and google-cloud-storage).")
    return resolved
  if epath.Path(resolved).exists() and not epath.Path(resolved).is_dir():
    raise UserError(f'--workdir={workdir} is an existing file, not a directory.')
  if data_workdir and not paths.is_remote(data_workdir):
    data = paths.resolve_str(data_workdir)
    if _inside(resolved, data) or _inside(data, resolved):
      raise UserError(f'--workdir={workdir} is (or holds, or lies in) the data workdir {data}; '
                      'give the run a directory of its own, e.g. --workdir=runs/tiny.')
  root = _repository_root()
  if root is not None:
    if os.path.normpath(resolved) == os.path.normpath(root):
      raise UserError(f'--workdir={workdir} is the repository itself; use e.g. runs/NAME.')
    for package in SOURCE_PACKAGES:
      if _inside(resolved, os.path.join(root, package)):
        raise UserError(f'--workdir={workdir} is inside the source folder {package}/; use a '
                        'folder of its own, e.g. runs/NAME.')
  return resolved


def has_checkpoint(workdir: str) -> bool:
  """True if `<workdir>/checkpoints` holds a step directory (the run will resume)."""
  directory = epath.Path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    return False
  return any(p.name.isdigit() for p in directory.iterdir())


def read_tokenizer(config: ml_collections.ConfigDict) -> tuple[bytes | None, str | None]:
  """(model bytes, where) of the data's tokenizer, checked against model.vocab_size."""
  source = epath.Path(config.data.workdir) / TOKENIZER_FILE
  if not source.exists():
    logging.warning('No tokenizer at %s; generate/evaluate will need one.', source)
    return None, None
  from data_pipeline import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  # SentencePiece reads only local files; the bytes through epath work for gs:// too.
  model_bytes = source.read_bytes()
  vocab_size = tokenizer_lib.Tokenizer.from_bytes(model_bytes, os.fspath(source)).vocab_size
  if vocab_size != config.model.vocab_size:
    raise UserError(
        f'Tokenizer {source} has {vocab_size} pieces but model.vocab_size is '
        f'{config.model.vocab_size}; they must be equal: set '
        f'--config.model.vocab_size={vocab_size} or use data made with that vocabulary.')
  return model_bytes, os.fspath(source)


def data_fingerprint(data_workdir: str, tokenizer_bytes: bytes | None) -> dict[str, Any]:
  """What identifies the data a run trains on: tokenizer hash, split stats, shard files."""
  from data_pipeline import shards  # pylint: disable=g-import-not-at-top
  splits = {}
  directory = epath.Path(shards.dataset_dir(data_workdir))
  for split in ('train', 'validation', 'test'):
    try:
      splits[split] = shards.split_stats(data_workdir, split)
    except (ValueError, FileNotFoundError):   # no such split, or no dataset written here
      continue
  files = sorted((p.name, p.stat().length) for p in directory.iterdir()
                 if '.array_record-' in p.name) if directory.is_dir() else []
  return {
      'tokenizer_sha256': hashlib.sha256(tokenizer_bytes).hexdigest() if tokenizer_bytes else None,
      'splits': splits,
      'shards_sha256': hashlib.sha256(json.dumps(files).encode()).hexdigest(),
  }


def check_same_data(workdir: str, fingerprint: dict[str, Any]) -> None:
  """Refuses to resume on other data or another tokenizer than the run recorded."""
  path = epath.Path(workdir) / DATA_FILE
  if path.exists():
    recorded = json.loads(path.read_text())
  else:   # a run from before data.json: its tokenizer copy is all there is to compare
    copy = epath.Path(workdir) / TOKENIZER_FILE
    if not copy.exists():
      return
    recorded = dict(fingerprint, tokenizer_sha256=hashlib.sha256(copy.read_bytes()).hexdigest())
  changed = []
  if recorded.get('tokenizer_sha256') != fingerprint['tokenizer_sha256']:
    changed.append(f'the tokenizer (sha256 {str(recorded.get("tokenizer_sha256"))[:12]} when the '
                   f'run started, {str(fingerprint["tokenizer_sha256"])[:12]} now)')
  if recorded.get('splits') != fingerprint['splits']:
    changed.append(f'the dataset\'s splits ({recorded.get("splits")} when the run started, '
                   f'{fingerprint["splits"]} now)')
  elif recorded.get('shards_sha256') != fingerprint['shards_sha256']:
    changed.append('the dataset\'s shard files')
  if changed:
    raise UserError(
        f'{workdir} was trained on other data: {"; ".join(changed)} changed in the data workdir '
        'since the run started. Resume with the data it started with, or start a new workdir.')


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`<workdir>/config.json`; a changed config on resume is kept as config.<n>.json."""
  workdir = epath.Path(workdir)
  path = workdir / CONFIG_FILE
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if jax.process_index() != 0:
    return
  if path.exists():
    previous = path.read_text()
    if previous != text:
      n = 1
      while (workdir / f'config.{n}.json').exists():
        n += 1
      path.replace(workdir / f'config.{n}.json')
      logging.warning('The config differs from the run\'s previous one, kept as config.%d.json', n)
  paths.write_text_atomic(path, text)


def record_start(config: ml_collections.ConfigDict, workdir: str,
                 tokenizer: tuple[bytes | None, str | None],
                 fingerprint: dict[str, Any]) -> None:
  """Writes config.json, the tokenizer copy and data.json (process 0); call after restore."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  write_config(config, workdir)
  if jax.process_index() != 0:
    return
  model_bytes, source = tokenizer
  target = epath.Path(workdir) / TOKENIZER_FILE
  if model_bytes is not None and (not target.exists() or target.read_bytes() != model_bytes):
    target.write_bytes(model_bytes)
    vocab = epath.Path(source).with_suffix('.vocab')
    if vocab.exists():
      target.with_suffix('.vocab').write_bytes(vocab.read_bytes())
  data_path = epath.Path(workdir) / DATA_FILE
  if not data_path.exists():
    paths.write_text_atomic(data_path, json.dumps(fingerprint, indent=2, sort_keys=True))
