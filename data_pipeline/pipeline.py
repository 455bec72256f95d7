"""`run(config, workdir)`: every data stage in order, each with its counts.

sources -> clean -> exact_dedup -> near_dedup -> split -> tokenizer (trained on
the train split only) -> shards (every split encoded and written). The
workdir ends up with tokenizer.model/.vocab, tfds/ (`strata_corpus`),
data_report.json, data_config.json and, written last, DONE: JSON with the time
and the fingerprint of the inputs (`inputs.py`).

A workdir with DONE is reused as it is when its config and its inputs are the
same; when either changed, the run stops with an error naming the changes and
writes nothing (`rebuild=True`, `--rebuild`, replaces the dataset). A DONE from
before fingerprints (a bare timestamp) cannot be checked: it is reused with a
warning rather than refused, so existing workdirs keep working.
"""

from __future__ import annotations

import collections
import json
import os
import time
from typing import Any, Iterable, Iterator

import ml_collections
import tqdm

from configs import cli
from configs import data as data_configs
from configs.cli import UserError
from data_pipeline import clean
from data_pipeline import dedup
from data_pipeline import inputs as inputs_lib
from data_pipeline import report as report_lib
from data_pipeline import shards
from data_pipeline import sources
from data_pipeline import split as split_lib
from data_pipeline import tokenizer as tokenizer_lib

DONE = 'DONE'
REPORT = 'data_report.json'
CONFIG = data_configs.WORKDIR_CONFIG
TOKENIZER_PREFIX = 'tokenizer'
ENCODE_BATCH = 64  # Documents per SentencePiece call (it threads inside one).


def _progress(iterable: Iterable, desc: str, total: int | None = None) -> tqdm.tqdm:
  return tqdm.tqdm(iterable, desc=f'{desc:>12}', total=total, unit='doc',
                   dynamic_ncols=True, mininterval=0.5)


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  # The preset name is a label; what matters is the values it set.
  return {k: v for k, v in json.loads(config.to_json(sort_keys=True)).items() if k != 'preset'}


_NEW_KEY = object()  # A key the recorded config did not have yet.


def _differences(a: Any, b: Any, prefix: str = '') -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b))
            for d in _differences(a.get(k, _NEW_KEY), b.get(k), f'{prefix}{k}.')]
  if a is _NEW_KEY:
    return [f'{prefix[:-1]}: new key']
  return [] if a == b else [f'{prefix[:-1]}: {a!r} -> {b!r}']


def _read_done(workdir: str) -> dict[str, Any] | None:
  """DONE's record, or None for an old-style DONE (a timestamp, no fingerprint)."""
  with open(os.path.join(workdir, DONE)) as f:
    text = f.read()
  try:
    record = json.loads(text)
  except json.JSONDecodeError:
    return None
  return record if isinstance(record, dict) and 'inputs' in record else None


def _listed(changes: list[str], limit: int = 5) -> str:
  more = f'; and {len(changes) - limit} more' if len(changes) > limit else ''
  return '; '.join(changes[:limit]) + more


def _reuse(config: ml_collections.ConfigDict, workdir: str,
           inputs_now: dict[str, Any]) -> dict[str, Any]:
  """The finished dataset's report if it was built from this config and these inputs.

  Anything else is refused before a file is touched: reusing it would give
  stale data, and rebuilding over it without being asked would destroy it.
  """
  config_path = os.path.join(workdir, CONFIG)
  if os.path.exists(config_path):
    with open(config_path) as f:
      changed = _differences(json.load(f), _config_dict(config))
    # A workdir built before a key existed cannot disagree with it; a refusal
    # would strand every such workdir, so these are named, not refused.
    new_keys = [c.split(':')[0] for c in changed if c.endswith(': new key')]
    changed = [c for c in changed if not c.endswith(': new key')]
    if new_keys:
      print(f'Warning: {workdir} was built before config keys {", ".join(new_keys)} '
            'existed; reusing it as it is (--rebuild rebuilds it).')
    if changed:
      raise UserError(
          f'{workdir} already holds a dataset built with a different config '
          f'({_listed(changed)}); rerun with --rebuild to replace it, or use a fresh --workdir.')
  record = _read_done(workdir)
  if record is None:
    # Built before DONE recorded its inputs: nothing to compare with. Refusing
    # would strand every existing workdir, so it is reused, with a warning.
    print(f'Warning: {workdir}/{DONE} predates input fingerprints, so whether the inputs '
          'changed since cannot be checked; --rebuild rebuilds it.')
  else:
    changed = inputs_lib.differences(record['inputs'], inputs_now)
    if changed:
      raise UserError(
          f'{workdir} holds a dataset built from inputs that have changed since '
          f'({_listed(changed)}); rerun with --rebuild to rebuild it, or use a fresh --workdir.')
  with open(os.path.join(workdir, REPORT)) as f:
    report = json.load(f)
  print(f'{workdir} already holds a finished dataset ({DONE} exists, same config and '
        'inputs): reusing it.')
  return report


def _encoded(tokenizer: tokenizer_lib.Tokenizer, docs: list[sources.Document],
             bar: tqdm.tqdm) -> Iterator[tuple[str, list[int], int]]:
  """(id, token ids, UTF-8 bytes) per document, encoded in batches as consumed."""
  for start in range(0, len(docs), ENCODE_BATCH):
    batch = docs[start:start + ENCODE_BATCH]
    for doc, ids in zip(batch, tokenizer.encode_batch([d.text for d in batch])):
      yield doc.id, ids, len(doc.text.encode('utf-8'))
    bar.update(len(batch))


def run(config: ml_collections.ConfigDict, workdir: str,
        rebuild: bool = False) -> dict[str, Any]:
  """Builds the dataset described by `config` in `workdir`; returns the report.

  A finished workdir (DONE) is reused if its config and inputs are unchanged;
  otherwise this is an error that names what changed, before any file is
  written, unless `rebuild`. A failed run still writes data_report.json.
  """
  data_configs.validate(config)  # Flag overrides come after get_config's check.
  inputs_now = inputs_lib.fingerprint(inputs_lib.source_files(config.source))
  if os.path.exists(os.path.join(workdir, DONE)):
    if not rebuild:
      report = _reuse(config, workdir, inputs_now)
      print(report_lib.summary_table(report))
      return report
    print(f'--rebuild: replacing the dataset in {workdir}.')
    # First, so that a rebuild that fails never leaves a DONE over mixed files.
    os.remove(os.path.join(workdir, DONE))
  os.makedirs(workdir, exist_ok=True)
  started = time.time()
  report = report_lib.Report(meta={'preset': config.get('preset', ''), 'workdir': workdir})
  try:
    _build(config, workdir, report)
  except BaseException as e:  # Recorded and re-raised: the report says how far it got.
    report.meta['error'] = f'{type(e).__name__}: {cli.one_line(e)}'
    report.meta['seconds'] = round(time.time() - started, 1)
    report_lib.write(report.to_dict(), os.path.join(workdir, REPORT))
    raise
  report.meta['seconds'] = round(time.time() - started, 1)
  result = report.to_dict()
  report_lib.write(result, os.path.join(workdir, REPORT))
  with open(os.path.join(workdir, CONFIG), 'w') as f:
    json.dump(_config_dict(config), f, indent=2)
  with open(os.path.join(workdir, DONE), 'w') as f:
    json.dump({'finished': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'inputs': inputs_now}, f)
    f.write('\n')
  print(report_lib.summary_table(result))
  print(f'Done in {report.meta["seconds"]:.0f} s: {workdir}')
  return result


def _build(config: ml_collections.ConfigDict, workdir: str, report: report_lib.Report) -> None:
  """Every stage in order, filling `report` as each one finishes."""
  started = time.time()
  stage = report.stage('sources')
  skipped = sources.Skipped()
  docs = list(_progress(sources.iter_documents(config.source, skipped), 'sources'))
  stage.documents_in = len(docs) + sum(skipped.values())
  stage.bytes_in = stage.bytes_out = report_lib.num_bytes(docs)  # Skipped files: no text.
  stage.documents_out, stage.dropped = len(docs), skipped
  stage.details['skipped_examples'] = skipped.examples
  stage.seconds = time.time() - started
  if not docs:
    named = '; '.join(f"{e['where']}: {e['reason']}" for e in skipped.examples[:3])
    raise UserError(f'The source yielded no document: '
                    f'{report_lib.what_was_dropped(report.to_dict())}'
                    + (f' (first skipped: {named})' if named else '') + '.')

  stage = report.stage('clean')
  t = time.time()
  pii = collections.Counter()
  stage.documents_in, stage.bytes_in = len(docs), report.stages[-2].bytes_out
  docs = clean.clean_documents(_progress(docs, 'clean'), config.clean, stage.dropped, pii)
  stage.documents_out, stage.bytes_out = len(docs), report_lib.num_bytes(docs)
  stage.details['pii_replacements'] = dict(sorted(pii.items()))
  stage.seconds = time.time() - t

  stage = report.stage('exact_dedup')
  t = time.time()
  stage.documents_in, stage.bytes_in = len(docs), report.stages[-2].bytes_out
  docs, removed = dedup.exact_dedup(_progress(docs, 'exact_dedup'))
  stage.dropped['exact_duplicate'] = len(removed)
  stage.documents_out, stage.bytes_out = len(docs), report_lib.num_bytes(docs)
  stage.details['examples'] = [{'dropped': a, 'kept': b} for a, b in removed[:10]]
  stage.seconds = time.time() - t

  stage = report.stage('near_dedup')
  t = time.time()
  stage.documents_in, stage.bytes_in = len(docs), report.stages[-2].bytes_out
  docs, removed = dedup.near_dedup(
      docs, ngram=config.dedup.ngram, num_perm=config.dedup.num_perm,
      threshold=config.dedup.threshold, seed=config.dedup.seed,
      progress=lambda it: _progress(it, 'near_dedup', total=len(docs)))
  stage.dropped['near_duplicate'] = len(removed)
  stage.documents_out, stage.bytes_out = len(docs), report_lib.num_bytes(docs)
  stage.details['examples'] = [
      {'dropped': a, 'kept': b, 'estimated_jaccard': round(s, 3)} for a, b, s in removed[:10]]
  stage.seconds = time.time() - t

  stage = report.stage('split')
  t = time.time()
  stage.documents_in = stage.documents_out = len(docs)
  stage.bytes_in = stage.bytes_out = report.stages[-2].bytes_out
  splits = split_lib.split_documents(docs, config.split.validation, config.split.test)
  stage.details = {name: len(split_docs) for name, split_docs in splits.items()}
  stage.seconds = time.time() - t
  for name, split_docs in splits.items():
    if not split_docs:
      print(f'Warning: split {name!r} is empty ({len(docs)} documents in all).')
  if not splits['train']:
    raise UserError(f'The train split is empty: {report_lib.what_was_dropped(report.to_dict())}.')

  stage = report.stage('tokenizer')
  t = time.time()
  train = splits['train']
  stage.documents_in = stage.documents_out = len(train)
  stage.bytes_in = stage.bytes_out = report_lib.num_bytes(train)
  print(f'Training a {config.tokenizer.model_type} tokenizer of '
        f'{config.tokenizer.vocab_size} pieces on {len(train):,} train documents...')
  lines = {}
  model_path = tokenizer_lib.train_tokenizer(
      (doc.text for doc in train), os.path.join(workdir, TOKENIZER_PREFIX),
      config.tokenizer.vocab_size, config.tokenizer.model_type,
      input_sentence_size=config.tokenizer.input_sentence_size, stats=lines)
  tokenizer = tokenizer_lib.Tokenizer.load(model_path)
  stage.details = {'model': model_path, 'vocab_size': tokenizer.vocab_size,
                   'model_type': config.tokenizer.model_type, 'training_lines': lines['lines'],
                   'lines_too_long': lines['lines_too_long']}
  if lines['lines_too_long']:
    print(f'Note: {lines["lines_too_long"]:,} lines over SentencePiece\'s length limit were left '
          'out of tokenizer training (their documents are still encoded whole).')
  stage.seconds = time.time() - t

  stage = report.stage('shards')
  t = time.time()
  stage.documents_in, stage.bytes_in = len(docs), report.stages[-3].bytes_out
  with _progress(None, 'shards', total=len(docs)) as bar:
    report.splits = shards.write_dataset(
        workdir, {name: _encoded(tokenizer, split_docs, bar)
                  for name, split_docs in splits.items()})
  stage.documents_out = sum(s['documents'] for s in report.splits.values())
  stage.bytes_out = sum(s['bytes'] for s in report.splits.values())
  stage.details = {'data_dir': shards.tfds_data_dir(workdir)}
  stage.seconds = time.time() - t


def ensure_prepared(data_workdir: str, preset: str = 'stdlib') -> dict[str, Any]:
  """Builds the dataset of `configs/data.py:<preset>` in `data_workdir` unless DONE."""
  if os.path.exists(os.path.join(data_workdir, DONE)):
    with open(os.path.join(data_workdir, REPORT)) as f:
      return json.load(f)
  print(f'No finished dataset in {data_workdir}: building configs/data.py:{preset}.')
  return run(data_configs.get_config(preset), data_workdir)
