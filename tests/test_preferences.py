"""Preference data: the formats users bring, the corruptions, the pair layout, packing."""

from __future__ import annotations

import ast
import json

import numpy as np
import pytest

from data_pipeline import chat
from data_pipeline import loader as loader_lib
from data_pipeline import preference_data
from data_pipeline import preferences

FUNCTION = '''def add_one(x):
    """Return x plus one."""
    y = x + 1
    return y
'''
OTHER = '''def shout(text):
    """Upper-case the text."""
    loud = text.upper()
    return loud + '!'
'''


def test_formats():
  [pair] = preferences.record_pairs({'prompt': 'Write it.', 'chosen': 'good', 'rejected': 'bad',
                                     'margin': 2, 'kind': 'k'})
  assert pair['prompt'] == [{'role': 'user', 'content': 'Write it.'}]
  assert (pair['chosen'], pair['rejected'], pair['margin'], pair['kind']) == ('good', 'bad', 2.0,
                                                                             'k')
  # TRL's conversational form: messages, answers as one assistant message.
  prompt = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
  [pair] = preferences.record_pairs({
      'prompt': prompt, 'chosen': [{'role': 'assistant', 'content': 'Hello'}],
      'rejected': [{'role': 'assistant', 'content': 'Go away'}]})
  assert pair['prompt'] == prompt and pair['chosen'] == 'Hello'
  # Whole conversations without a prompt: the shared turns are the prompt.
  [pair] = preferences.record_pairs({
      'chosen': prompt + [{'role': 'assistant', 'content': 'Hello'}],
      'rejected': prompt + [{'role': 'assistant', 'content': 'Go away'}]})
  assert pair['prompt'] == prompt and pair['rejected'] == 'Go away'
  # A ranking of three expands to the three ordered pairs, best first.
  pairs = preferences.record_pairs({'prompt': 'Q', 'responses': ['a', 'b', 'c'],
                                    'ranking': [2, 0, 1]})
  assert [(p['chosen'], p['rejected']) for p in pairs] == [('c', 'a'), ('c', 'b'), ('a', 'b')]


@pytest.mark.parametrize('record, reason', [
    ({'prompt': 'Q', 'chosen': 'a'}, 'missing_field'),
    ({'chosen': 'a', 'rejected': 'b'}, 'missing_field'),
    ({'prompt': 'Q', 'chosen': 'same', 'rejected': 'same'}, 'identical_responses'),
    ({'prompt': 'Q', 'chosen': 'a', 'rejected': ''}, 'empty_assistant_turn'),
    ({'prompt': 'Q', 'chosen': 'a', 'rejected': 3}, 'wrong_type'),
    ({'prompt': 'Q', 'chosen': 'a', 'rejected': 'b', 'margin': 'big'}, 'wrong_type'),
    ({'prompt': 'Q', 'responses': ['a', 'b'], 'ranking': [0, 0]}, 'bad_ranking'),
    ({'prompt': 'Q', 'responses': ['a'], 'ranking': [0]}, 'bad_ranking'),
    ({'prompt': [{'role': 'assistant', 'content': 'x'}], 'chosen': 'a', 'rejected': 'b'},
     'roles_out_of_order'),
    ({'prompt': 'Q', 'chosen': 'a <|end|> b', 'rejected': 'b'}, 'control_token_in_content'),
])
def test_malformed_records_have_reasons(record, reason):
  with pytest.raises(chat.ChatFormatError) as e:
    preferences.record_pairs(record)
  assert e.value.reason == reason


def test_layout(stdlib_tokenizer):
  pair = {'prompt': [{'role': 'user', 'content': 'Write add_one.'}], 'chosen': FUNCTION,
          'rejected': 'def add_one(x): pass', 'margin': 1.5}
  fields = preferences.render_pair(stdlib_tokenizer, pair)
  n = len(fields['tokens'])
  assert all(len(fields[k]) == n for k in preferences.FIELDS)
  end = chat.control_ids(stdlib_tokenizer)[chat.END]
  prompt_ids = chat.render_prompt(stdlib_tokenizer, pair['prompt'])
  for row, mask, answer in (('tokens', 'chosen_mask', FUNCTION),
                            ('rejected', 'rejected_mask', pair['rejected'])):
    ids, m = fields[row], fields[mask]
    np.testing.assert_array_equal(ids[:len(prompt_ids)], prompt_ids)   # the shared prompt
    on = np.nonzero(m)[0]
    assert on[0] == len(prompt_ids) and np.all(np.diff(on) == 1)       # contiguous answer
    assert ids[on[-1]] == end                                           # ending at <|end|>
    assert stdlib_tokenizer.decode(ids[on[:-1]].tolist()) == answer
    assert not m[on[-1] + 1:].any()                                     # none on pad/separator
  # The shorter (rejected) row is right-padded with 0 to the chosen row's length.
  assert fields['rejected'][-1] == preferences.PAD_ID
  assert set(fields['margin'].tolist()) == {1500}


def test_corruptions():
  names = {}
  for kind in preferences.KINDS:
    out = preferences.corrupt(kind, FUNCTION, 'add_one', f'x|{kind}', OTHER, 'shout')
    assert out is not None and out != FUNCTION, kind
    names[kind] = out
  assert not _parses(names['syntax'])
  assert len(names['truncated']) < len(FUNCTION) and FUNCTION.startswith(names['truncated'][:-1])
  tree = ast.parse(names['renamed'])
  assert tree.body[0].name == 'shout'
  assert names['wrong_body'].startswith('def add_one(x):\n') and 'upper()' in names['wrong_body']
  assert sorted(names['shuffled'].splitlines()) == sorted(FUNCTION.splitlines())
  assert names['shuffled'].splitlines()[0] == 'def add_one(x):'
  # A one-line function has no body lines to shuffle nor to swap.
  assert preferences.corrupt('shuffled', 'def f(): return 1\n', 'f', 'k', OTHER, 'g') is None
  with pytest.raises(ValueError, match='unknown corruption'):
    preferences.corrupt('nonsense', FUNCTION, 'add_one', 'k', OTHER, 'shout')


def _parses(text):
  try:
    ast.parse(text)
    return True
  except SyntaxError:
    return False


def test_prepare_from_files_counts_skips_and_packs_pairs_whole(stdlib_tokenizer, tmp_path):
  lines = []
  for i in range(40):
    lines.append(json.dumps({'prompt': f'Write f{i}.', 'chosen': f'def f{i}(x):\n    return {i}',
                             'rejected': f'def f{i}(x)\n    return', 'kind': 'syntax'}))
  lines.append(json.dumps({'prompt': 'Rank', 'responses': ['best', 'mid', 'worst'],
                           'ranking': [0, 1, 2]}))
  lines += ['not json', json.dumps({'prompt': 'Q', 'chosen': 'a', 'rejected': 'a'}),
            json.dumps({'prompt': 'word ' * 400, 'chosen': 'a', 'rejected': 'b'}),
            json.dumps({'prompt': 'Q', 'chosen': 'long ' * 400, 'rejected': 'b'}),
            lines[0]]   # an exact duplicate
  path = tmp_path / 'prefs.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  tokenizer_path = tmp_path / 'tok.model'
  tokenizer_path.write_bytes(open(stdlib_tokenizer.path, 'rb').read())
  workdir = str(tmp_path / 'data')
  report = preference_data.prepare(workdir, str(tokenizer_path), source='files',
                                   paths=str(path), seq_len=128, validation=0.2, test=0.2)
  assert report['candidates'] == 46
  assert report['skipped'] == {'bad_json': 1, 'duplicate': 1, 'identical_responses': 1,
                               'prompt_too_long': 1, 'too_long': 1}
  assert report['kept'] == 40 + 3
  pairs = sum((open(preference_data.pairs_file(workdir, s)).read().splitlines()
               for s in ('train', 'validation', 'test')), [])
  assert len(pairs) == 43
  # Packed rows: each segment holds one whole pair, chosen and rejected aligned,
  # and its kind's number on every token (1: 'syntax', the only kind named; 0:
  # the ranking's pairs, which have none).
  assert preference_data.kind_names(workdir) == ('syntax',)
  train_kinds = [json.loads(l).get('kind') for l in
                 open(preference_data.pairs_file(workdir, 'train'))]
  loader = loader_lib.make_loader(workdir, 'train', seq_len=128, batch_size=4, num_epochs=1,
                                  shuffle=False, drop_remainder=False)
  seen = []
  for batch in loader:
    for row in range(4):
      segments = batch['segment_ids'][row]
      for s in set(segments.tolist()) - {0}:
        where = segments == s
        assert batch['chosen_mask'][row][where].any() and batch['rejected_mask'][row][where].any()
        assert batch['positions'][row][where][0] == 0          # starts whole, at its BOS
        assert batch['tokens'][row][where][0] == batch['rejected'][row][where][0]
        assert len(set(batch['kind'][row][where].tolist())) == 1
        seen.append(int(batch['kind'][row][where][0]))
  assert sorted(seen) == sorted(1 if k == 'syntax' else 0 for k in train_kinds)
  # The same settings reuse the data; other settings are refused.
  assert preference_data.prepare(workdir, str(tokenizer_path), source='files', paths=str(path),
                                 seq_len=128, validation=0.2, test=0.2)['kept'] == 43
  with pytest.raises(Exception, match='other settings'):
    preference_data.prepare(workdir, str(tokenizer_path), source='files', paths=str(path),
                            seq_len=64, validation=0.2, test=0.2)
