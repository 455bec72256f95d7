"""Preference pairs: the formats users bring, the corruptions of the embedded default, the layout.

Formats (one JSON object per line; TRL's convention):

  {"prompt": P, "chosen": C, "rejected": R, "margin": m (optional), "kind": k (optional)}
  {"prompt": P, "responses": [C0, C1, ...], "ranking": [i, j, ...]}

P is text (one user turn) or a list of chat messages ending with a user turn.
C and R are text (the assistant's answer) or a list of messages ending with
the assistant's answer: either that one message, or the whole conversation
(the prompt's messages then the answer); without "prompt", two whole
conversations that differ only in their last (assistant) turn give the prompt
themselves. "ranking" lists the indices of "responses" best first (a
permutation of 0..n-1) and expands to all n(n-1)/2 ordered pairs, each better
response chosen over each worse one. "margin" (a number, default 0) is how
much better the chosen one is: the reward model's loss wants
r_chosen - r_rejected above it. "kind" names a category for per-kind
accuracy (`train.score`, and the reward model's and DPO's metrics).

A record that cannot be used raises `chat.ChatFormatError` whose `reason`
the caller counts: missing_field, wrong_type, identical_responses,
bad_ranking, prompt_must_end_with_user, ... (and, when rendered,
prompt_too_long / too_long).

The embedded default (`corrupt`): the chosen response is a real stdlib
function (the SFT answer) and the rejected one a corruption of it, of the
`KINDS`: a syntax break, a truncation, the function renamed away from the
requested name, the body of another function under the right signature, and
its lines shuffled. Each is checked to differ from the original; a syntax
break is checked not to parse.

The layout of one pair as one packed document (`render_pair`): aligned
per-token fields of length T = max(len(chosen), len(rejected)):

  tokens         the chosen conversation's ids (prompt + answer + <|end|>\\n), right-padded
  rejected       the rejected conversation's ids, right-padded
  chosen_mask    1 on the chosen answer's tokens and its <|end|>
  rejected_mask  1 on the rejected answer's tokens and its <|end|>
  margin         the pair's margin in thousandths (the same value on every token)
  kind           the pair's kind as a number, 1 + its index in the dataset's kind
                 names (`preference_data.kind_names`), 0 for none (every token)

Both rows share the document's `segment_ids`/`positions` once packed, so
chosen and rejected are two forward passes over one packing (they can never
attend to each other), a pair is one (row, segment), and the reward is read
at the last masked-in token of each row's segment: its `<|end|>`, never the
padding after it. The chosen row is the `tokens` field so every tool that
reads a dataset's `tokens` (lengths, token counts, the loader) works unchanged.
"""

from __future__ import annotations

import ast
import hashlib
import math
import random
import warnings
from typing import Any

import numpy as np

from data_pipeline import chat

KINDS = ('syntax', 'truncated', 'renamed', 'wrong_body', 'shuffled')
FIELDS = ('rejected', 'chosen_mask', 'rejected_mask', 'margin', 'kind')
MARGIN_SCALE = 1000  # `margin` is stored in thousandths (fields are ints).
PAD_ID = 0

Pair = dict[str, Any]  # {'prompt': messages, 'chosen': str, 'rejected': str, 'margin', 'kind'}


# ----------------------------------------------------------------------------
# Formats.


def parse_prompt(value: Any) -> list[chat.Message]:
  """A prompt field (text or messages ending with a user turn) as validated messages."""
  if isinstance(value, str):
    return chat.validate([{'role': chat.USER, 'content': value}], for_generation=True)
  return chat.validate(value, for_generation=True)


def parse_answer(value: Any, key: str, prompt: list[chat.Message] | None
            ) -> tuple[str, list[chat.Message] | None]:
  """(answer text, the prompt a whole conversation implies or None) of a response field."""
  if isinstance(value, str):
    if not value.strip():
      raise chat.ChatFormatError('empty_assistant_turn', f'{key!r} is empty')
    chat.validate([{'role': chat.USER, 'content': 'x'}, {'role': chat.ASSISTANT,
                                                         'content': value}])
    return value, None
  if not isinstance(value, list) or not value:
    raise chat.ChatFormatError('wrong_type', f'{key!r} must be text or a list of messages')
  last = value[-1]
  if not isinstance(last, dict) or last.get('role') != chat.ASSISTANT:
    raise chat.ChatFormatError('must_end_with_assistant',
                               f'{key!r} must end with an assistant message')
  if len(value) == 1:
    text, _ = parse_answer(last.get('content'), key, prompt)
    return text, None
  messages = chat.validate(value)
  implied = messages[:-1]
  if prompt is not None and implied != prompt:
    raise chat.ChatFormatError('prompt_mismatch',
                               f'the conversation in {key!r} does not start with the prompt')
  return messages[-1]['content'], implied


def _margin(record: dict) -> float:
  margin = record.get('margin', 0.0)
  if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
    raise chat.ChatFormatError('wrong_type', f"'margin' must be a finite number, got {margin!r}")
  return float(margin)


def record_pairs(record: Any) -> list[Pair]:
  """The preference pairs of one JSONL record (see the module docstring), validated."""
  if not isinstance(record, dict):
    raise chat.ChatFormatError('wrong_type', f'a record is a JSON object, got '
                               f'{type(record).__name__}')
  kind = record.get('kind')
  if kind is not None and not isinstance(kind, str):
    raise chat.ChatFormatError('wrong_type', "'kind' must be a string")
  prompt = parse_prompt(record['prompt']) if 'prompt' in record else None
  if 'responses' in record or 'ranking' in record:
    if prompt is None or 'responses' not in record or 'ranking' not in record:
      raise chat.ChatFormatError('missing_field', "a ranking needs 'prompt', 'responses' and "
                                 "'ranking'")
    responses, ranking = record['responses'], record['ranking']
    if not isinstance(responses, list) or len(responses) < 2:
      raise chat.ChatFormatError('bad_ranking', "'responses' must list at least two responses")
    if (not isinstance(ranking, list) or any(isinstance(i, bool) or not isinstance(i, int)
                                             for i in ranking)
        or sorted(ranking) != list(range(len(responses)))):
      raise chat.ChatFormatError('bad_ranking', "'ranking' must list the indices of "
                                 f"'responses' best first, a permutation of 0..{len(responses) - 1}")
    texts = [parse_answer(r, f'responses[{i}]', prompt)[0] for i, r in enumerate(responses)]
    pairs = []
    for a, better in enumerate(ranking):
      for worse in ranking[a + 1:]:
        if texts[better] == texts[worse]:
          raise chat.ChatFormatError('identical_responses',
                                     f'responses {better} and {worse} are identical')
        pairs.append({'prompt': prompt, 'chosen': texts[better], 'rejected': texts[worse],
                      'margin': 0.0, 'kind': kind})
    return pairs
  for key in ('chosen', 'rejected'):
    if key not in record:
      raise chat.ChatFormatError('missing_field', f'no {key!r} field')
  chosen, implied_c = parse_answer(record['chosen'], 'chosen', prompt)
  rejected, implied_r = parse_answer(record['rejected'], 'rejected', prompt)
  if prompt is None:
    if implied_c is None or implied_r is None:
      raise chat.ChatFormatError('missing_field', "no 'prompt' field (and 'chosen'/'rejected' "
                                 'are not whole conversations that imply it)')
    if implied_c != implied_r:
      raise chat.ChatFormatError('prompt_mismatch', "'chosen' and 'rejected' have different "
                                 'prompts')
    prompt = chat.validate(implied_c, for_generation=True)
  if chosen == rejected:
    raise chat.ChatFormatError('identical_responses', 'chosen == rejected')
  return [{'prompt': prompt, 'chosen': chosen, 'rejected': rejected, 'margin': _margin(record),
           'kind': kind}]


# ----------------------------------------------------------------------------
# The layout.


def render_response(tokenizer: chat.ChatTokenizer, prompt_ids: np.ndarray,
                    prompt: list[chat.Message], answer: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) of prompt + answer: mask 1 on the answer and its <|end|> only."""
  tokens, _ = chat.render_conversation(
      tokenizer, prompt + [{'role': chat.ASSISTANT, 'content': answer}])
  n = len(prompt_ids)
  if not np.array_equal(tokens[:n], prompt_ids):
    raise AssertionError('the chat template must render a prompt as a prefix')
  # The answer's tokens and its <|end|> (content never holds an <|end|>, so the
  # first one after the prompt ends it); the separator after it is not learnt.
  end = n + int(np.argmax(tokens[n:] == chat.control_ids(tokenizer)[chat.END]))
  mask = np.zeros(len(tokens), np.int32)
  mask[n:end + 1] = 1
  return tokens.astype(np.int32), mask


def render_pair(tokenizer: chat.ChatTokenizer, pair: Pair, kind_id: int = 0
                ) -> dict[str, np.ndarray]:
  """The aligned fields of one pair (the module docstring's layout), right-padded to one length.

  kind_id: the number the `kind` field holds (0: no kind).
  """
  prompt_ids = chat.render_prompt(tokenizer, pair['prompt'])
  chosen, chosen_mask = render_response(tokenizer, prompt_ids, pair['prompt'], pair['chosen'])
  rejected, rejected_mask = render_response(tokenizer, prompt_ids, pair['prompt'],
                                            pair['rejected'])
  length = max(len(chosen), len(rejected))
  pad = lambda x, value=0: np.pad(x, (0, length - len(x)), constant_values=value)
  return {
      'tokens': pad(chosen, PAD_ID), 'rejected': pad(rejected, PAD_ID),
      'chosen_mask': pad(chosen_mask), 'rejected_mask': pad(rejected_mask),
      'margin': np.full(length, int(round(pair.get('margin', 0.0) * MARGIN_SCALE)), np.int32),
      'kind': np.full(length, kind_id, np.int32),
      'prompt_length': len(prompt_ids),
  }


# ----------------------------------------------------------------------------
# Corruptions of a real function (the embedded default).


def _parses(source: str) -> bool:
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      ast.parse(source)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return False
  return True


def _function(source: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      tree = ast.parse(source)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return None
  if len(tree.body) != 1 or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
    return None
  return tree.body[0]


def split_function(source: str) -> tuple[list[str], list[str]] | None:
  """(header lines: decorators and the def up to its colon, body lines), or None.

  None when the body starts on the def's own line (`def f(): return 1`).
  """
  node = _function(source)
  if node is None:
    return None
  lines = source.splitlines(keepends=True)
  body_start = node.body[0].lineno - 1
  if body_start < 1 or node.body[0].lineno == node.lineno:
    return None
  return lines[:body_start], lines[body_start:]


def _rng(key: str) -> random.Random:
  return random.Random(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(),
                                      'big'))


def _syntax_break(source: str, key: str) -> str | None:
  """The def's colon removed and a middle body line's indentation cut: it cannot parse."""
  parts = split_function(source)
  if parts is None:
    return None
  header, body = list(parts[0]), list(parts[1])
  last = header[-1].rstrip('\r\n')
  end = header[-1][len(last):]
  colon = last.rfind(':')
  if colon < 0:
    return None
  header[-1] = last[:colon] + last[colon + 1:] + end
  indented = [i for i, line in enumerate(body) if line.startswith('  ') and line.strip()]
  if len(indented) > 1:
    i = indented[_rng(key).randrange(1, len(indented))]
    body[i] = body[i][1:]
  broken = ''.join(header + body)
  return broken if not _parses(broken) else None


def _truncated(source: str, key: str) -> str | None:
  """The first 30-70% of the lines: a function cut off before its end."""
  lines = source.splitlines(keepends=True)
  if len(lines) < 3:
    return None
  keep = max(1, min(len(lines) - 1, int(len(lines) * _rng(key).uniform(0.3, 0.7))))
  return ''.join(lines[:keep]).rstrip('\n') + '\n'


def _renamed(source: str, name: str, other_name: str) -> str | None:
  """The def names `other_name` instead of the requested `name`."""
  node = _function(source)
  if node is None or other_name == name:
    return None
  lines = source.splitlines(keepends=True)
  line = lines[node.lineno - 1]
  at = line.find(f'def {name}(')
  if at < 0:
    return None
  lines[node.lineno - 1] = line[:at] + f'def {other_name}(' + line[at + len(name) + 5:]
  return ''.join(lines)


def _wrong_body(source: str, other_source: str) -> str | None:
  """This function's header over another function's body (re-indented)."""
  mine, theirs = split_function(source), split_function(other_source)
  if mine is None or theirs is None:
    return None
  header, body = mine
  other_body = theirs[1]
  indent = lambda line: line[:len(line) - len(line.lstrip())]
  mine_indent = indent(body[0])
  their_indent = indent(other_body[0])
  out = []
  for line in other_body:
    out.append(mine_indent + line[len(their_indent):] if line.startswith(their_indent)
               else line)
  result = ''.join(header + out)
  return result if result != source else None


def _shuffled(source: str, key: str) -> str | None:
  """The body's lines in a random order under the header."""
  parts = split_function(source)
  if parts is None or len(parts[1]) < 2:
    return None
  header, body = parts
  body = [line if line.endswith('\n') else line + '\n' for line in body]
  order = list(range(len(body)))
  rng = _rng(key)
  for _ in range(5):
    rng.shuffle(order)
    if order != sorted(order):
      shuffled = [body[i] for i in order]
      if shuffled != body:
        return ''.join(header + shuffled)
  return None


def corrupt(kind: str, source: str, name: str, key: str, other_source: str,
            other_name: str) -> str | None:
  """The `kind` corruption of a function's `source` (def `name`), or None if it has none.

  `key` seeds the random choices (stable per example); the other function
  (`other_source`, def `other_name`) gives the renamed and wrong_body kinds
  their material. The result always differs from `source`.
  """
  if kind == 'syntax':
    out = _syntax_break(source, key)
  elif kind == 'truncated':
    out = _truncated(source, key)
  elif kind == 'renamed':
    out = _renamed(source, name, other_name)
  elif kind == 'wrong_body':
    out = _wrong_body(source, other_source)
  elif kind == 'shuffled':
    out = _shuffled(source, key)
  else:
    raise ValueError(f'unknown corruption kind {kind!r}; expected one of {KINDS}')
  if out is None or out.strip() == source.strip():
    return None
  return out
