"""Split: by a hash of the id, stable as the corpus grows, same in every process."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest

from data_pipeline import split
from data_pipeline.sources import Document


def _docs(ids):
  return [Document(i, f'text of {i}', 't') for i in ids]


def test_split_of_a_document_unchanged_when_others_are_added():
  before = split.split_documents(_docs(f'file:a/{i}.txt' for i in range(300)))
  grown = _docs(f'file:a/{i}.txt' for i in range(300)) + _docs(f'new:{i}' for i in range(3000))
  grown.reverse()  # Order must not matter either.
  after = split.split_documents(grown)
  where_after = {d.id: name for name, docs in after.items() for d in docs}
  for name, docs in before.items():
    for doc in docs:
      assert where_after[doc.id] == name


def test_fractions_match_the_config():
  counts = collections.Counter(split.assign_split(f'doc{i}') for i in range(20000))
  assert 0.97 < counts['train'] / 20000 < 0.99
  assert 150 < counts['validation'] < 250 and 150 < counts['test'] < 250
  counts = collections.Counter(split.assign_split(f'doc{i}', 0.2, 0.3) for i in range(5000))
  assert abs(counts['validation'] / 5000 - 0.2) < 0.03 and abs(counts['test'] / 5000 - 0.3) < 0.03


def test_every_split_present_even_when_empty():
  assert set(split.split_documents([])) == {'train', 'validation', 'test'}


def test_same_split_in_another_process():
  """No dependence on Python's per-process string hash seed."""
  ids = [f'stdlib:mod{i}.py' for i in range(200)]
  here = [split.assign_split(i, 0.3, 0.3) for i in ids]
  code = ('import sys; from data_pipeline import split; '
          f'print(",".join(split.assign_split(i, 0.3, 0.3) for i in {ids!r}))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       env=dict(os.environ, PYTHONHASHSEED='123'),
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.stdout.strip().split(',') == here


def test_bad_fractions_rejected():
  with pytest.raises(ValueError, match='fractions'):
    split.assign_split('x', 0.6, 0.5)
