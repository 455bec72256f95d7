"""Fixtures shared by several test files."""

from __future__ import annotations

import os

import pytest

from data_pipeline import sources
from data_pipeline import tokenizer as tok_lib


@pytest.fixture(scope='session')
def stdlib_tokenizer(tmp_path_factory) -> tok_lib.Tokenizer:
  """A 600-piece SentencePiece model (with the chat control tokens) on three stdlib files."""
  root = sources.stdlib_root()
  texts = []
  for rel in ('textwrap.py', 'json/decoder.py', 'shlex.py'):
    with open(os.path.join(root, rel), encoding='utf-8') as f:
      texts.append(f.read())
  prefix = str(tmp_path_factory.mktemp('tok') / 'tok')
  return tok_lib.Tokenizer.load(tok_lib.train_tokenizer(texts, prefix, 600))
