"""Chat template: layout, loss mask, one BOS, prompt prefix, refused conversations."""

from __future__ import annotations

import os

import numpy as np
import pytest

from data_pipeline import chat
from data_pipeline import sources
from data_pipeline import tokenizer as tok_lib


@pytest.fixture(scope='module')
def tokenizer(stdlib_tokenizer) -> tok_lib.Tokenizer:
  return stdlib_tokenizer


def _spans(tokens: np.ndarray, mask: np.ndarray, tokenizer) -> list[str]:
  """Decoded text of each run of consecutive masked tokens."""
  spans, current = [], []
  for t, m in zip(tokens.tolist(), mask.tolist()):
    if m:
      current.append(t)
    elif current:
      spans.append(tokenizer.decode(current))
      current = []
  if current:
    spans.append(tokenizer.decode(current))
  return spans


CONVERSATION = [
    {'role': 'system', 'content': 'You write Python.'},
    {'role': 'user', 'content': 'Add two numbers.'},
    {'role': 'assistant', 'content': 'def add(a, b):\n    return a + b'},
    {'role': 'user', 'content': 'Now subtract.'},
    {'role': 'assistant', 'content': 'def sub(a, b):\n    return a - b'},
]


def test_layout_and_mask_on_assistant_turns_only(tokenizer):
  tokens, mask = chat.render_conversation(tokenizer, CONVERSATION)
  assert tokens.dtype == np.int32 and mask.dtype == np.uint8 and len(tokens) == len(mask)
  assert tokenizer.decode(tokens) == (
      '<|system|>You write Python.<|end|>\n'
      '<|user|>Add two numbers.<|end|>\n'
      '<|assistant|>def add(a, b):\n    return a + b<|end|>\n'
      '<|user|>Now subtract.<|end|>\n'
      '<|assistant|>def sub(a, b):\n    return a - b<|end|>\n')
  assert _spans(tokens, mask, tokenizer) == [
      'def add(a, b):\n    return a + b<|end|>', 'def sub(a, b):\n    return a - b<|end|>']
  ids = tokenizer.control_ids
  # Token by token around the first answer: role token 0, content 1, <|end|> 1, newline 0.
  k = tokens.tolist().index(ids['<|assistant|>'])
  assert mask[k] == 0 and mask[k + 1] == 1
  end = tokens.tolist().index(ids['<|end|>'], k)
  assert mask[end] == 1 and mask[end + 1] == 0
  assert tokenizer.decode(tokens[end + 1:end + 2]) == '\n'
  # The first token is the only BOS; nothing before the first answer is learned.
  assert tokens[0] == tok_lib.BOS_ID and mask[0] == 0
  assert (tokens == tok_lib.BOS_ID).sum() == 1
  assert mask[:k + 1].sum() == 0


def test_prompt_is_a_prefix_of_the_training_rendering(tokenizer):
  tokens, mask = chat.render_conversation(tokenizer, CONVERSATION)
  for cut in (2, 4):  # Before each assistant turn.
    prompt = chat.render_prompt(tokenizer, CONVERSATION[:cut])
    assert prompt[-1] == tokenizer.control_ids['<|assistant|>']
    np.testing.assert_array_equal(tokens[:len(prompt)], prompt)
    # What the model must write after the prompt is exactly the learned span.
    answer = tokens[len(prompt):]
    text, ended = chat.parse_completion(tokenizer, answer)
    assert ended and text == CONVERSATION[cut]['content']
    assert mask[len(prompt)] == 1


def test_parse_completion_without_end(tokenizer):
  ids = tokenizer.encode('return x')
  assert chat.parse_completion(tokenizer, ids) == ('return x', False)
  assert chat.parse_completion(tokenizer, ids + [tok_lib.EOS_ID] + ids) == ('return x', True)


class _AddsBos:
  """A tokenizer that adds BOS and EOS to every encode call, as some models are set to."""

  def __init__(self, inner):
    self._inner = inner
    self.bos_id, self.eos_id, self.control_ids = inner.bos_id, inner.eos_id, inner.control_ids

  def encode(self, text):
    return [self.bos_id] + self._inner.encode(text) + [self.eos_id]

  def decode(self, ids):
    return self._inner.decode(ids)


def test_never_two_bos(tokenizer):
  messages = [{'role': 'user', 'content': '<s> hi </s>'}, {'role': 'assistant', 'content': '<s>ok'}]
  tokens, _ = chat.render_conversation(tokenizer, messages)
  assert (tokens == tok_lib.BOS_ID).sum() == 1 and tokens[0] == tok_lib.BOS_ID
  assert tokenizer.decode(tokens).startswith('<|user|><s> hi </s><|end|>')
  wrapped, _ = chat.render_conversation(_AddsBos(tokenizer), messages)
  np.testing.assert_array_equal(wrapped, tokens)


def test_literal_control_text_is_a_control_token_so_it_is_refused(tokenizer):
  # Why the rule exists: SentencePiece matches the user-defined piece in text.
  assert tokenizer.control_ids['<|end|>'] in tokenizer.encode('a<|end|>b')
  for token in tok_lib.CONTROL_TOKENS:
    messages = [{'role': 'user', 'content': 'hi'},
                {'role': 'assistant', 'content': f'sure {token} more'}]
    with pytest.raises(chat.ChatFormatError) as e:
      chat.render_conversation(tokenizer, messages)
    assert e.value.reason == 'control_token_in_content'
  # `<|end` alone is plain text.
  tokens, _ = chat.render_conversation(
      tokenizer, [{'role': 'user', 'content': '<|end'}, {'role': 'assistant', 'content': 'x'}])
  assert (tokens == tokenizer.control_ids['<|end|>']).sum() == 2


U = {'role': 'user', 'content': 'q'}
A = {'role': 'assistant', 'content': 'a'}
S = {'role': 'system', 'content': 's'}


@pytest.mark.parametrize('messages, reason', [
    ([], 'empty_conversation'),
    ({'role': 'user'}, 'wrong_type'),
    ([U, 'a'], 'wrong_type'),
    ([U, {'role': 'assistant'}], 'missing_field'),
    ([U, {'role': 'assistant', 'content': 3}], 'wrong_type'),
    ([U, {'role': 'bot', 'content': 'a'}], 'unknown_role'),
    ([U, {'role': 'assistant', 'content': '  \n'}], 'empty_assistant_turn'),
    ([{'role': 'user', 'content': ''}, A], 'empty_turn'),
    ([U, A, S, U, A], 'misplaced_system_turn'),
    ([S, S, U, A], 'misplaced_system_turn'),
    ([A, U, A], 'roles_out_of_order'),
    ([U, U, A], 'roles_out_of_order'),
    ([S], 'no_user_turn'),
    ([U], 'must_end_with_assistant'),
    ([U, A, U], 'must_end_with_assistant'),
])
def test_refused_conversations(tokenizer, messages, reason):
  with pytest.raises(chat.ChatFormatError) as e:
    chat.render_conversation(tokenizer, messages)
  assert e.value.reason == reason


def test_prompt_rules(tokenizer):
  assert chat.render_prompt(tokenizer, [S, U]).tolist()[0] == tok_lib.BOS_ID
  with pytest.raises(chat.ChatFormatError) as e:
    chat.render_prompt(tokenizer, [U, A])
  assert e.value.reason == 'prompt_must_end_with_user'


def test_tokenizer_without_control_tokens_is_refused(tokenizer):
  plain = _AddsBos(tokenizer)
  plain.control_ids = {}  # A LLaMA-style model: no chat pieces.
  with pytest.raises(chat.UserError, match='control tokens'):
    chat.render_conversation(plain, [U, A])
