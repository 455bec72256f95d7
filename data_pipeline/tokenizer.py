"""SentencePiece tokenizer: training on raw text and a thin wrapper to use it.

The trained model is set up for code as much as for prose: no normalisation,
whitespace kept as is (runs of spaces become pieces, no dummy prefix), digits
split, newline a piece of its own and byte fallback for everything outside the
vocabulary, so `decode(encode(text)) == text` for any text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
import os
import re

import numpy as np
import sentencepiece as spm

from configs.cli import UserError

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
# Chat control symbols: user-defined pieces, so each is always one token.
CONTROL_TOKENS = ('<|system|>', '<|user|>', '<|assistant|>', '<|end|>')
NEWLINE = '\n'

# SentencePiece writes a space as U+2581 and decodes U+2581 back to a space, so
# a literal U+2581 in the text would come back as ' '. We encode it through its
# UTF-8 byte pieces instead, which decode to the character itself.
_META_SPACE = '\u2581'
_META_SPACE_BYTES = tuple(f'<0x{b:02X}>' for b in _META_SPACE.encode('utf-8'))


def _lines(texts: Iterable[str], counts: dict[str, int],
           max_bytes: int) -> Iterator[str]:
  # Lines are the training sentences: code lines are short, and whole files
  # would exceed max_sentence_length and be dropped. The newline itself is a
  # user-defined piece, so it needs no statistics. Lines over max_bytes are
  # left out here, counted, rather than by SentencePiece: if none were left,
  # it would fail with only `[!sentences_.empty()]` to say why.
  for text in texts:
    for line in text.split(NEWLINE):
      if not line:
        continue
      if len(line.encode('utf-8')) > max_bytes:
        counts['lines_too_long'] += 1
        continue
      counts['lines'] += 1
      yield line


def _vocab_size_bounds(message: str) -> tuple[int | None, int | None]:
  """(min, max) vocab_size that SentencePiece's error says the text needs / allows."""
  low = re.search(r'Vocabulary size is smaller than required_chars\. \d+ vs (\d+)', message)
  high = re.search(r'Vocabulary size (?:is )?too high \(\d+\)\. Please set it to a value <= '
                   r'(\d+)', message)
  return (int(low.group(1)) if low else None), (int(high.group(1)) if high else None)


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = 'bpe',
    *,
    input_sentence_size: int = 2_000_000,
    character_coverage: float = 0.9995,
    max_sentence_length: int = 16384,
    num_threads: int = 2,
    seed_sentencepiece_size: int = 1_000_000,
    stats: dict[str, int] | None = None,
) -> str:
  """Trains a SentencePiece model on `texts`; returns the `.model` path.

  Args:
    texts: documents (whole texts; they are split into lines here).
    model_prefix: output path without suffix (`.model` and `.vocab` written).
    vocab_size: total vocabulary including the 4 special ids, the control
      tokens, the newline piece and the 256 byte-fallback pieces.
    model_type: 'bpe' or 'unigram'.
    input_sentence_size: lines sampled (uniformly, seeded inside SentencePiece)
      for training; bounds time and memory on large corpora.
    character_coverage: fraction of characters covered by the vocabulary; the
      rest is spelled with byte pieces.
    max_sentence_length: longest line (bytes) used for training.
    num_threads: trainer threads.
    seed_sentencepiece_size: unigram only, size of the seed vocabulary.
    stats: if given, filled with `lines` (trained on) and `lines_too_long`
      (over max_sentence_length bytes, left out of training; the documents
      that hold them are still encoded whole).

  Raises:
    UserError: the text cannot give this tokenizer: no line to train on, every
      line too long, or a vocab_size smaller than the text's characters need
      or larger than the text allows (the message says the bound).
  """
  if model_type not in ('bpe', 'unigram'):
    raise UserError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
  reserved = 4 + len(CONTROL_TOKENS) + 1 + 256
  if vocab_size <= reserved:
    raise UserError(
        f'vocab_size={vocab_size} leaves no room for learned pieces: {reserved}'
        ' ids are reserved (specials, control tokens, newline, 256 bytes)')
  parent = os.path.dirname(model_prefix)
  if parent:
    os.makedirs(parent, exist_ok=True)
  counts = stats if stats is not None else {}
  counts.update(lines=0, lines_too_long=0)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts, counts, max_sentence_length),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=list(CONTROL_TOKENS) + [NEWLINE],
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        seed_sentencepiece_size=seed_sentencepiece_size,
        num_threads=num_threads,
        minloglevel=2,
    )
  except RuntimeError as e:
    if counts['lines'] == 0 and counts['lines_too_long']:
      raise UserError(
          f'no line to train the tokenizer on: each of the {counts["lines_too_long"]} non-empty '
          f'lines is longer than max_sentence_length={max_sentence_length} bytes '
          "(SentencePiece's limit per line); add line breaks, or drop such documents with "
          'clean.max_line_chars') from e
    if counts['lines'] == 0:
      raise UserError('no non-empty line of text to train the tokenizer on') from e
    minimum, maximum = _vocab_size_bounds(str(e))
    if minimum is not None:
      raise UserError(
          f'tokenizer.vocab_size={vocab_size} is too small for the training text: its '
          f'characters (character_coverage={character_coverage}) and the reserved pieces need '
          f'{minimum}; set tokenizer.vocab_size >= {minimum}') from e
    if maximum is not None:
      raise UserError(
          f'tokenizer.vocab_size={vocab_size} is too large for the training text '
          f'({counts["lines"]:,} lines): a {model_type} tokenizer can have at most {maximum} '
          f'pieces here; set tokenizer.vocab_size <= {maximum} or train on more text') from e
    raise RuntimeError(
        f'SentencePiece training failed for {model_prefix} (vocab_size='
        f'{vocab_size}, {counts["lines"]} lines): {e}') from e
  return model_prefix + '.model'


class Tokenizer:
  """A SentencePiece model: ours, or any user `.model` (LLaMA, Gemma, ...)."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str = ''):
    self._sp = processor
    self.path = path
    ids = [processor.piece_to_id(p) for p in _META_SPACE_BYTES]
    # Only models with byte fallback can spell U+2581 with bytes.
    self._meta_space_ids = (
        ids if all(processor.is_byte(i) for i in ids) else None)

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    if not os.path.exists(path):
      raise FileNotFoundError(f'tokenizer model not found: {path}')
    processor = spm.SentencePieceProcessor()
    try:
      processor.Load(path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f'not a SentencePiece model: {path}: {e}') from e
    return cls(processor, path)

  @classmethod
  def from_bytes(cls, model_proto: bytes, path: str = '') -> Tokenizer:
    """A model from its serialized bytes, e.g. read from `gs://` through epath.

    SentencePiece opens only local files itself; `path` names where the bytes
    came from, for messages.
    """
    processor = spm.SentencePieceProcessor()
    try:
      processor.LoadFromSerializedProto(model_proto)
    except (OSError, RuntimeError) as e:
      raise ValueError(f'not a SentencePiece model: {path or "<bytes>"}: {e}') from e
    return cls(processor, path)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  # Ids a model does not define are -1 (e.g. LLaMA has no pad).
  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def control_ids(self) -> dict[str, int]:
    """Ids of the chat control tokens this model has as single pieces."""
    out = {}
    for token in CONTROL_TOKENS:
      i = self._sp.piece_to_id(token)
      if self._sp.id_to_piece(i) == token:  # unknown pieces map to unk
        out[token] = i
    return out

  def ordinary_ids(self) -> np.ndarray:
    """Every id but pad, unk, bos, eos and the chat control tokens."""
    special = {self.pad_id, self.unk_id, self.bos_id, self.eos_id, *self.control_ids.values()}
    return np.array([i for i in range(self.vocab_size) if i not in special], np.int32)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""
    if self._meta_space_ids is None or _META_SPACE not in text:
      return self._sp.encode(text)
    ids = []
    for k, part in enumerate(text.split(_META_SPACE)):
      if k:
        ids.extend(self._meta_space_ids)
      if part:
        ids.extend(self._sp.encode(part))
    return ids

  def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
    """`encode` over many texts, using SentencePiece's own threads."""
    texts = list(texts)
    out = self._sp.encode(texts, num_threads=num_threads)
    if self._meta_space_ids is not None:
      for k, text in enumerate(texts):
        if _META_SPACE in text:
          out[k] = self.encode(text)
    return out

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Text of `ids`; pad/bos/eos (control ids) decode to nothing."""
    return self._sp.decode([int(i) for i in ids])
