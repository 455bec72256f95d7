"""Instruction data: the three JSONL formats, skipped records, and the stdlib builder."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import textwrap

import json.decoder
import numpy as np
import pytest

from configs.cli import UserError
from configs import data as data_config
from configs import dpo as dpo_config
from configs import reward as reward_config
from configs import sft as sft_config
from data_pipeline import instructions
from data_pipeline import pipeline
from data_pipeline import preference_data
from data_pipeline import sft_data
from data_pipeline import sources
from data_pipeline import split as split_lib
from data_pipeline import stdlib_instructions
from data_pipeline import tokenizer as tok_lib


@pytest.fixture(scope='module')
def tokenizer(stdlib_tokenizer) -> tok_lib.Tokenizer:
  return stdlib_tokenizer


def _spans(record: dict, tokenizer) -> list[str]:
  """Decoded text of each run of consecutive tokens with loss mask 1."""
  spans, current = [], []
  for t, m in zip(record['tokens'].tolist(), record['loss_mask'].tolist()):
    if m:
      current.append(t)
    elif current:
      spans.append(tokenizer.decode(current))
      current = []
  return spans + ([tokenizer.decode(current)] if current else [])


def _write_lines(path, lines: list[str | bytes]) -> str:
  with open(path, 'wb') as f:
    f.write(b'\n'.join(x if isinstance(x, bytes) else x.encode('utf-8') for x in lines))
  return str(path)


# ----------------------------------------------------------------------------
# User files.


def test_three_formats_mask_exactly_the_answers(tokenizer, tmp_path):
  path = _write_lines(tmp_path / 'chat.jsonl', [
      json.dumps({'messages': [
          {'role': 'system', 'content': 'Be brief.'},
          {'role': 'user', 'content': 'Name a prime.'},
          {'role': 'assistant', 'content': 'Seven.'},
          {'role': 'user', 'content': 'Another?'},
          {'role': 'assistant', 'content': 'Eleven.'}]}),
      json.dumps({'prompt': 'Say hi.', 'completion': 'hi'}),
      json.dumps({'instruction': 'Add these.', 'input': '2 and 3', 'output': '5'}),
      json.dumps({'instruction': 'Say no.', 'output': 'no'}),
  ])
  records, report = instructions.read_instruction_files(
      path, tokenizer, 512, validation=0.0, test=0.0)
  train = records['train']
  assert [r['where'] for r in train] == [f'{path}:{k}' for k in (1, 2, 3, 4)]
  assert [_spans(r, tokenizer) for r in train] == [
      ['Seven.<|end|>', 'Eleven.<|end|>'], ['hi<|end|>'], ['5<|end|>'], ['no<|end|>']]
  assert tokenizer.decode(train[2]['tokens']) == (
      '<|user|>Add these.\n\n2 and 3<|end|>\n<|assistant|>5<|end|>\n')
  for k, r in enumerate(train, start=1):
    assert r['tokens'][0] == tok_lib.BOS_ID and (r['tokens'] == tok_lib.BOS_ID).sum() == 1
    assert r['split'] == 'train' and r['id'] == f'file:{path}#{k}'
  assert report['candidates'] == 4 and report['kept'] == 4 and report['skipped'] == {}
  assert report['splits']['train']['loss_tokens'] == sum(int(r['loss_mask'].sum()) for r in train)


def test_malformed_records_are_counted_with_reason_and_line(tokenizer, tmp_path):
  good = json.dumps({'prompt': 'Say hi.', 'completion': 'hi'})
  lines = [
      good,                                                            # 1 kept
      '{"prompt": "unterminated',                                      # 2 bad_json
      json.dumps({'messages': [{'role': 'user', 'content': 'q'},
                               {'role': 'robot', 'content': 'a'}]}),   # 3 unknown_role
      json.dumps({'prompt': 'q', 'completion': '   '}),                # 4 empty_assistant_turn
      json.dumps({'prompt': ['q'], 'completion': 'a'}),                # 5 wrong_type
      json.dumps({'messages': [{'role': 'user', 'content': 'q'},
                               {'role': 'assistant', 'content': 7}]}), # 6 wrong_type
      json.dumps({'prompt': 'q'}),                                     # 7 missing_field
      json.dumps({'instruction': 'q', 'input': 'x'}),                  # 8 missing_field
      json.dumps({'prompt': 'q', 'completion': 'a <|end|> <|user|>x'}),  # 9 control token
      json.dumps({'text': 'plain'}),                                   # 10 unknown_format
      json.dumps(['q', 'a']),                                          # 11 wrong_type
      '',                                                              # 12 blank: no record
      json.dumps({'messages': [{'role': 'assistant', 'content': 'a'}]}),  # 13 roles_out_of_order
      b'{"prompt": "caf\xe9", "completion": "a"}',                      # 14 not_utf8
      json.dumps({'prompt': 'q', 'completion': 'a', 'messages': []}),  # 15 ambiguous_format
      json.dumps({'messages': [{'role': 'user', 'content': 'q'}]}),    # 16 must_end_with_assistant
  ]
  path = _write_lines(tmp_path / 'bad.jsonl', lines)
  _, report = instructions.read_instruction_files(path, tokenizer, 512)
  assert report['skipped'] == {
      'bad_json': 1, 'unknown_role': 1, 'empty_assistant_turn': 1, 'wrong_type': 3,
      'missing_field': 2, 'control_token_in_content': 1, 'unknown_format': 1,
      'roles_out_of_order': 1, 'not_utf8': 1, 'ambiguous_format': 1,
      'must_end_with_assistant': 1}
  assert report['candidates'] == 15 and report['kept'] == 1
  assert report['candidates'] == report['kept'] + report['skipped_total']
  where = {e.split(': ', 1)[0]: (reason, e) for reason, listed in report['skipped_examples'].items()
           for e in listed}
  expected_lines = {2: 'bad_json', 3: 'unknown_role', 4: 'empty_assistant_turn', 5: 'wrong_type',
                    6: 'wrong_type', 7: 'missing_field', 8: 'missing_field',
                    9: 'control_token_in_content', 10: 'unknown_format', 11: 'wrong_type',
                    13: 'roles_out_of_order', 14: 'not_utf8', 15: 'ambiguous_format',
                    16: 'must_end_with_assistant'}
  assert sorted(where) == sorted(f'{path}:{k}' for k in expected_lines)
  for line, reason in expected_lines.items():
    assert where[f'{path}:{line}'][0] == reason
    assert where[f'{path}:{line}'][1].startswith(f'{path}:{line}: ')  # and a detail


def test_cleaning_dedup_and_length(tokenizer, tmp_path):
  same = json.dumps({'prompt': 'Who to ask?', 'completion': 'Write to ada@example.com today.'})
  long = json.dumps({'prompt': 'Count.', 'completion': ' '.join(str(i) for i in range(400))})
  # The same conversation re-wrapped counts as a duplicate too.
  rewrapped = json.dumps({'prompt': 'Who  to\nask?',
                          'completion': 'Write to ada@example.com today.'})
  decomposed = json.dumps({'prompt': 'Cafe\u0301?', 'completion': 'Yes.'})
  path = _write_lines(tmp_path / 'c.jsonl', [same, same, long, rewrapped, decomposed])
  records, report = instructions.read_instruction_files(path, tokenizer, 128,
                                                        validation=0.0, test=0.0)
  assert [r['where'] for r in records['train']] == [f'{path}:1', f'{path}:5']
  assert records['train'][0]['messages'][1]['content'] == 'Write to <EMAIL> today.'
  assert records['train'][1]['messages'][0]['content'] == 'Caf\u00e9?'  # NFC
  assert report['examples_changed_by_cleaning'] == 4
  assert report['pii_replacements'] == {'EMAIL': 3}
  assert report['skipped'] == {'duplicate': 2, 'too_long': 1}
  [listed] = report['skipped_examples']['too_long']
  # Digits are split, so the 1,090 digits alone are over a thousand tokens.
  assert re.fullmatch(re.escape(f'{path}:3: ') + r'1\d{3} tokens > seq_len=128', listed), listed


def test_split_by_document_id_and_duplicates_keep_the_train_copy(tokenizer, tmp_path):
  n = 40
  path = str(tmp_path / 's.jsonl')
  splits = [split_lib.assign_split(f'file:{path}#{k}', 0.3, 0.3) for k in range(1, n + 1)]
  held_out = splits.index('test') + 1
  train = splits.index('train') + 1
  lines = [json.dumps({'prompt': f'q{k}', 'completion': f'a{k}'}) for k in range(1, n + 1)]
  twin = json.dumps({'prompt': 'twin', 'completion': 'twin'})
  lines[held_out - 1] = lines[train - 1] = twin
  _write_lines(path, lines)
  records, report = instructions.read_instruction_files(path, tokenizer, 128,
                                                        validation=0.3, test=0.3)
  for name, split_records in records.items():
    for r in split_records:
      assert r['split'] == name == splits[int(r['where'].rsplit(':', 1)[1]) - 1]
  twins = [r['where'] for rs in records.values() for r in rs
           if r['messages'][0]['content'] == 'twin']
  assert twins == [f'{path}:{train}']
  assert report['skipped'] == {'duplicate': 1}
  assert {k: v['examples'] for k, v in report['splits'].items()} == {
      name: splits.count(name) - (name == 'test') for name in split_lib.SPLITS}


def test_nothing_usable_is_an_error(tokenizer, tmp_path):
  path = _write_lines(tmp_path / 'x.jsonl', ['{bad', '{"prompt": 1}'])
  with pytest.raises(UserError, match=r'No usable instruction record.*bad_json'):
    instructions.read_instruction_files(path, tokenizer, 128)
  with pytest.raises(UserError, match='matches no file'):
    instructions.read_instruction_files(str(tmp_path / 'none*.jsonl'), tokenizer, 128)


# ----------------------------------------------------------------------------
# The stdlib builder.

SYNTHETIC = '''\
"""A module written for the test: one function per rule."""
import functools


def area(width, height):
    """Return the area of a width by height rectangle."""
    return width * height


def no_doc(x):
    return x


def _private(x):
    """A private helper that doubles x."""
    return 2 * x


def short(x):
    """Short."""
    return x


def outer(x):
    """Return a function that adds x to its argument."""
    def inner(y):
        """Add the captured x to y."""
        return x + y
    return inner


class Shape:
    """A shape."""

    def __init__(self, sides):
        """Store the number of sides of the shape."""
        self.sides = sides

    @functools.lru_cache(maxsize=None)
    def perimeter(self, length):
        """Return the perimeter for sides of equal length."""
        return self.sides * length

    def usage(self):
        """Return the usage text of the shape class."""
        return """usage:
  shape --sides N
"""


class _Hidden:
    def visible(self):
        """A public method of a private class."""
        return 1


def contact():
    """Return the address to write to for help."""
    return "help@example.com"


if True:
    def twin(a):
        """Return a unchanged, whatever it is."""
        return a
else:
    def twin(a):
        """Return a unchanged, whatever it is."""
        return a


def marker():
    """Return the marker <|end|> that ends a chat turn."""
    return 0


def big():
    """Return a long list of numbers."""
    return [
''' + '        12345,\n' * 300 + '    ]\n'


def test_stdlib_rules_counted_on_a_synthetic_module(tokenizer, tmp_path):
  (tmp_path / 'mymod.py').write_text(SYNTHETIC)
  (tmp_path / 'test').mkdir()
  (tmp_path / 'test' / 'test_mymod.py').write_text(
      'def test_area():\n    """Check the area of a unit square."""\n')
  records, report = stdlib_instructions.build_stdlib_instructions(
      tokenizer, 384, validation=0.0, test=0.0, root=str(tmp_path))
  kept = {r['function_name']: r for r in records['train']}
  assert sorted(kept) == sorted(['area', 'outer', 'Shape.perimeter', 'Shape.usage',
                                 'contact', 'twin'])
  assert report['skipped'] == {
      'no_docstring': 1, 'private_name': 2, 'short_docstring': 1, 'nested_function': 1,
      'dunder_name': 1, 'duplicate': 1, 'control_token_in_content': 1, 'too_long': 1}
  assert report['candidates'] == 15 == report['kept'] + report['skipped_total']
  assert report['modules']['test_module'] == 1 and report['modules']['parsed'] == 1

  def answer(name):
    return kept[name]['messages'][1]['content']

  assert answer('Shape.perimeter') == (
      '@functools.lru_cache(maxsize=None)\n'
      'def perimeter(self, length):\n'
      '    """Return the perimeter for sides of equal length."""\n'
      '    return self.sides * length')
  # A string at column 0 keeps its text; the rest loses the method's indentation.
  assert answer('Shape.usage') == (
      'def usage(self):\n'
      '    """Return the usage text of the shape class."""\n'
      '    return """usage:\n'
      '  shape --sides N\n'
      '"""')
  assert answer('contact').endswith('return "<EMAIL>"')
  assert report['pii_replacements'] == {'EMAIL': 1}
  request = kept['Shape.perimeter']['messages'][0]['content']
  assert 'def perimeter(self, length)' in request and '`Shape`' in request
  assert 'lru_cache' in request and 'Return the perimeter for sides of equal length.' in request
  assert kept['twin']['id'] == 'stdlib:mymod.py:twin'
  assert all(r['module'] == 'mymod.py' for r in kept.values())
  path = instructions.write_report(report, str(tmp_path / 'out'))
  with open(path) as f:
    assert json.load(f)['skipped'] == report['skipped']


# Real stdlib modules (ids as in pre-training), with large held-out fractions so
# every split has some.
MODULES = ('textwrap.py', 'json/decoder.py', 'json/encoder.py', 'json/scanner.py',
           'shlex.py', 'string.py', 'fnmatch.py', 'colorsys.py', 'glob.py', 'bisect.py',
           'heapq.py', 'calendar.py', 'base64.py', 'difflib.py', 'getopt.py', 'netrc.py')


@pytest.fixture(scope='module')
def stdlib_build(tokenizer, tmp_path_factory):
  root = tmp_path_factory.mktemp('stdlib')
  for rel in MODULES:
    os.makedirs(root / os.path.dirname(rel), exist_ok=True)
    shutil.copy(os.path.join(sources.stdlib_root(), rel), root / rel)
  return stdlib_instructions.build_stdlib_instructions(
      tokenizer, 2048, validation=0.25, test=0.25, root=str(root))


def test_stdlib_split_follows_the_module(stdlib_build):
  records, report = stdlib_build
  by_split = {name: {r['module'] for r in rs} for name, rs in records.items()}
  for rel in MODULES:  # Independent of the builder: where pre-training puts the module.
    expected = split_lib.assign_split(f'stdlib:{rel}', 0.25, 0.25)
    for name, modules in by_split.items():
      assert (rel in modules) <= (name == expected), (rel, name)
  assert all(by_split.values()), by_split  # Every split has examples.
  assert not by_split['test'] & by_split['train']
  assert report['candidates'] == report['kept'] + report['skipped_total']
  assert report['kept'] == sum(len(rs) for rs in records.values())
  assert report['modules']['with_examples'] == {k: len(v) for k, v in by_split.items()}


def test_known_stdlib_functions_have_their_exact_source(stdlib_build):
  records, _ = stdlib_build
  by_name = {(r['module'], r['function_name']): r for rs in records.values() for r in rs}
  for module, function, obj in (('textwrap.py', 'dedent', textwrap.dedent),
                                ('json/decoder.py', 'JSONDecoder.raw_decode',
                                 json.decoder.JSONDecoder.raw_decode)):
    assert inspect.getsourcefile(obj) == os.path.join(sources.stdlib_root(), module)
    record = by_name[(module, function)]
    request, answer = (m['content'] for m in record['messages'])
    assert answer == textwrap.dedent(inspect.getsource(obj)).rstrip('\n')
    assert function.split('.')[-1] in request
    assert inspect.getdoc(obj).splitlines()[0] in request
    assert record['id'] == f'stdlib:{module}:{function}'
    assert isinstance(record['tokens'], np.ndarray) and record['loss_mask'].sum() > len(answer) // 8


def _pretraining_workdir(tmp_path, tokenizer, kind: str, validation: float, test: float) -> str:
  """A pre-training data workdir as data_pipeline writes it: tokenizer.model, data_config.json."""
  workdir = tmp_path / 'data'
  workdir.mkdir()
  shutil.copy(tokenizer.path, workdir / 'tokenizer.model')
  config = data_config.get_config(kind)
  config.split.validation, config.split.test = validation, test
  with open(workdir / pipeline.CONFIG, 'w', encoding='utf-8') as f:
    json.dump(config.to_dict(), f)  # As data_pipeline/pipeline.py writes it.
  return str(workdir / 'tokenizer.model')


def test_held_out_fractions_past_pretrainings_are_refused_before_anything_is_written(
    tokenizer, tmp_path):
  # Pre-training held out 1% + 1%: with 2% + 4% here a module hashed to 0.03
  # is a test function but was a pre-training train document.
  tokenizer_path = _pretraining_workdir(tmp_path, tokenizer, 'stdlib', 0.01, 0.01)
  with pytest.raises(UserError, match=r'data.validation=0.02 \+ data.test=0.04 hold out more'):
    stdlib_instructions.check_held_out(tokenizer_path, 0.02, 0.04)
  for workdir, prepare in (('sft', sft_data.prepare), ('pref', preference_data.prepare)):
    with pytest.raises(UserError, match='pre-training data did'):
      prepare(str(tmp_path / workdir), tokenizer_path, seq_len=256, validation=0.02, test=0.04)
    assert not os.path.exists(tmp_path / workdir)
  # Equal or smaller sums hold out only modules pre-training held out too.
  stdlib_instructions.check_held_out(tokenizer_path, 0.01, 0.01)
  stdlib_instructions.check_held_out(tokenizer_path, 0.02, 0.0)


def test_held_out_check_needs_a_stdlib_pretraining_config(tokenizer, tmp_path):
  stdlib_instructions.check_held_out(tokenizer.path, 0.2, 0.2)  # No data_config.json beside it.
  files = _pretraining_workdir(tmp_path, tokenizer, 'files', 0.01, 0.01)
  stdlib_instructions.check_held_out(files, 0.2, 0.2)  # Another corpus: nothing to compare.


def test_post_training_presets_hold_out_exactly_pretrainings_modules():
  """Every shipped stage's held-out split is pre-training's held-out split of the same name."""
  pretraining = data_config.get_config('stdlib').split
  for module in (sft_config, reward_config, dpo_config):
    data = module.get_config('tiny').data
    assert (data.validation, data.test) == (pretraining.validation, pretraining.test), module
