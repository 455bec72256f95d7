"""End to end on a tiny corpus of local files: report, shards, reuse, CLI."""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys

import pytest

from configs import data as data_configs
from data_pipeline import pipeline
from data_pipeline import sources
from data_pipeline import split as split_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {'source.paths': 'corpus', 'tokenizer.vocab_size': '400',
             'split.validation': '0.2', 'split.test': '0.2'}
_WORDS = ('the model reads text and learns which token comes next so data quality '
          'matters a great deal for every later stage of training we clean split '
          'and count everything that happens along the way').split()


def _prose(seed: int, num_words: int = 160) -> str:
  rng = random.Random(seed)
  lines = [' '.join(rng.choice(_WORDS) for _ in range(12)) for _ in range(num_words // 12)]
  return '\n'.join(f'{line} {seed}-{k}.' for k, line in enumerate(lines)) + '\n'


def _make_corpus(root) -> None:
  corpus = root / 'corpus'
  corpus.mkdir()
  for i in range(30):
    (corpus / f'doc{i:02d}.txt').write_text(_prose(i))
  (corpus / 'doc00_copy.txt').write_text('  ' + _prose(0).replace('\n', ' \n'))
  near = _prose(1).split(' ')
  near[20] = 'different'
  (corpus / 'doc01_edited.txt').write_text(' '.join(near))
  (corpus / 'contact.txt').write_text(_prose(40) + 'mail admin@example.org or ssh 10.1.2.3\n')
  (corpus / 'latin1.txt').write_bytes('caf\xe9 '.encode('latin-1') * 20)
  (corpus / 'empty.txt').write_bytes(b'')
  (corpus / 'short.txt').write_text('too short')
  records = [json.dumps({'text': _prose(50 + k)}) for k in range(5)]
  records.insert(2, '{"text": broken json')
  records.insert(4, json.dumps({'body': 'wrong field'}))
  (corpus / 'web.jsonl').write_text('\n'.join(records) + '\n')


def _config(**changes):
  arg = ','.join(['files'] + [f'{k}={v}' for k, v in {**OVERRIDES, **changes}.items()])
  return data_configs.get_config(arg)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipeline')
  _make_corpus(root)
  cwd = os.getcwd()
  os.chdir(root)  # Relative paths make stable ids: file:corpus/doc00.txt.
  try:
    report = pipeline.run(_config(), 'data')
  finally:
    os.chdir(cwd)
  return root, report


def test_report_counts_every_stage(built):
  root, report = built
  stages = report['stages']
  assert stages['sources']['dropped'] == {
      'not_utf8': 1, 'empty_file': 1, 'bad_json': 1, 'missing_text_field': 1}
  assert stages['sources']['documents_out'] == 30 + 3 + 1 + 5
  assert stages['clean']['dropped'] == {'too_short': 1}
  assert stages['clean']['details']['pii_replacements'] == {'EMAIL': 1, 'IP_ADDRESS': 1}
  assert stages['exact_dedup']['dropped'] == {'exact_duplicate': 1}
  assert stages['exact_dedup']['details']['examples'] == [
      {'dropped': 'file:corpus/doc00_copy.txt', 'kept': 'file:corpus/doc00.txt'}]
  assert stages['near_dedup']['dropped'] == {'near_duplicate': 1}
  assert stages['near_dedup']['details']['examples'][0]['dropped'] == 'file:corpus/doc01_edited.txt'
  for stage in stages.values():
    assert stage['documents_in'] - stage['documents_out'] == sum(stage['dropped'].values()) or (
        stage is stages['tokenizer'])
  splits = report['splits']
  assert sum(s['documents'] for s in splits.values()) == stages['near_dedup']['documents_out'] == 36
  assert all(s['documents'] > 0 and s['tokens'] > s['documents'] for s in splits.values())
  # The tokenizer saw the train split only.
  assert stages['tokenizer']['documents_in'] == splits['train']['documents']
  with open(root / 'data' / 'data_report.json') as f:
    assert json.load(f) == report
  for name in ('DONE', 'tokenizer.model', 'data_report.json', 'tfds'):
    assert os.path.exists(root / 'data' / name), name


def test_shards_hold_each_split_by_id(built):
  root, _ = built
  for name in ('train', 'validation', 'test'):
    written = sources.tfds_documents('strata_corpus', name, collections.Counter(),
                                     data_dir=str(root / 'data' / 'tfds'), text_feature='id')
    ids = [d.text for d in written]
    assert ids and all(split_lib.assign_split(i, 0.2, 0.2) == name for i in ids)
    assert 'file:corpus/doc01_edited.txt' not in ids and 'file:corpus/short.txt' not in ids


def test_rerun_reuses_the_finished_dataset(built, capsys):
  root, report = built
  done = root / 'data' / 'DONE'
  before = os.stat(done).st_mtime_ns
  cwd = os.getcwd()
  os.chdir(root)
  try:
    assert pipeline.run(_config(), 'data') == report
    assert 'reusing it' in capsys.readouterr().out
    assert os.stat(done).st_mtime_ns == before
    with pytest.raises(ValueError, match='different config.*vocab_size'):
      pipeline.run(_config(**{'tokenizer.vocab_size': '500'}), 'data')
    assert pipeline.ensure_prepared('data') == report
  finally:
    os.chdir(cwd)


def test_cli_parses_flags_and_reuses(built):
  root, _ = built
  flags = [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  out = subprocess.run(
      [sys.executable, '-m', 'data_pipeline', f'--config={REPO}/configs/data.py:files',
       *flags, '--workdir=data'], cwd=root, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'reusing it' in out.stdout and 'near_dedup' in out.stdout
  bad = subprocess.run(
      [sys.executable, '-m', 'data_pipeline', f'--config={REPO}/configs/data.py:files',
       '--config.source.pathz=x', '--workdir=data'], cwd=root, capture_output=True, text=True,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert bad.returncode != 0 and 'pathz' in bad.stderr
