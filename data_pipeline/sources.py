"""Where documents come from: the embedded corpus, local files, TFDS.

Every source yields `Document(id, text, source)` with an id that stays the same
when the corpus grows (the split is a hash of it):

  stdlib:json/decoder.py          a standard-library module
  pydoc:topics/assert             one topic of the reference prose in pydoc_data
  file:notes/a.txt                a text file (.txt .text .md .rst: one document per file)
  file:data/web.jsonl#17          line 17 of a .jsonl file (or #<id> with id_field)
  file:data/web.parquet#3         row 3 of a .parquet file (or #<id> with id_field)
  tfds:c4/train#12                record 12 of a TFDS split

Input that cannot be a document (bytes that are not UTF-8, empty or binary
files, malformed .jsonl lines, files of another type, FIFOs and other
non-regular files, broken or looping links) is skipped: the reason is counted
in `skipped` and the file / line is named in a warning (and, with `Skipped`,
in the report), so nothing is lost silently. Mistakes in the config (a path
that matches nothing, a missing column) are a `UserError`.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import errno
import fnmatch
import glob
import json
import logging
import os
import stat
import sysconfig
from typing import Iterator, Sequence

import ml_collections

from configs import cli
from configs.cli import UserError

# Read as one plain-text document per file unless source.text_suffixes says
# otherwise; .jsonl and .parquet are records. Suffixes match in any case.
TEXT_SUFFIXES = ('.txt', '.text', '.md', '.rst')
# Reasons kept in the report with the place they happened, up to this many.
MAX_SKIP_EXAMPLES = 100
# pydoc_data/topics.py is one dict literal of reference prose; it enters the
# corpus as one document per topic instead of as a single code file.
PYDOC_TOPICS = os.path.join('pydoc_data', 'topics.py')


@dataclasses.dataclass(frozen=True)
class Document:
  id: str
  text: str
  source: str


class Skipped(collections.Counter):
  """Skip reasons counted, and the first MAX_SKIP_EXAMPLES places named for the report."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.examples: list[dict[str, str]] = []


def _skip(skipped: collections.Counter, reason: str, where: str) -> None:
  skipped[reason] += 1
  if isinstance(skipped, Skipped) and len(skipped.examples) < MAX_SKIP_EXAMPLES:
    skipped.examples.append({'where': where, 'reason': reason})
  # Empty files are common and harmless (package __init__.py); keep them quiet.
  log = logging.debug if reason == 'empty_file' else logging.warning
  log('Skipping %s: %s', where, reason)


def _read_bytes(path: str, skipped: collections.Counter) -> bytes | None:
  """The bytes of `path`, or None (counted) if it cannot be read, e.g. no permission."""
  try:
    with open(path, 'rb') as f:
      return f.read()
  except OSError as e:
    _skip(skipped, 'unreadable_file', f'{path} ({e.strerror})')
    return None


def decode_file(path: str, skipped: collections.Counter) -> str | None:
  """Returns the UTF-8 text of `path`, or None (counted) if it is not usable."""
  data = _read_bytes(path, skipped)
  if data is None:
    return None
  if not data.strip():
    _skip(skipped, 'empty_file', path)
    return None
  if b'\x00' in data:
    _skip(skipped, 'binary_file', path)
    return None
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    _skip(skipped, 'not_utf8', f'{path} (byte {e.start})')
    return None


# ----------------------------------------------------------------------------
# The embedded corpus: the standard library's sources and pydoc reference text.


def stdlib_root() -> str:
  return sysconfig.get_paths()['stdlib']


def pydoc_topics(path: str) -> dict[str, str]:
  """Reads the `topics = {...}` literal of pydoc_data/topics.py without importing it."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), filename=path)
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == 'topics' for t in node.targets):
      return ast.literal_eval(node.value)
  raise ValueError(f'{path}: no `topics = {{...}}` assignment found.')


def stdlib_files(root: str | None = None) -> Iterator[str]:
  """Every `.py` file under the stdlib (site-packages excluded), in a fixed order."""
  root = root or stdlib_root()
  for dirpath, dirnames, filenames in os.walk(root):
    # site-packages holds third-party code, not the standard library.
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ('site-packages', '__pycache__'))
    for name in sorted(filenames):
      if name.endswith('.py'):
        yield os.path.join(dirpath, name)


def stdlib_documents(skipped: collections.Counter,
                     root: str | None = None) -> Iterator[Document]:
  """Every `.py` file under the stdlib (site-packages excluded) + pydoc topics."""
  root = root or stdlib_root()
  for path in stdlib_files(root):
    rel = os.path.relpath(path, root)
    if rel == PYDOC_TOPICS:
      for topic, text in sorted(pydoc_topics(path).items()):
        if not text.strip():
          _skip(skipped, 'empty_text', f'{path} topic {topic!r}')
          continue
        yield Document(f'pydoc:topics/{topic}', text, 'pydoc')
      continue
    text = decode_file(path, skipped)
    if text is not None:
      yield Document(f'stdlib:{rel.replace(os.sep, "/")}', text, 'stdlib')


# ----------------------------------------------------------------------------
# Local files.


def parse_suffixes(text: str | Sequence[str]) -> tuple[str, ...]:
  """'.txt,.MD' or ['.txt', '.MD'] -> ('.txt', '.md')."""
  items = text.split(',') if isinstance(text, str) else text
  return tuple(s.strip().lower() for s in items if s.strip())


def _walk(top: str, skipped: collections.Counter,
          ancestors: frozenset[str] = frozenset()) -> Iterator[str]:
  """Every non-directory entry under `top`, sorted, following directory links.

  A directory link that leads back into a directory being walked (a link loop)
  is skipped and counted instead of followed forever.
  """
  ancestors = ancestors | {os.path.realpath(top)}
  try:
    entries = sorted(os.scandir(top), key=lambda e: e.name)
  except OSError as e:
    _skip(skipped, 'unreadable_directory', f'{top} ({e.strerror})')
    return
  for entry in entries:
    try:
      is_dir = entry.is_dir()  # Follows links; False for a broken one.
    except OSError:  # A link to itself (ELOOP): file_type names the reason.
      is_dir = False
    if is_dir:
      if entry.is_symlink() and os.path.realpath(entry.path) in ancestors:
        _skip(skipped, 'directory_link_loop', f'{entry.path} -> {os.path.realpath(entry.path)}')
        continue
      yield from _walk(entry.path, skipped, ancestors)
    else:
      yield entry.path


def _matches(parts: Sequence[str], pattern: Sequence[str]) -> bool:
  """Whether path components match glob components, `**` standing for any number."""
  if not pattern:
    return not parts
  if pattern[0] == '**':
    return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
  return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _matches(
      parts[1:], pattern[1:])


def _glob(pattern: str, skipped: collections.Counter) -> list[str]:
  """glob.glob, except that `**` walks with `_walk`: glob's own `**` follows a
  directory link into itself until the path is too long, which takes forever
  when there are two such links."""
  parts = pattern.split(os.sep)
  if '**' not in parts:
    return sorted(glob.glob(pattern))
  cut = parts.index('**')
  base, rest = os.sep.join(parts[:cut]) or os.curdir, parts[cut:]
  found = []
  for top in sorted(glob.glob(base)) if glob.has_magic(base) else [base]:
    if not os.path.isdir(top):
      continue
    for path in _walk(top, skipped):
      if _matches(os.path.relpath(path, top).split(os.sep), rest):
        found.append(path if parts[:cut] else os.path.relpath(path, top))
  return found


def expand_paths(paths: str | Sequence[str],
                 skipped: collections.Counter | None = None) -> list[str]:
  """Every file that a comma-separated string or list of files / dirs / globs names, sorted.

  Directories are walked whole: every entry that is not a directory is
  returned, whatever its type or suffix, so the caller reads or counts each.
  """
  skipped = collections.Counter() if skipped is None else skipped
  if isinstance(paths, str):
    paths = [p for p in paths.split(',')]
  paths = [p.strip() for p in paths if p and p.strip()]
  if not paths:
    raise UserError('source.paths is empty: give files, directories or globs, '
                    'e.g. --config.source.paths=data/*.jsonl')
  found = []
  for pattern in paths:
    matches = _glob(pattern, skipped)
    if not matches:
      raise UserError(f'source.paths entry {pattern!r} matches no file.')
    for match in matches:
      if os.path.isdir(match):
        found.extend(_walk(match, skipped))
      else:
        found.append(match)
  return sorted(dict.fromkeys(found))


def file_type(path: str, text_suffixes: Sequence[str] = TEXT_SUFFIXES) -> tuple[str, str]:
  """('text' | 'jsonl' | 'parquet', '') for a file we read, else ('', skip reason).

  Only regular files are opened: a FIFO would block the pipeline forever.
  """
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    reasons = {errno.ELOOP: 'symlink_loop', errno.ENOENT: 'broken_symlink'}
    return '', reasons.get(e.errno, 'unreadable_file')
  if not stat.S_ISREG(mode):
    return '', 'not_a_regular_file'
  lower = path.lower()
  # The configured text suffixes come first: the config has the last word.
  if lower.endswith(tuple(text_suffixes)):
    return 'text', ''
  if lower.endswith('.jsonl'):
    return 'jsonl', ''
  if lower.endswith('.parquet'):
    return 'parquet', ''
  return '', 'unsupported_file_type'


def txt_documents(path: str, skipped: collections.Counter) -> Iterator[Document]:
  text = decode_file(path, skipped)
  if text is not None:
    yield Document(f'file:{path}', text, 'file')


def _record_text(record: object, text_field: str) -> tuple[str | None, str]:
  """The text of one record, or (None, reason)."""
  if not isinstance(record, dict) or text_field not in record:
    return None, 'missing_text_field'
  value = record[text_field]
  if isinstance(value, bytes):
    try:
      value = value.decode('utf-8')
    except UnicodeDecodeError:
      return None, 'not_utf8'
  if not isinstance(value, str):
    return None, 'text_not_a_string'
  if not value.strip():
    return None, 'empty_text'
  return value, ''


def _record_id(record: dict, id_field: str, fallback: object) -> str:
  if id_field and record.get(id_field) is not None:
    value = record[id_field]
    return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)
  return str(fallback)


def jsonl_documents(path: str, skipped: collections.Counter, text_field: str,
                    id_field: str = '') -> Iterator[Document]:
  """One document per line; bad lines are skipped and counted, never fatal."""
  data = _read_bytes(path, skipped)
  if data is None:
    return
  if not data.strip():
    _skip(skipped, 'empty_file', path)
    return
  for lineno, raw in enumerate(data.split(b'\n'), start=1):
    where = f'{path}:{lineno}'
    if not raw.strip():
      continue  # Blank lines separate nothing in JSON Lines; not a record.
    try:
      line = raw.decode('utf-8')
    except UnicodeDecodeError:
      _skip(skipped, 'not_utf8', where)
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      _skip(skipped, 'bad_json', where)
      continue
    text, reason = _record_text(record, text_field)
    if text is None:
      _skip(skipped, reason, f'{where} (field {text_field!r})')
      continue
    yield Document(f'file:{path}#{_record_id(record, id_field, lineno)}', text, 'file')


def parquet_documents(path: str, skipped: collections.Counter, text_field: str,
                      id_field: str = '') -> Iterator[Document]:
  import pyarrow as pa  # Only needed for parquet input.
  import pyarrow.parquet as pq
  try:
    parquet = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:  # E.g. a text file named .parquet.
    _skip(skipped, 'not_parquet', f'{path} ({cli.one_line(e)})')
    return
  names = parquet.schema_arrow.names
  if text_field not in names:
    raise UserError(f'{path}: no column {text_field!r} (columns: {names}); '
                    'set --config.source.text_field.')
  columns = [text_field] + ([id_field] if id_field and id_field in names else [])
  row = 0
  for batch in parquet.iter_batches(columns=columns):
    for record in batch.to_pylist():
      text, reason = _record_text(record, text_field)
      if text is None:
        _skip(skipped, reason, f'{path} row {row}')
      else:
        yield Document(f'file:{path}#{_record_id(record, id_field, row)}', text, 'file')
      row += 1


def file_documents(paths: str | Sequence[str], skipped: collections.Counter,
                   text_field: str = 'text', id_field: str = '',
                   text_suffixes: Sequence[str] = TEXT_SUFFIXES) -> Iterator[Document]:
  """Documents of every file `paths` names; each other file is counted in `skipped`."""
  text_suffixes = parse_suffixes(text_suffixes)
  for path in expand_paths(paths, skipped):
    kind, reason = file_type(path, text_suffixes)
    if kind == 'text':
      yield from txt_documents(path, skipped)
    elif kind == 'jsonl':
      yield from jsonl_documents(path, skipped, text_field, id_field)
    elif kind == 'parquet':
      yield from parquet_documents(path, skipped, text_field, id_field)
    elif reason == 'unsupported_file_type':
      _skip(skipped, reason, f'{path} (read: {", ".join(text_suffixes)}, .jsonl, .parquet)')
    else:
      _skip(skipped, reason, path)


# ----------------------------------------------------------------------------
# TFDS.


def tfds_documents(name: str, split: str, skipped: collections.Counter,
                   data_dir: str | None = None, text_feature: str = 'text',
                   id_feature: str = '') -> Iterator[Document]:
  """Records of a prepared TFDS dataset (array_record or parquet format)."""
  import tensorflow_datasets as tfds  # Only needed for this source.
  data_dir = data_dir or None
  where = f'TFDS dataset {name!r} (data_dir={data_dir or "default ~/tensorflow_datasets"})'
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # Unknown names list every dataset; keep one line.
    raise UserError(f'{where}: cannot load the builder: {str(e).splitlines()[0]}') from None
  if not builder.is_prepared():
    raise UserError(
        f'{where} is not prepared; prepare it first (e.g. `tfds build {name} '
        f'--data_dir=... --file_format=array_record`) or set source.tfds_data_dir.')
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:
    raise UserError(f'{where} split {split!r}: {str(e).splitlines()[0]}') from None
  for index in range(len(source)):
    record = source[index]
    text, reason = _record_text(record, text_feature)
    if text is None:
      _skip(skipped, reason, f'{where} split {split!r} record {index} (feature {text_feature!r})')
      continue
    doc_id = _record_id(record, id_feature, index)
    yield Document(f'tfds:{name}/{split}#{doc_id}', text, 'tfds')


def iter_documents(config: ml_collections.ConfigDict,
                   skipped: collections.Counter) -> Iterator[Document]:
  """Documents of the source that `config` (the `source` block) names."""
  if config.kind == 'stdlib':
    root = config.get('stdlib_dir') or None
    if root and not os.path.isdir(root):
      raise UserError(f'source.stdlib_dir {root!r} is not a directory.')
    return stdlib_documents(skipped, root)
  if config.kind == 'files':
    return file_documents(config.paths, skipped, config.text_field, config.id_field,
                          parse_suffixes(config.get('text_suffixes', TEXT_SUFFIXES)))
  if config.kind == 'tfds':
    if not config.tfds_name:
      raise UserError('source.tfds_name is empty; e.g. --config.source.tfds_name=c4')
    return tfds_documents(config.tfds_name, config.tfds_split, skipped,
                          config.tfds_data_dir, config.text_field, config.id_field)
  raise UserError(f"Unknown source.kind {config.kind!r}; expected 'stdlib', 'files' or 'tfds'.")
