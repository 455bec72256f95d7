"""An SFT data workdir: rendered conversations as shards, their prompts, a report.

`prepare(workdir, tokenizer_path, ...)` builds, once, from the embedded stdlib
instructions (`source='stdlib'`) or the user's JSONL files (`source='files'`):

  tokenizer.model            the tokenizer the examples were rendered with
                             (the pre-trained model's: ids must mean the same)
  tfds/strata_corpus/...     `tokens` + `loss_mask` per conversation, framing
                             'sequence' (each starts with its BOS; no EOS added)
  prompts_<split>.jsonl      per example: id, the prompt `messages` (all turns
                             but the last assistant one), the reference answer
                             and, for stdlib examples, `function_name`: what
                             generation and the functional metric read
  sft_report.json            what was kept and why the rest was dropped
  DONE                       JSON: the settings it was built with

A workdir with DONE built with other settings is refused (naming them), so a
run never trains on examples rendered with another tokenizer or length.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

from configs.cli import UserError
from data_pipeline import instructions
from data_pipeline import shards
from data_pipeline import stdlib_instructions
from data_pipeline import tokenizer as tokenizer_lib

DONE = instructions.DONE
TOKENIZER = 'tokenizer.model'
SOURCES = ('stdlib', 'files')


def prompts_file(workdir: str, split: str) -> str:
  return os.path.join(workdir, f'prompts_{split}.jsonl')


def read_prompts(workdir: str, split: str) -> list[dict[str, Any]]:
  """The prompts of `split` (see the module docstring), in stored order."""
  path = prompts_file(workdir, split)
  if not os.path.exists(path):
    raise UserError(f'{path} does not exist: {workdir} is not an SFT data workdir (built by '
                    f'`python -m train.sft`), or it has no {split} split.')
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]


def _settings(tokenizer_bytes: bytes, source: str, paths: str, seq_len: int,
              validation: float, test: float) -> dict[str, Any]:
  return {'tokenizer_sha256': hashlib.sha256(tokenizer_bytes).hexdigest(), 'source': source,
          'paths': paths if source == 'files' else '', 'seq_len': int(seq_len),
          'validation': float(validation), 'test': float(test)}


def prepare(workdir: str, tokenizer_path: str, *, source: str = 'stdlib', paths: str = '',
            seq_len: int, validation: float, test: float) -> dict[str, Any]:
  """Builds the SFT dataset in `workdir` unless it is already built with these settings."""
  if source not in SOURCES:
    raise UserError(f'config key data.source={source!r} is not one of {SOURCES}.')
  if not os.path.exists(tokenizer_path):
    raise UserError(f'data.tokenizer={tokenizer_path} does not exist: prepare the pre-training '
                    'data first (python -m data_pipeline --config=configs/data.py:stdlib '
                    '--workdir=runs/data) or point it at the model\'s tokenizer.model.')
  if source == 'stdlib':
    stdlib_instructions.check_held_out(tokenizer_path, validation, test)
  with open(tokenizer_path, 'rb') as f:
    tokenizer_bytes = f.read()
  settings = _settings(tokenizer_bytes, source, paths, seq_len, validation, test)
  built = instructions.finished_report(workdir, settings, 'SFT data')
  if built is not None:
    return built

  tokenizer = tokenizer_lib.Tokenizer.from_bytes(tokenizer_bytes, tokenizer_path)
  print(f'Building SFT data ({source}) in {workdir} with {tokenizer_path}...', flush=True)
  if source == 'stdlib':
    records, report = stdlib_instructions.build_stdlib_instructions(
        tokenizer, seq_len, validation=validation, test=test)
  else:
    records, report = instructions.read_instruction_files(
        paths, tokenizer, seq_len, validation=validation, test=test)
  if not records.get('train'):
    raise UserError(f'No SFT example in the train split ({report.get("kept")} kept of '
                    f'{report.get("candidates")}; skipped {report.get("skipped")}).')
  os.makedirs(workdir, exist_ok=True)
  shards.write_dataset(
      workdir,
      {split: [{'id': r['id'], 'tokens': r['tokens'], 'loss_mask': r['loss_mask'],
                'num_bytes': len(r['messages'][-1]['content'].encode('utf-8'))}
               for r in split_records]
       for split, split_records in records.items()},
      fields=('loss_mask',), framing='sequence')
  for split, split_records in records.items():
    with open(prompts_file(workdir, split), 'w', encoding='utf-8') as f:
      for r in split_records:
        f.write(json.dumps({'id': r['id'], 'messages': r['messages'][:-1],
                            'answer': r['messages'][-1]['content'],
                            'function_name': r.get('function_name')}) + '\n')
  shutil.copyfile(tokenizer_path, os.path.join(workdir, TOKENIZER))
  instructions.write_report(report, workdir)
  instructions.mark_finished(workdir, settings)
  counts = {split: len(r) for split, r in records.items()}
  print(f'SFT data: {counts} examples (report: {os.path.join(workdir, instructions.REPORT)})',
        flush=True)
  return report
