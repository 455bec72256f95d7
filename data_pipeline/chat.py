"""The chat template: a conversation as token ids and a loss mask.

One layout, used by training, evaluation and generation alike:

  <BOS>
  <|system|>{system content}<|end|>\\n          (optional, first turn only)
  <|user|>{user content}<|end|>\\n
  <|assistant|>{assistant content}<|end|>\\n
  <|user|>...<|end|>\\n  <|assistant|>...<|end|>\\n   (more exchanges)

`<|role|>` and `<|end|>` are the tokenizer's user-defined control pieces (one
id each), BOS is the tokenizer's bos id, `\\n` is the newline piece. Each piece
of text is encoded on its own and the ids are concatenated, so a segment's
tokens never merge with its neighbours and a prompt is token for token a
prefix of the training rendering of the same conversation.

The role token is followed directly by the content (no newline): a prompt for
generation then ends in `<|assistant|>` and the model writes the answer and
`<|end|>`, which is what the loss taught it. The newline after `<|end|>` is
part of the template (never predicted: loss 0) and only keeps decoded
conversations readable. There is no EOS: a conversation ends at its last
`<|end|>`, and generation stops there.

Loss mask: 1 exactly on the assistant turns' content tokens and on each
assistant turn's `<|end|>`; 0 on BOS, role tokens, system/user content and the
newlines.

Rules a conversation must follow (a violation raises `ChatFormatError`, whose
`reason` is a short key for counting skipped records):
  * roles are 'system', 'user', 'assistant'; contents are strings;
  * a system turn may only come first (at most one);
  * after it, turns alternate user, assistant, user, ... starting with user;
  * a conversation for training ends with an assistant turn, a prompt for
    generation ends with a user turn;
  * no content is empty or whitespace only;
  * no content contains a control token's text (`<|end|>`, ...): SentencePiece
    matches user-defined pieces in raw text, so such content would inject a
    control id (e.g. end an assistant turn early). It is refused, not escaped:
    an escape would change the text a user sees.
BOS appears once. Plain text can never encode to BOS (it is a control piece,
not a user-defined one), and a tokenizer that adds BOS/EOS to every encode
call has them removed from each segment, so there is never a second BOS.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from configs.cli import UserError
from data_pipeline.tokenizer import CONTROL_TOKENS

SYSTEM, USER, ASSISTANT = 'system', 'user', 'assistant'
ROLES = (SYSTEM, USER, ASSISTANT)
END = '<|end|>'
SEPARATOR = '\n'  # After each turn's `<|end|>`.

Message = dict[str, str]


class ChatFormatError(UserError):
  """A conversation that breaks the template's rules; `reason` is a counting key."""

  def __init__(self, reason: str, message: str):
    super().__init__(f'{reason}: {message}')
    self.reason = reason
    self.detail = message


class ChatTokenizer(Protocol):
  """What the template needs of a tokenizer (`data_pipeline.tokenizer.Tokenizer` has it)."""

  bos_id: int
  eos_id: int
  control_ids: dict[str, int]

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Any) -> str: ...


def control_ids(tokenizer: ChatTokenizer) -> dict[str, int]:
  """The ids of the four control tokens; an error if the tokenizer lacks one."""
  ids = tokenizer.control_ids
  missing = [t for t in CONTROL_TOKENS if t not in ids]
  if missing:
    where = getattr(tokenizer, 'path', '') or 'the tokenizer'
    raise UserError(f'{where} has no single piece for the chat control tokens {missing}; '
                    'train one with data_pipeline.tokenizer.train_tokenizer.')
  if tokenizer.bos_id < 0:
    raise UserError(f'{getattr(tokenizer, "path", "") or "the tokenizer"} has no BOS id.')
  return ids


def role_token(role: str) -> str:
  return f'<|{role}|>'


def validate(messages: Any, *, for_generation: bool = False) -> list[Message]:
  """The messages as `[{'role', 'content'}]` if they follow the rules, else ChatFormatError.

  Keys other than 'role' and 'content' in a message are ignored.
  """
  if not isinstance(messages, list):
    raise ChatFormatError('wrong_type', f'messages must be a list, got {type(messages).__name__}')
  if not messages:
    raise ChatFormatError('empty_conversation', 'no messages')
  out = []
  for k, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ChatFormatError('wrong_type',
                            f'message {k} is a {type(message).__name__}, not an object')
    if 'role' not in message or 'content' not in message:
      raise ChatFormatError('missing_field', f"message {k} needs 'role' and 'content'")
    role, content = message['role'], message['content']
    if not isinstance(role, str) or not isinstance(content, str):
      raise ChatFormatError('wrong_type', f'message {k}: role and content must be strings')
    if role not in ROLES:
      raise ChatFormatError('unknown_role',
                            f'message {k} has role {role!r}; expected one of {ROLES}')
    if not content.strip():
      reason = 'empty_assistant_turn' if role == ASSISTANT else 'empty_turn'
      raise ChatFormatError(reason, f'message {k} ({role}) is empty')
    for token in CONTROL_TOKENS:
      if token in content:
        raise ChatFormatError('control_token_in_content',
                              f'message {k} ({role}) contains the text {token!r}')
    out.append({'role': role, 'content': content})
  turns = out[1:] if out[0]['role'] == SYSTEM else out
  for k, message in enumerate(turns):
    expected = USER if k % 2 == 0 else ASSISTANT
    if message['role'] != expected:
      if message['role'] == SYSTEM:
        raise ChatFormatError('misplaced_system_turn', 'a system turn may only come first')
      raise ChatFormatError('roles_out_of_order', f'expected a {expected} turn at message '
                            f'{k + len(out) - len(turns)}, got {message["role"]}')
  if not turns:
    raise ChatFormatError('no_user_turn', 'a conversation needs a user turn after the system turn')
  last = turns[-1]['role']
  if for_generation and last != USER:
    raise ChatFormatError('prompt_must_end_with_user', 'a prompt ends with a user turn')
  if not for_generation and last != ASSISTANT:
    raise ChatFormatError('must_end_with_assistant',
                          'a training conversation ends with an assistant turn')
  return out


def encode_text(tokenizer: ChatTokenizer, text: str) -> list[int]:
  """Ids of plain text: no BOS/EOS even if the tokenizer adds them."""
  ids = list(tokenizer.encode(text))
  # Some tokenizers (a user's SentencePiece model with add_bos set) add them
  # on every call; inside a conversation they would be a second BOS.
  if ids and ids[0] == tokenizer.bos_id:
    ids = ids[1:]
  if ids and ids[-1] == tokenizer.eos_id:
    ids = ids[:-1]
  if tokenizer.bos_id in ids:
    raise ChatFormatError('bos_in_content', 'the tokenizer put BOS inside a text segment')
  return ids


def _render(tokenizer: ChatTokenizer, messages: list[Message],
            for_generation: bool) -> tuple[list[int], list[int]]:
  ids = control_ids(tokenizer)
  newline = encode_text(tokenizer, SEPARATOR)
  tokens, mask = [tokenizer.bos_id], [0]
  for message in messages:
    role = message['role']
    content = encode_text(tokenizer, message['content'])
    learn = 1 if role == ASSISTANT else 0
    tokens += [ids[role_token(role)]] + content + [ids[END]] + newline
    mask += [0] + [learn] * len(content) + [learn] + [0] * len(newline)
  if for_generation:
    tokens.append(ids[role_token(ASSISTANT)])
    mask.append(0)
  return tokens, mask


def render_conversation(tokenizer: ChatTokenizer,
                        messages: Sequence[Message]) -> tuple[np.ndarray, np.ndarray]:
  """(token ids int32, loss mask uint8) of a conversation ending with an assistant turn."""
  tokens, mask = _render(tokenizer, validate(list(messages)), for_generation=False)
  return np.asarray(tokens, np.int32), np.asarray(mask, np.uint8)


def render_prompt(tokenizer: ChatTokenizer, messages: Sequence[Message]) -> np.ndarray:
  """Token ids (int32) of a conversation ending with a user turn, then `<|assistant|>`."""
  tokens, _ = _render(tokenizer, validate(list(messages), for_generation=True),
                      for_generation=True)
  return np.asarray(tokens, np.int32)


def stop_ids(tokenizer: ChatTokenizer) -> tuple[int, ...]:
  """Ids that end a generated assistant turn: `<|end|>`, and EOS for safety."""
  return tuple(i for i in (control_ids(tokenizer)[END], tokenizer.eos_id) if i >= 0)


def parse_completion(tokenizer: ChatTokenizer, ids: Sequence[int]) -> tuple[str, bool]:
  """(text of generated ids up to the first stop id, whether a stop id was reached).

  `ids` are the tokens generated after a `render_prompt` prompt; a completion
  cut by the length limit comes back with False.
  """
  stops = set(stop_ids(tokenizer))
  ids = [int(i) for i in ids]
  for k, i in enumerate(ids):
    if i in stops:
      return tokenizer.decode(ids[:k]), True
  return tokenizer.decode(ids), False
