"""`python -m data_pipeline`: each user mistake is one `error:` line naming it, status 2."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROSE = ('the model reads text and learns which token comes next so data quality '
          'matters a great deal for every later stage of training\n')
# Every document in train, a small vocabulary: the corpus is tiny.
_BASE = ['--config.source.paths=corpus', '--config.tokenizer.vocab_size=300',
         '--config.split.validation=0', '--config.split.test=0']


def _cli(cwd, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'data_pipeline', f'--config={REPO}/configs/data.py:files',
       '--workdir=data', *flags], cwd=cwd, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO))


def _corpus(root, files: dict[str, bytes]) -> None:
  (root / 'corpus').mkdir()
  for name, data in files.items():
    (root / 'corpus' / name).write_bytes(data)


def _prose(seed: int, num_lines: int = 12) -> str:
  rng = random.Random(seed)
  words = _PROSE.split()
  return ''.join(' '.join(rng.choice(words) for _ in range(12)) + f' {seed}-{k}.\n'
                 for k in range(num_lines))


def _prose_files(n: int = 6) -> dict[str, bytes]:
  return {f'doc{i}.txt': _prose(i).encode() for i in range(n)}


def _assert_user_error(out: subprocess.CompletedProcess, *named: str) -> str:
  assert out.returncode == 2, out.stderr[-3000:]
  assert 'Traceback' not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), last
  for text in named:
    assert text in last, (text, last)
  return last


@pytest.mark.parametrize('files, flags, named', [
    (_prose_files(), ['--config.dedup.ngram=0'], ['dedup.ngram=0']),
    (_prose_files(), ['--config.dedup.threshold=2'], ['dedup.threshold=2.0']),
    (_prose_files(), ['--config.source.paths=corpus,missing_dir'], ["'missing_dir'", 'no file']),
    (_prose_files(), ['--config.source.kind=web'], ["source.kind='web'"]),
    (_prose_files(), ['--config.source.paths='], ['source.paths is empty']),
    ({'a.txt': b'', 'b.md': b'  \n', 'c.parquet': b'text, not parquet\n'}, [],
     ['no document', 'empty_file: 2', 'not_parquet: 1', 'corpus/c.parquet']),
    (_prose_files(), ['--config.tokenizer.vocab_size=5000'],
     ['tokenizer.vocab_size=5000 is too large', 'at most']),
    ({'long.txt': ('word ' * 4000 + '\n').encode()},
     ['--config.clean.max_line_chars=100000'], ['longer than max_sentence_length=16384']),
    (_prose_files(), ['--config.clean.min_chars=100000'],
     ['train split is empty', 'clean 6 -> 0 (too_short: 6)']),
    (_prose_files(), ['stray_argument'], ['Unexpected arguments: stray_argument']),
], ids=['ngram_0', 'threshold_2', 'missing_path', 'unknown_kind', 'empty_paths', 'no_document',
        'vocab_too_large', 'one_long_line', 'clean_dropped_all', 'stray_argument'])
def test_user_mistakes_are_one_error_line(tmp_path, files, flags, named):
  _corpus(tmp_path, files)
  _assert_user_error(_cli(tmp_path, *_BASE, *flags), *named)


def test_changed_inputs_stop_the_cli_until_rebuild(tmp_path):
  _corpus(tmp_path, _prose_files())
  first = _cli(tmp_path, *_BASE)
  assert first.returncode == 0, first.stderr[-3000:]
  data = tmp_path / 'data'
  before = {p: (data / p).read_bytes() for p in ('DONE', 'data_report.json', 'tokenizer.model')}
  (tmp_path / 'corpus' / 'doc2.txt').write_text('edited in place: ' + _prose(20))
  _assert_user_error(_cli(tmp_path, *_BASE), 'corpus/doc2.txt', '--rebuild')
  assert {p: (data / p).read_bytes() for p in before} == before
  debug = _cli(tmp_path, *_BASE, '--debug')
  assert debug.returncode != 0 and 'Traceback' in debug.stderr
  rebuilt = _cli(tmp_path, *_BASE, '--rebuild')
  assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
  assert (data / 'DONE').read_bytes() != before['DONE']
  again = _cli(tmp_path, *_BASE)
  assert again.returncode == 0 and 'reusing it' in again.stdout
