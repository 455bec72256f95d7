"""Instruction data: user JSONL in three formats, cleaned, split and rendered.

A record is one JSON object per line, in one of three formats:

  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  {"prompt": str, "completion": str}
  {"instruction": str, "input": str (optional, may be empty), "output": str}

The last two become a user turn and an assistant turn (`input`, when given,
follows the instruction after a blank line). Every conversation must follow
the rules of `data_pipeline.chat`. A record that cannot be used (bad JSON,
not UTF-8, wrong types, missing fields, unknown role, empty assistant turn,
control-token text, ...) is skipped: its reason is counted and its
`path:line` listed in the report, so nothing is dropped silently.

Every kept example then goes through the same steps, whatever its source
(`build_records`): the cleaning of pre-training text that applies to a conversation
(unicode normalisation and PII scrubbing of every content; the per-document
quality filters do not apply, a two-word answer is fine here), exact
deduplication, the split by a keyed hash of its document id
(`data_pipeline.split`, as for pre-training), rendering with the chat
template and a length filter (the rendered conversation, BOS included, must
fit `seq_len`, so no example is ever cut).

Records: {'id', 'split', 'messages', 'tokens' (int32), 'loss_mask' (uint8)}
plus source fields. `tokens` already start with BOS and end at the last
`<|end|>\n`: whatever packs them must not add a BOS of its own (the
pre-training loader wraps each document in BOS ... EOS; for these records
that would be the double BOS the template exists to prevent), and any token
it appends gets loss mask 0. The report (`write_report` -> sft_report.json) counts
candidates, skipped by reason (they add up: candidates = kept + skipped),
PII replacements and examples / tokens / loss tokens per split.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from configs.cli import UserError
from data_pipeline import chat
from data_pipeline import clean
from data_pipeline import dedup
from data_pipeline import report as report_lib
from data_pipeline import sources
from data_pipeline import split as split_lib

REPORT = 'sft_report.json'
DONE = 'DONE'  # written last into a data workdir, with the settings it was built with
MAX_LISTED = 20  # Skipped records named per reason in the report; all are counted.

Record = dict[str, Any]


# ----------------------------------------------------------------------------
# Formats.


def _string_field(record: dict, key: str, *, optional: bool = False) -> str:
  if key not in record or (optional and record[key] is None):
    if optional:
      return ''
    raise chat.ChatFormatError('missing_field', f'no {key!r} field')
  value = record[key]
  if not isinstance(value, str):
    raise chat.ChatFormatError('wrong_type', f'{key!r} is a {type(value).__name__}, not a string')
  return value


def record_messages(record: Any) -> list[chat.Message]:
  """The conversation of one JSONL record in any of the three formats (validated)."""
  if not isinstance(record, dict):
    raise chat.ChatFormatError('wrong_type',
                               f'a record is a JSON object, got {type(record).__name__}')
  formats = [name for name, key in (('messages', 'messages'), ('prompt/completion', 'prompt'),
                                    ('instruction/output', 'instruction')) if key in record]
  if len(formats) > 1:
    raise chat.ChatFormatError('ambiguous_format', f'fields of several formats: {formats}')
  if 'messages' in record:
    messages = record['messages']
  elif 'prompt' in record or 'completion' in record:
    messages = [{'role': chat.USER, 'content': _string_field(record, 'prompt')},
                {'role': chat.ASSISTANT, 'content': _string_field(record, 'completion')}]
  elif 'instruction' in record or 'output' in record:
    request = _string_field(record, 'instruction')
    extra = _string_field(record, 'input', optional=True)
    if extra.strip():
      request = f'{request}\n\n{extra}'
    messages = [{'role': chat.USER, 'content': request},
                {'role': chat.ASSISTANT, 'content': _string_field(record, 'output')}]
  else:
    raise chat.ChatFormatError(
        'unknown_format', f"no 'messages', 'prompt'/'completion' or 'instruction'/'output' "
        f'field (fields: {sorted(record)[:8]})')
  return chat.validate(messages)


# ----------------------------------------------------------------------------
# The report.


@dataclasses.dataclass
class Report:
  """Counts of one instruction build; `to_dict` is the content of sft_report.json.

  `candidates` are what could have become an example (a non-blank JSONL line,
  a file that is not .jsonl, a stdlib function definition); each is either
  kept or skipped with one reason, so kept + sum(skipped) == candidates.
  `skipped_examples` names the first MAX_LISTED skips of each reason as
  `where: detail`; with `log_skips` every skip is also a logged warning.
  """
  source: str
  seq_len: int
  validation: float
  test: float
  candidates: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped_examples: dict[str, list[str]] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(list))
  log_skips: bool = False
  pii_replacements: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples_changed_by_cleaning: int = 0
  splits: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  details: dict[str, Any] = dataclasses.field(default_factory=dict)
  started: float = dataclasses.field(default_factory=time.time)

  def skip(self, reason: str, where: str, message: str = '') -> None:
    self.skipped[reason] += 1
    listed = self.skipped_examples[reason]
    if len(listed) < MAX_LISTED:
      listed.append(f'{where}: {message}' if message else where)
    if self.log_skips:
      logging.warning('Skipping %s: %s%s', where, reason, f' ({message})' if message else '')

  def to_dict(self) -> dict[str, Any]:
    kept = sum(s['examples'] for s in self.splits.values())
    return {
        'source': self.source,
        'seq_len': self.seq_len,
        'split_fractions': {'validation': self.validation, 'test': self.test},
        'candidates': self.candidates,
        'kept': kept,
        'skipped': dict(sorted(self.skipped.items())),
        'skipped_total': sum(self.skipped.values()),
        'skipped_examples': dict(sorted(self.skipped_examples.items())),
        'pii_replacements': dict(sorted(self.pii_replacements.items())),
        'examples_changed_by_cleaning': self.examples_changed_by_cleaning,
        'splits': self.splits,
        **self.details,
        'seconds': round(time.time() - self.started, 2),
    }


def finished_report(workdir: str, settings: dict[str, Any], what: str,
                    report_name: str = REPORT) -> dict[str, Any] | None:
  """The report of data already built in `workdir` with these `settings`; None if not built.

  Data built there with other settings is a UserError naming what changed
  (`what`: 'SFT data', 'preference data'), so a run never trains on stale data.
  """
  done = os.path.join(workdir, DONE)
  if not os.path.exists(done):
    return None
  with open(done) as f:
    built = json.load(f).get('settings', {})
  changed = [f'{k}: {built.get(k)!r} -> {v!r}' for k, v in settings.items()
             if built.get(k) != v]
  if changed:
    raise UserError(f'{workdir} holds {what} built with other settings ({"; ".join(changed)})'
                    '; use another data.workdir or delete it.')
  with open(os.path.join(workdir, report_name)) as f:
    return json.load(f)


def mark_finished(workdir: str, settings: dict[str, Any]) -> None:
  """Writes DONE, last: the data in `workdir` is complete and was built with `settings`."""
  with open(os.path.join(workdir, DONE), 'w') as f:
    json.dump({'finished': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'settings': settings}, f)


def write_report(report: dict[str, Any], output_dir: str) -> str:
  """Writes `report` as `<output_dir>/sft_report.json`; returns the path."""
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, REPORT)
  report_lib.write(report, path)
  return path


# ----------------------------------------------------------------------------
# The steps every example goes through.


@dataclasses.dataclass
class Candidate:
  """An example before cleaning: `doc_id` decides its split, `where` names it in messages."""
  id: str
  doc_id: str
  where: str
  messages: list[chat.Message]
  fields: dict[str, Any] = dataclasses.field(default_factory=dict)


def _clean_messages(messages: list[chat.Message], normalization: str, scrub_pii: bool,
                    pii: collections.Counter) -> list[chat.Message]:
  out = []
  for message in messages:
    text = message['content']
    if normalization:
      text = unicodedata.normalize(normalization, text)
    if scrub_pii:
      text = clean.scrub_pii(text, pii)
    out.append({'role': message['role'], 'content': text})
  return out


def _whole_conversation(messages: list[chat.Message]) -> str:
  return '\n'.join(f'{m["role"]}\x00{m["content"]}' for m in messages)


def build_records(candidates: Iterable[Candidate], tokenizer: chat.ChatTokenizer, seq_len: int,
           report: Report, *, normalization: str = 'NFC', scrub_pii: bool = True,
           dedup_text: Callable[[list[chat.Message]], str] = _whole_conversation,
           ) -> dict[str, list[Record]]:
  """Clean, split, dedup, render and length-filter `candidates`; records per split.

  Exact duplicates (same `dedup_text`, whitespace runs collapsed as in
  pre-training's exact dedup) keep one copy, preferring a train copy: a
  held-out example then never has an identical twin in train.
  """
  if seq_len < 2:
    raise UserError(f'seq_len={seq_len} is too small for a conversation.')
  cleaned = []
  for c in candidates:
    messages = _clean_messages(c.messages, normalization, scrub_pii, report.pii_replacements)
    if messages != c.messages:
      report.examples_changed_by_cleaning += 1
    try:
      chat.validate(messages)  # Cleaning could, in principle, empty a turn.
    except chat.ChatFormatError as e:
      report.skip(e.reason, c.where, e.detail)
      continue
    split = split_lib.assign_split(c.doc_id, report.validation, report.test)
    cleaned.append((c, messages, split))

  rank = {name: k for k, name in enumerate(split_lib.SPLITS)}  # train first
  first: dict[bytes, str] = {}
  duplicates = set()
  for c, messages, split in sorted(cleaned, key=lambda x: (rank[x[2]], x[0].id)):
    key = dedup.normalized_hash(dedup_text(messages))
    if key in first:
      duplicates.add(c.id)
      report.skip('duplicate', c.where, f'duplicate of {first[key]}')
    else:
      first[key] = c.id

  out: dict[str, list[Record]] = {name: [] for name in split_lib.SPLITS}
  for c, messages, split in cleaned:
    if c.id in duplicates:
      continue
    tokens, mask = chat.render_conversation(tokenizer, messages)
    if len(tokens) > seq_len:
      report.skip('too_long', c.where, f'{len(tokens)} tokens > seq_len={seq_len}')
      continue
    out[split].append({'id': c.id, 'split': split, 'messages': messages,
                       'tokens': tokens, 'loss_mask': mask, **c.fields})
  report.splits = {
      name: {'examples': len(records),
             'tokens': int(sum(len(r['tokens']) for r in records)),
             'loss_tokens': int(sum(int(r['loss_mask'].sum()) for r in records))}
      for name, records in out.items()}
  return out


# ----------------------------------------------------------------------------
# User files.


def jsonl_records(files: Sequence[str], report: Report, what: str
                  ) -> Iterator[tuple[str, int, Any]]:
  """(path, line number, parsed JSON) of every non-blank line of the .jsonl `files`.

  Each line is a candidate in `report`; a file of another type, bytes that are
  not UTF-8 and lines that are not JSON are skipped and counted there with
  their place. `what` names the data in the message for a wrong file type.
  """
  for path in files:
    if not path.endswith('.jsonl'):
      report.candidates += 1
      report.skip('unsupported_file_type', path, f'{what} is read from .jsonl files')
      continue
    with open(path, 'rb') as f:
      data = f.read()
    for lineno, raw in enumerate(data.split(b'\n'), start=1):
      if not raw.strip():
        continue  # A blank line is no record.
      report.candidates += 1
      where = f'{path}:{lineno}'
      try:
        record = json.loads(raw.decode('utf-8'))
      except UnicodeDecodeError as e:
        report.skip('not_utf8', where, f'invalid byte at offset {e.start}')
        continue
      except json.JSONDecodeError as e:
        report.skip('bad_json', where, f'{e.msg} (column {e.colno})')
        continue
      yield path, lineno, record


def _file_candidates(paths: str | Sequence[str], report: Report) -> Iterable[Candidate]:
  files = sources.expand_paths(paths)
  report.details['files'] = len(files)
  for path, lineno, record in jsonl_records(files, report, 'instruction data'):
    where = f'{path}:{lineno}'
    try:
      messages = record_messages(record)
    except chat.ChatFormatError as e:
      report.skip(e.reason, where, e.detail)
      continue
    # The id of pre-training's jsonl source, so one file splits the same way in both.
    doc_id = f'file:{path}#{lineno}'
    yield Candidate(doc_id, doc_id, where, messages, {'where': where})


def read_instruction_files(paths: str | Sequence[str], tokenizer: chat.ChatTokenizer,
                           seq_len: int, *, validation: float = 0.01, test: float = 0.01,
                           normalization: str = 'NFC', scrub_pii: bool = True,
                           ) -> tuple[dict[str, list[Record]], dict[str, Any]]:
  """Instruction records per split from JSONL files (comma-separated, dirs, globs) and the report.

  Raises UserError if no record at all can be used (the message has the counts).
  """
  report = Report('files', seq_len, validation, test, log_skips=True)
  try:
    candidates = list(_file_candidates(paths, report))
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  records = build_records(candidates, tokenizer, seq_len, report,
                   normalization=normalization, scrub_pii=scrub_pii)
  result = report.to_dict()
  if not result['kept']:
    first = next(iter(result['skipped_examples'].items()), ('', []))
    raise UserError(f'No usable instruction record in {paths!r}: {result["candidates"]} '
                    f'read, skipped {result["skipped"]}; e.g. {first[0]} at {first[1][:1]}')
  return records, result
