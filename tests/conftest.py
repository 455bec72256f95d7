"""Fixtures shared by several test files."""

from __future__ import annotations

import os
import shutil
import tempfile

# One XLA compilation cache for the whole test run, in-process and in the
# subprocesses tests start (they inherit the environment): many tests build the
# same tiny programs (a `tiny` train step, a sampler), and each new jit of one
# would otherwise compile it again. Keyed by the program and the compile options,
# so a hit is the program XLA would have built; removed when the run ends.
# A directory given in the environment is used as it is, and kept.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='strata-test-xla-cache-')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')

import jax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))

from data_pipeline import sources  # pylint: disable=wrong-import-position
from data_pipeline import tokenizer as tok_lib  # pylint: disable=wrong-import-position


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


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  if _OWN_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
