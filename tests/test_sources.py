"""Sources: local files, the embedded corpus, TFDS errors; bad input skipped and counted."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import guards

from configs.cli import UserError
from data_pipeline import sources


_fails_if_it_hangs = guards.fails_if_it_hangs


def _write(path, data: bytes) -> str:
  with open(path, 'wb') as f:
    f.write(data)
  return str(path)


def test_txt_one_document_per_file(tmp_path):
  a = _write(tmp_path / 'a.txt', 'héllo\nworld\n'.encode())
  skipped = collections.Counter()
  docs = list(sources.file_documents(a, skipped))
  assert docs == [sources.Document(f'file:{a}', 'héllo\nworld\n', 'file')]
  assert not skipped


def test_bad_files_skipped_counted_and_named_in_the_log(tmp_path, caplog):
  good = _write(tmp_path / 'good.txt', b'fine text')
  _write(tmp_path / 'latin1.txt', 'caf\xe9'.encode('latin-1'))
  _write(tmp_path / 'empty.txt', b'')
  _write(tmp_path / 'blank.txt', b'  \n\n')
  _write(tmp_path / 'binary.txt', b'abc\x00\x01\x02')
  _write(tmp_path / 'notes.json', b'{"not": "a supported type"}')
  skipped = collections.Counter()
  with caplog.at_level(logging.WARNING):
    docs = list(sources.file_documents([str(tmp_path / '*')], skipped))
  assert [d.id for d in docs] == [f'file:{good}']
  assert skipped == {'not_utf8': 1, 'empty_file': 2, 'binary_file': 1, 'unsupported_file_type': 1}
  assert 'latin1.txt' in caplog.text and 'not_utf8' in caplog.text
  assert 'binary.txt' in caplog.text


def test_jsonl_malformed_lines_skipped_and_counted(tmp_path, caplog):
  lines = [
      json.dumps({'text': 'first document', 'id': 'x1'}).encode(),
      b'{"text": "unterminated',
      json.dumps({'body': 'no text field'}).encode(),
      json.dumps({'text': 42}).encode(),
      json.dumps(['not', 'an', 'object']).encode(),
      json.dumps({'text': '   '}).encode(),
      b'{"text": "caf\xe9"}',
      b'',
      json.dumps({'text': 'second document'}).encode(),
  ]
  path = _write(tmp_path / 'web.jsonl', b'\n'.join(lines) + b'\n')
  skipped = collections.Counter()
  with caplog.at_level(logging.WARNING):
    docs = list(sources.jsonl_documents(path, skipped, 'text', id_field='id'))
  assert [(d.id, d.text) for d in docs] == [
      (f'file:{path}#x1', 'first document'), (f'file:{path}#9', 'second document')]
  assert skipped == {'bad_json': 1, 'missing_text_field': 2, 'text_not_a_string': 1,
                     'empty_text': 1, 'not_utf8': 1}
  assert f'{path}:2' in caplog.text  # The bad line is named.


def test_jsonl_configurable_text_field(tmp_path):
  path = _write(tmp_path / 'd.jsonl', json.dumps({'content': 'body text'}).encode())
  skipped = collections.Counter()
  docs = list(sources.jsonl_documents(path, skipped, 'content'))
  assert [d.text for d in docs] == ['body text'] and docs[0].id == f'file:{path}#1'


def test_parquet_text_column(tmp_path):
  path = str(tmp_path / 'd.parquet')
  pq.write_table(pa.table({'text': ['one doc', None, 'two doc'], 'key': ['k1', 'k2', 'k3']}), path)
  skipped = collections.Counter()
  docs = list(sources.file_documents(path, skipped, text_field='text', id_field='key'))
  assert [(d.id, d.text) for d in docs] == [(f'file:{path}#k1', 'one doc'),
                                            (f'file:{path}#k3', 'two doc')]
  assert skipped == {'text_not_a_string': 1}
  with pytest.raises(UserError, match='no column'):
    list(sources.file_documents(path, skipped, text_field='body'))


def test_paths_that_match_nothing_are_an_error(tmp_path):
  with pytest.raises(UserError, match='nothing_here'):
    list(sources.file_documents(str(tmp_path / 'nothing_here*.txt'), collections.Counter()))
  with pytest.raises(ValueError, match='empty'):
    list(sources.file_documents('', collections.Counter()))


def test_stdlib_corpus_code_and_pydoc_topics():
  skipped = collections.Counter()
  docs = list(sources.stdlib_documents(skipped))
  by_id = {d.id: d for d in docs}
  assert len(by_id) == len(docs)  # Ids are unique.
  assert 'stdlib:json/decoder.py' in by_id and by_id['stdlib:json/decoder.py'].source == 'stdlib'
  topics = [d for d in docs if d.source == 'pydoc']
  assert len(topics) > 50 and 'pydoc:topics/assert' in by_id
  assert 'assert' in by_id['pydoc:topics/assert'].text
  assert 'stdlib:pydoc_data/topics.py' not in by_id  # Entered as topics instead.
  assert not any('site-packages' in d.id for d in docs)
  assert sum(len(d.text) for d in docs) > 10_000_000
  # Whatever was not read is accounted for (CPython ships empty __init__.py files).
  assert set(skipped) <= {'empty_file', 'not_utf8', 'binary_file', 'empty_text'}
  assert skipped['empty_file'] > 0


def test_tfds_unknown_or_unprepared_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="'no_such_dataset_xyz'") as e:
    list(sources.tfds_documents('no_such_dataset_xyz', 'train', collections.Counter(),
                                data_dir=str(tmp_path)))
  assert '\n' not in str(e.value)
  with pytest.raises(UserError, match=f"'mnist'.*{tmp_path}.*not prepared"):
    list(sources.tfds_documents('mnist', 'train', collections.Counter(), data_dir=str(tmp_path)))


@pytest.mark.parametrize('name, kind', [
    ('a.txt', 'text'), ('B.TXT', 'text'), ('c.md', 'text'), ('f.text', 'text'),
    ('g.Rst', 'text'), ('e.Jsonl', 'jsonl'), ('p.PARQUET', 'parquet'),
    ('d.json', ''), ('noext', ''), ('x.txt.gz', ''),
])
def test_file_type_by_suffix_in_any_case(tmp_path, name, kind):
  path = _write(tmp_path / name, b'x')
  assert sources.file_type(path) == (kind, '' if kind else 'unsupported_file_type')


def test_every_file_in_a_folder_is_read_or_counted(tmp_path):
  for name in ('a.txt', 'B.TXT', 'c.md', 'f.text'):
    _write(tmp_path / name, f'text of {name}'.encode())
  _write(tmp_path / 'd.json', b'{"text": "json, not json lines"}')
  _write(tmp_path / 'e.Jsonl', json.dumps({'text': 'a record'}).encode())
  _write(tmp_path / 'notes.parquet', b'a text file with the wrong name')
  skipped = sources.Skipped()
  docs = list(sources.file_documents(str(tmp_path), skipped))
  assert sorted(d.id.rsplit('/', 1)[1] for d in docs) == [
      'B.TXT', 'a.txt', 'c.md', 'e.Jsonl#1', 'f.text']
  assert skipped == {'unsupported_file_type': 1, 'not_parquet': 1}
  # The report names each skipped file with its reason.
  where = {e['reason']: e['where'] for e in skipped.examples}
  assert 'd.json' in where['unsupported_file_type']
  assert 'notes.parquet' in where['not_parquet'] and 'not a parquet file' in where['not_parquet']
  # The config decides what is text: .md only as text, here.
  skipped = collections.Counter()
  docs = list(sources.file_documents(str(tmp_path), skipped, text_suffixes='.MD'))
  assert sorted(d.id.rsplit('/', 1)[1] for d in docs) == ['c.md', 'e.Jsonl#1']
  assert skipped['unsupported_file_type'] == 4


def test_fifos_and_link_loops_are_skipped_and_counted(tmp_path):
  root = tmp_path / 'corpus'
  (root / 'sub').mkdir(parents=True)
  _write(root / 'a.txt', b'a document')
  _write(root / 'sub' / 'b.txt', b'another document')
  os.mkfifo(root / 'pipe.txt')        # Opening it would block forever.
  os.symlink('loop.txt', root / 'loop.txt')     # A link to itself.
  os.symlink('missing.txt', root / 'dangling.txt')
  os.symlink('..', root / 'sub' / 'up')         # A directory link into itself.
  os.symlink('sub', root / 'also_sub')          # A directory link elsewhere: followed.
  skipped = sources.Skipped()
  with _fails_if_it_hangs(10):
    docs = list(sources.file_documents(f'{root},{root}/pipe.txt', skipped))
  assert sorted(d.id[len(f'file:{root}/'):] for d in docs) == [
      'a.txt', 'also_sub/b.txt', 'sub/b.txt']
  assert skipped == {'not_a_regular_file': 1, 'symlink_loop': 1, 'broken_symlink': 1,
                     'directory_link_loop': 2}  # sub/up, seen as sub/up and also_sub/up.
  assert any(e['where'].startswith(f'{root}/pipe.txt') for e in skipped.examples)


def test_recursive_globs_do_not_follow_links_into_themselves(tmp_path, monkeypatch):
  root = tmp_path / 'corpus'
  (root / 'sub').mkdir(parents=True)
  _write(root / 'a.txt', b'a document')
  _write(root / 'sub' / 'b.txt', b'another document')
  os.symlink('.', root / 'self')
  os.symlink('..', root / 'sub' / 'up')  # With `self`, glob's own ** never ends.
  skipped = collections.Counter()
  with _fails_if_it_hangs(20):
    docs = list(sources.file_documents(f'{root}/**/*.txt', skipped))
  assert sorted(d.id for d in docs) == [f'file:{root}/a.txt', f'file:{root}/sub/b.txt']
  assert skipped == {'directory_link_loop': 2}
  monkeypatch.chdir(tmp_path)
  assert sources.expand_paths('**/*.txt') == ['corpus/a.txt', 'corpus/sub/b.txt']


def test_a_file_that_cannot_be_opened_is_counted(tmp_path, monkeypatch):
  good = _write(tmp_path / 'good.txt', b'fine text')
  locked = _write(tmp_path / 'locked.txt', b'no permission')
  real_open = open

  def fake_open(path, *args, **kwargs):
    if str(path) == locked:  # chmod 000 does not stop root, which runs CI.
      raise PermissionError(13, 'Permission denied', path)
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr('builtins.open', fake_open)
  skipped = sources.Skipped()
  docs = list(sources.file_documents(str(tmp_path), skipped))
  assert [d.id for d in docs] == [f'file:{good}']
  assert skipped == {'unreadable_file': 1}
  assert skipped.examples == [{'where': f'{locked} (Permission denied)', 'reason': 'unreadable_file'}]
