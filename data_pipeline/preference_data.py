"""A preference data workdir: pairs as shards, the pairs as JSONL, a report.

`prepare(workdir, tokenizer_path, ...)` builds, once, from the embedded stdlib
default (`source='stdlib'`) or the user's JSONL files (`source='files'`,
formats in data_pipeline/preferences.py):

  tokenizer.model              the tokenizer the pairs were rendered with (the SFT model's)
  tfds/strata_corpus/...       one document per pair, framing 'sequence', fields
                               `preferences.FIELDS` (layout: data_pipeline/preferences.py)
  pairs_<split>.jsonl          per pair: id, prompt messages, chosen, rejected, margin,
                               kind, function_name (what `train.score --pairs` reads)
  preference_report.json       what was kept, why the rest was dropped, pairs per kind,
                               `kind_names` (what the `kind` field's numbers 1, 2, ... name)
  DONE                         JSON: the settings it was built with

The embedded default: the SFT instruction set (data_pipeline/stdlib_instructions.py,
the same splits by module id, so a held-out function's module was never in
pre-training's or SFT's train split); for each function, one pair per
corruption kind (`preferences.KINDS`) that applies to it: the real function
chosen, the corruption rejected. The renamed and wrong_body kinds take their
other function from the same split, so no held-out pair shows a train function.

User files go through what SFT data goes through (unicode normalisation, PII
scrub, exact dedup of (prompt, chosen, rejected), the split by a keyed hash of
the record's id `file:<path>#<line>`, so all pairs of a ranking share a
split) and a length filter: a pair whose rendered prompt plus longer answer
exceeds `seq_len` is skipped (`too_long`; `prompt_too_long` when the prompt
alone leaves no room), never cut.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
from typing import Any

from configs.cli import UserError
from data_pipeline import chat
from data_pipeline import dedup
from data_pipeline import instructions
from data_pipeline import preferences
from data_pipeline import report as report_lib
from data_pipeline import shards
from data_pipeline import sources
from data_pipeline import split as split_lib
from data_pipeline import stdlib_instructions
from data_pipeline import tokenizer as tokenizer_lib

DONE = instructions.DONE
TOKENIZER = 'tokenizer.model'
REPORT = 'preference_report.json'
SOURCES = ('stdlib', 'files')


def pairs_file(workdir: str, split: str) -> str:
  return os.path.join(workdir, f'pairs_{split}.jsonl')


def _stdlib_pairs(tokenizer, seq_len: int, validation: float, test: float,
                  kinds: tuple[str, ...], report: instructions.Report
                  ) -> dict[str, list[dict[str, Any]]]:
  records, sft_report = stdlib_instructions.build_stdlib_instructions(
      tokenizer, seq_len, validation=validation, test=test)
  report.details['functions'] = {split: len(r) for split, r in records.items()}
  report.details['functions_report'] = {k: sft_report[k] for k in ('candidates', 'kept',
                                                                    'skipped')}
  out = {}
  for split, split_records in records.items():
    answers = [r['messages'][-1]['content'] for r in split_records]
    names = []
    for answer in answers:
      node = preferences._function(answer)  # pylint: disable=protected-access
      names.append(node.name if node is not None else None)
    pairs = []
    for i, record in enumerate(split_records):
      for kind in kinds:
        report.candidates += 1
        key = f'{record["id"]}|{kind}'
        j = i
        if len(split_records) > 1:
          j = (i + 1 + preferences._rng(key).randrange(len(split_records) - 1)) % len(  # pylint: disable=protected-access
              split_records)
        rejected = None
        if names[i] is not None:
          rejected = preferences.corrupt(kind, answers[i], names[i], key, answers[j],
                                         names[j] or names[i])
        if rejected is None:
          report.skip(f'no_{kind}', record['id'])
          continue
        pairs.append({'id': key, 'prompt': record['messages'][:-1], 'chosen': answers[i],
                      'rejected': rejected, 'margin': 0.0, 'kind': kind,
                      'function_name': record.get('function_name')})
    out[split] = pairs
  return out


def _file_pairs(paths: str, validation: float, test: float, report: instructions.Report
                ) -> dict[str, list[dict[str, Any]]]:
  try:
    files = sources.expand_paths(paths)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(str(e)) from None
  out: dict[str, list[dict[str, Any]]] = {name: [] for name in split_lib.SPLITS}
  seen: dict[bytes, str] = {}
  for path, lineno, record in instructions.jsonl_records(files, report, 'preference data'):
    where = f'{path}:{lineno}'
    try:
      pairs = preferences.record_pairs(record)
    except chat.ChatFormatError as e:
      report.skip(e.reason, where, e.detail)
      continue
    doc_id = f'file:{path}#{lineno}'
    split = split_lib.assign_split(doc_id, validation, test)
    for k, pair in enumerate(pairs):
      # The cleaning of instruction data: NFC and PII scrub of every text.
      messages = pair['prompt'] + [{'role': chat.ASSISTANT, 'content': pair['chosen']},
                                   {'role': chat.ASSISTANT, 'content': pair['rejected']}]
      cleaned = instructions._clean_messages(  # pylint: disable=protected-access
          messages, 'NFC', True, report.pii_replacements)
      pair = dict(pair, prompt=cleaned[:-2], chosen=cleaned[-2]['content'],
                  rejected=cleaned[-1]['content'])
      if pair['chosen'] == pair['rejected']:
        report.skip('identical_responses', where, 'identical after cleaning')
        continue
      text = json.dumps([pair['prompt'], pair['chosen'], pair['rejected']])
      digest = dedup.normalized_hash(text)
      if digest in seen:
        report.skip('duplicate', where, f'duplicate of {seen[digest]}')
        continue
      seen[digest] = where
      out[split].append(dict(pair, id=f'{doc_id}/{k}' if len(pairs) > 1 else doc_id,
                             where=where))
  report.details['files'] = len(files)
  return out


def kind_names(workdir: str) -> tuple[str, ...]:
  """The kinds a preference data workdir's `kind` field numbers (1, 2, ...), in order.

  Empty when its pairs have no kind, or the data was built before the field.
  Stages read it to report accuracy per kind while training (train/objectives.py).
  """
  path = os.path.join(workdir, REPORT)
  if not os.path.exists(path):
    return ()
  with open(path, encoding='utf-8') as f:
    return tuple(json.load(f).get('kind_names', ()))


def _kind_names(pairs: dict[str, list[dict[str, Any]]], order: tuple[str, ...]
                ) -> tuple[str, ...]:
  """The kinds of `pairs`: those of `order` first, in its order, then the others sorted."""
  seen = {pair['kind'] for split_pairs in pairs.values() for pair in split_pairs
          if pair.get('kind')}
  return tuple(k for k in order if k in seen) + tuple(sorted(seen - set(order)))


def _render(tokenizer, pairs: dict[str, list[dict[str, Any]]], seq_len: int,
            report: instructions.Report, kind_order: tuple[str, ...] = ()
            ) -> dict[str, list[tuple[dict, dict]]]:
  """(pair, its fields) per split, the pairs that fit `seq_len`.

  kind_order: the kinds numbered first (the embedded default's, as configured).
  """
  names = _kind_names(pairs, kind_order)
  kind_ids = {name: i for i, name in enumerate(names, 1)}
  out = {}
  kinds: dict[str, collections.Counter] = {}
  for split, split_pairs in pairs.items():
    kept = []
    kinds[split] = collections.Counter()
    for pair in split_pairs:
      where = pair.get('where', pair['id'])
      try:
        fields = preferences.render_pair(tokenizer, pair,
                                         kind_ids.get(pair.get('kind') or '', 0))
      except chat.ChatFormatError as e:
        report.skip(e.reason, where, e.detail)
        continue
      length = len(fields['tokens'])
      if fields['prompt_length'] >= seq_len - 1:
        report.skip('prompt_too_long', where, f'prompt of {fields["prompt_length"]} tokens, '
                    f'seq_len={seq_len}')
        continue
      if length > seq_len:
        report.skip('too_long', where, f'{length} tokens > seq_len={seq_len}')
        continue
      kept.append((pair, fields))
      kinds[split][pair.get('kind') or ''] += 1
    out[split] = kept
  report.splits = {
      split: {'pairs': len(kept), 'examples': len(kept),
              'tokens': int(sum(len(f['tokens']) for _, f in kept)),
              'chosen_tokens': int(sum(f['chosen_mask'].sum() for _, f in kept)),
              'rejected_tokens': int(sum(f['rejected_mask'].sum() for _, f in kept))}
      for split, kept in out.items()}
  report.details['kinds'] = {split: dict(sorted(c.items())) for split, c in kinds.items()}
  report.details['kind_names'] = list(names)
  return out


def _settings(tokenizer_bytes: bytes, source: str, paths: str, seq_len: int, validation: float,
              test: float, kinds: tuple[str, ...]) -> dict[str, Any]:
  return {'tokenizer_sha256': hashlib.sha256(tokenizer_bytes).hexdigest(), 'source': source,
          'paths': paths if source == 'files' else '', 'seq_len': int(seq_len),
          'validation': float(validation), 'test': float(test),
          'kinds': list(kinds) if source == 'stdlib' else []}


def prepare(workdir: str, tokenizer_path: str, *, source: str = 'stdlib', paths: str = '',
            seq_len: int, validation: float, test: float,
            kinds: tuple[str, ...] = preferences.KINDS) -> dict[str, Any]:
  """Builds the preference dataset in `workdir` unless it is already built with these settings."""
  if source not in SOURCES:
    raise UserError(f'config key data.source={source!r} is not one of {SOURCES}.')
  unknown = [k for k in kinds if k not in preferences.KINDS]
  if unknown or not kinds:
    raise UserError(f'config key data.kinds={",".join(kinds)!r}: expected a comma-separated '
                    f'subset of {",".join(preferences.KINDS)}.')
  if not os.path.exists(tokenizer_path):
    raise UserError(f'data.tokenizer={tokenizer_path} does not exist: give the SFT model\'s '
                    'tokenizer.model (e.g. runs/sft/tokenizer.model).')
  if source == 'stdlib':
    stdlib_instructions.check_held_out(tokenizer_path, validation, test)
  with open(tokenizer_path, 'rb') as f:
    tokenizer_bytes = f.read()
  settings = _settings(tokenizer_bytes, source, paths, seq_len, validation, test, tuple(kinds))
  built = instructions.finished_report(workdir, settings, 'preference data', REPORT)
  if built is not None:
    return built

  tokenizer = tokenizer_lib.Tokenizer.from_bytes(tokenizer_bytes, tokenizer_path)
  print(f'Building preference data ({source}) in {workdir} with {tokenizer_path}...', flush=True)
  report = instructions.Report(source, seq_len, validation, test, log_skips=source == 'files')
  if source == 'stdlib':
    pairs = _stdlib_pairs(tokenizer, seq_len, validation, test, tuple(kinds), report)
  else:
    pairs = _file_pairs(paths, validation, test, report)
  rendered = _render(tokenizer, pairs, seq_len, report,
                     tuple(kinds) if source == 'stdlib' else ())
  result = report.to_dict()
  if not rendered.get('train'):
    raise UserError(f'No preference pair in the train split ({result["kept"]} kept of '
                    f'{result["candidates"]} candidates; skipped {result["skipped"]}).')
  os.makedirs(workdir, exist_ok=True)
  shards.write_dataset(
      workdir,
      {split: [{'id': pair['id'], 'num_bytes': len(pair['chosen'].encode('utf-8')),
                **{k: fields[k] for k in ('tokens',) + preferences.FIELDS}}
               for pair, fields in kept]
       for split, kept in rendered.items()},
      fields=preferences.FIELDS, framing='sequence')
  for split, kept in rendered.items():
    with open(pairs_file(workdir, split), 'w', encoding='utf-8') as f:
      for pair, _ in kept:
        f.write(json.dumps({k: pair.get(k) for k in ('id', 'prompt', 'chosen', 'rejected',
                                                     'margin', 'kind', 'function_name')}) + '\n')
  shutil.copyfile(tokenizer_path, os.path.join(workdir, TOKENIZER))
  report_lib.write(result, os.path.join(workdir, REPORT))
  instructions.mark_finished(workdir, settings)
  print(f'Preference data: { {s: len(k) for s, k in rendered.items()} } pairs (report: '
        f'{os.path.join(workdir, REPORT)})', flush=True)
  return result
