"""End to end on a tiny corpus of local files: report, shards, reuse, CLI."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys

import pytest

import guards

from configs import data as data_configs
from configs.cli import UserError
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
  # Every file found is read or counted: suffixes in any case, .md as text,
  # other types, a FIFO (never opened: it would block) and a link loop.
  (corpus / 'NOTES.MD').write_text(_prose(60))
  (corpus / 'table.json').write_text('{"text": "json, not json lines"}')
  os.mkfifo(corpus / 'pipe.txt')
  os.symlink('.', corpus / 'self')


def _config(**changes):
  arg = ','.join(['files'] + [f'{k}={v}' for k, v in {**OVERRIDES, **changes}.items()])
  return data_configs.get_config(arg)


_fails_if_it_hangs = guards.fails_if_it_hangs


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipeline')
  _make_corpus(root)
  cwd = os.getcwd()
  os.chdir(root)  # Relative paths make stable ids: file:corpus/doc00.txt.
  try:
    with _fails_if_it_hangs(60):
      report = pipeline.run(_config(), 'data')
  finally:
    os.chdir(cwd)
  return root, report


def test_report_counts_every_stage(built):
  root, report = built
  stages = report['stages']
  assert stages['sources']['dropped'] == {
      'not_utf8': 1, 'empty_file': 1, 'bad_json': 1, 'missing_text_field': 1,
      'unsupported_file_type': 1, 'not_a_regular_file': 1, 'directory_link_loop': 1}
  assert stages['sources']['documents_out'] == 30 + 3 + 1 + 5 + 1
  named = {e['where'].split(' ')[0]: e['reason']
           for e in stages['sources']['details']['skipped_examples']}
  assert named['corpus/table.json'] == 'unsupported_file_type'
  assert named['corpus/pipe.txt'] == 'not_a_regular_file'
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
  assert sum(s['documents'] for s in splits.values()) == stages['near_dedup']['documents_out'] == 37
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
    with pytest.raises(UserError, match='different config.*vocab_size'):
      pipeline.run(_config(**{'tokenizer.vocab_size': '500'}), 'data')
    with open(done) as f:
      inputs = json.load(f)['inputs']['files']
    assert inputs['corpus/doc00.txt']['size'] == len(_prose(0).encode())
    assert inputs['corpus/pipe.txt'] == {'skipped': 'not_a_regular_file'}
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


def _snapshot(folder) -> dict[str, object]:
  return guards.snapshot(folder, mtimes=True)


def _small_build(tmp_path, monkeypatch, **changes) -> dict:
  """A tiny dataset in tmp_path/data from tmp_path/corpus (12 documents)."""
  monkeypatch.chdir(tmp_path)
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(12):
    (corpus / f'doc{i:02d}.txt').write_text(_prose(100 + i))
  return pipeline.run(_config(**changes), 'data')


def _write_keeping_mtime(path, text: str, mtime_ns: int) -> None:
  path.write_text(text)
  os.utime(path, ns=(mtime_ns, mtime_ns))


def test_changed_inputs_are_refused_and_leave_the_workdir_untouched(tmp_path, monkeypatch):
  _small_build(tmp_path, monkeypatch)
  corpus = tmp_path / 'corpus'
  original = (corpus / 'doc03.txt').read_text()
  mtime = os.stat(corpus / 'doc03.txt').st_mtime_ns
  restore = lambda: _write_keeping_mtime(corpus / 'doc03.txt', original, mtime)
  before = _snapshot(tmp_path / 'data')
  cases = [  # (change the inputs, undo it, what the error names)
      # Same size, same modification time: only the content hash sees it.
      (lambda: _write_keeping_mtime(corpus / 'doc03.txt', original.replace('a', 'b', 1), mtime),
       restore, 'corpus/doc03.txt: content changed'),
      (lambda: (corpus / 'doc03.txt').write_text(original + 'one more line\n'),
       restore, 'corpus/doc03.txt: size'),
      (lambda: (corpus / 'new.md').write_text(_prose(7)),
       lambda: os.remove(corpus / 'new.md'),
       'corpus/new.md: new file'),
      (lambda: os.rename(corpus / 'doc05.txt', tmp_path / 'aside.txt'),
       lambda: os.rename(tmp_path / 'aside.txt', corpus / 'doc05.txt'),
       'corpus/doc05.txt: gone'),
  ]
  for change, undo, named in cases:
    change()
    with pytest.raises(UserError, match=f'inputs that have changed.*{named}.*--rebuild'):
      pipeline.run(_config(), 'data')
    assert _snapshot(tmp_path / 'data') == before, named
    undo()
  # The same bytes, touched: the hash says unchanged, so it is reused.
  os.utime(corpus / 'doc03.txt')
  pipeline.run(_config(), 'data')
  assert _snapshot(tmp_path / 'data') == before
  # A changed config is refused the same way, and --rebuild replaces the dataset.
  with pytest.raises(UserError, match='different config.*near_dedup|different config.*dedup.ngram'):
    pipeline.run(_config(**{'dedup.ngram': '4'}), 'data')
  assert _snapshot(tmp_path / 'data') == before
  (corpus / 'doc03.txt').write_text(original + 'one more line\n')
  report = pipeline.run(_config(), 'data', rebuild=True)
  assert report['stages']['sources']['documents_out'] == 12
  with open(tmp_path / 'data' / 'DONE') as f:
    recorded = json.load(f)['inputs']['files']['corpus/doc03.txt']
  assert recorded['size'] == len((original + 'one more line\n').encode())
  assert pipeline.run(_config(), 'data') == report  # Reused: inputs as recorded.


def test_old_style_done_is_reused_with_a_warning(tmp_path, monkeypatch, capsys):
  report = _small_build(tmp_path, monkeypatch)
  # As a workdir from before fingerprints: DONE a timestamp, no text_suffixes key.
  (tmp_path / 'data' / 'DONE').write_text('2026-01-01T00:00:00+0000\n')
  with open(tmp_path / 'data' / 'data_config.json') as f:
    recorded = json.load(f)
  del recorded['source']['text_suffixes']
  with open(tmp_path / 'data' / 'data_config.json', 'w') as f:
    json.dump(recorded, f, indent=2)
  before = _snapshot(tmp_path / 'data')
  capsys.readouterr()
  assert pipeline.run(_config(), 'data') == report
  out = capsys.readouterr().out
  assert 'predates input fingerprints' in out and 'reusing it' in out
  assert 'before config keys source.text_suffixes existed' in out
  assert _snapshot(tmp_path / 'data') == before


def test_a_failed_run_says_which_stage_dropped_what_and_writes_its_report(tmp_path, monkeypatch):
  with pytest.raises(UserError, match=r'train split is empty: sources 12 -> 12; '
                     r'clean 12 -> 0 \(too_short: 12\)'):
    _small_build(tmp_path, monkeypatch, **{'clean.min_chars': '100000'})
  with open(tmp_path / 'data' / 'data_report.json') as f:
    report = json.load(f)
  assert 'train split is empty' in report['error']
  assert report['stages']['clean']['dropped'] == {'too_short': 12}
  assert not os.path.exists(tmp_path / 'data' / 'DONE')


@pytest.mark.parametrize('key, value', [
    ('dedup.ngram', 0), ('dedup.num_perm', 0), ('dedup.threshold', 0.0),
    ('dedup.threshold', 2.0), ('split.test', -0.1), ('clean.max_line_chars', 0),
    ('tokenizer.vocab_size', 10),
])
def test_nonsense_settings_set_after_get_config_stop_before_writing(tmp_path, key, value):
  config = _config()
  section, name = key.split('.')
  config[section][name] = value  # As a --config.x.y flag does, after get_config.
  with pytest.raises(UserError, match=rf'{key}='):
    pipeline.run(config, str(tmp_path / 'data'))
  assert not os.path.exists(tmp_path / 'data')
