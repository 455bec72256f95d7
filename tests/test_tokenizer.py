"""Tokenizer: fixed ids, control tokens, exact round trips of any text."""

from __future__ import annotations

import random
import re

import pytest
import sentencepiece as spm

from configs.cli import UserError
from data_pipeline import tokenizer as tok_lib

_CODE = '''\
def parse(line: str) -> dict[str, int]:
    """Parses `key=value` pairs."""
    out = {}
    for part in line.split(","):
        key, _, value = part.partition("=")
        out[key.strip()] = int(value)  # trailing spaces follow   
    return out


class Buffer:
\tdef __init__(self, size=4096):
\t\tself.data = bytearray(size)\t
'''
_PROSE = (
    'The quick brown fox jumps over the lazy dog. Numbers like 3.11.7 and '
    '1024 appear in text; so do URLs, e-mail and punctuation!\n')


def _corpus(n: int = 60) -> list[str]:
  rng = random.Random(0)
  words = _PROSE.split() + _CODE.split()
  docs = [_CODE, _PROSE]
  for i in range(n):
    docs.append(' '.join(rng.choice(words) for _ in range(40)) + f'\n    x_{i} = {i}\n')
  return docs


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory) -> tok_lib.Tokenizer:
  prefix = str(tmp_path_factory.mktemp('tok') / 'tokenizer')
  path = tok_lib.train_tokenizer(_corpus(), prefix, vocab_size=400)
  return tok_lib.Tokenizer.load(path)


def test_fixed_special_ids(tokenizer):
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (
      tok_lib.PAD_ID, tok_lib.UNK_ID, tok_lib.BOS_ID, tok_lib.EOS_ID) == (0, 1, 2, 3)
  assert tokenizer.vocab_size == 400
  # Specials never come out of encode, and decode drops them.
  ids = tokenizer.encode('hello')
  assert not set(ids) & {0, 2, 3}
  assert tokenizer.decode([2] + ids + [3, 0, 0]) == 'hello'


def test_control_tokens_are_single_pieces(tokenizer):
  assert set(tokenizer.control_ids) == set(tok_lib.CONTROL_TOKENS)
  for token, i in tokenizer.control_ids.items():
    assert tokenizer.encode(token) == [i]
    assert tokenizer.id_to_piece(i) == token
  text = '<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>'
  ids = tokenizer.encode(text)
  assert ids.count(tokenizer.control_ids['<|end|>']) == 2
  assert tokenizer.decode(ids) == text


def test_newline_and_tab_round_trip_exactly(tokenizer):
  for text in ['\n', '\t', '\n\n\n', 'a\tb\r\nc  \n', ' ', '   ', '  leading', 'trailing  ',
               '\t\tindented\n\tmore\t\n']:
    assert tokenizer.decode(tokenizer.encode(text)) == text, repr(text)
  assert tokenizer.encode('\n') == [tokenizer.piece_to_id('\n')]


def test_code_round_trips(tokenizer):
  ids = tokenizer.encode(_CODE)
  assert tokenizer.decode(ids) == _CODE
  # The vocabulary learnt something: code is much shorter than its bytes.
  assert len(ids) < 0.6 * len(_CODE.encode('utf-8'))


_ALPHABETS = [
    [chr(c) for c in range(32, 127)],                  # printable ASCII
    [' ', ' ', '\t', '\n', '\r', '\x0b', '\x0c'],      # whitespace
    [chr(c) for c in range(0, 32)] + ['\x7f'],         # control characters
    [chr(c) for c in range(0xA0, 0x250)],              # Latin-1, Latin Extended
    [chr(c) for c in range(0x300, 0x370)],             # combining marks
    [chr(c) for c in range(0x4E00, 0x4E80)],           # CJK
    [chr(c) for c in range(0x1F300, 0x1F650)],         # emoji
    ['\u2581', '\u200d', '\u200f', '\ufeff', '\ufffd', 'e\u0301', '\U0010ffff'],
]


def _random_text(rng: random.Random) -> str:
  out = []
  for _ in range(rng.randrange(0, 40)):
    if rng.random() < 0.1:  # anywhere in unicode, except lone surrogates
      c = rng.randrange(0, 0x110000)
      out.append(chr(c) if not 0xD800 <= c < 0xE000 else 'x')
    else:
      out.append(rng.choice(rng.choice(_ALPHABETS)))
  return ''.join(out)


def test_random_unicode_round_trips(tokenizer):
  rng = random.Random(1234)
  texts = [_random_text(rng) for _ in range(1500)]
  for text in texts:
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text, repr(text)
  # The batched path agrees with the single one.
  assert tokenizer.encode_batch(texts[:200]) == [tokenizer.encode(t) for t in texts[:200]]


def test_unigram_round_trips(tmp_path):
  path = tok_lib.train_tokenizer(_corpus(), str(tmp_path / 'uni'), 330, model_type='unigram')
  tok = tok_lib.Tokenizer.load(path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  rng = random.Random(7)
  for text in [_CODE] + [_random_text(rng) for _ in range(200)]:
    assert tok.decode(tok.encode(text)) == text, repr(text)


def test_loads_foreign_model_without_pad(tmp_path):
  # A LLaMA-style model: default SentencePiece ids (unk 0, bos 1, eos 2, no
  # pad), no byte fallback, default normalisation.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(_corpus(30)), model_prefix=str(tmp_path / 'foreign'),
      vocab_size=120, minloglevel=2)
  tok = tok_lib.Tokenizer.load(str(tmp_path / 'foreign.model'))
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (-1, 0, 1, 2)
  assert tok.control_ids == {}
  assert tok.decode(tok.encode('the lazy dog')) == 'the lazy dog'
  tok.encode('emoji \U0001F600 and \u2581 do not crash')


def test_bad_inputs_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.model'):
    tok_lib.Tokenizer.load(str(tmp_path / 'missing.model'))
  with pytest.raises(ValueError, match='vocab_size'):
    tok_lib.train_tokenizer(['abc'], str(tmp_path / 't'), vocab_size=100)
  with pytest.raises(ValueError, match='model_type'):
    tok_lib.train_tokenizer(['abc'], str(tmp_path / 't'), 400, model_type='wordpiece')


@pytest.mark.parametrize('model_type', ['bpe', 'unigram'])
def test_vocab_size_too_large_says_the_maximum_and_the_maximum_works(tmp_path, model_type):
  docs = _corpus(20)
  with pytest.raises(UserError, match='vocab_size=5000 is too large') as e:
    tok_lib.train_tokenizer(docs, str(tmp_path / 't'), 5000, model_type)
  assert '[' not in str(e.value)  # None of SentencePiece's check syntax.
  maximum = int(re.search(r'at most (\d+) pieces', str(e.value)).group(1))
  assert tok_lib.CONTROL_TOKENS and 265 < maximum < 5000
  path = tok_lib.train_tokenizer(docs, str(tmp_path / 't'), maximum, model_type)
  assert tok_lib.Tokenizer.load(path).vocab_size == maximum


def test_lines_over_the_limit_are_left_out_and_counted(tmp_path):
  long_line = 'word ' * 4000  # 20,000 bytes: over SentencePiece's 16,384.
  with pytest.raises(UserError, match='each of the 1 non-empty lines is longer than '
                     'max_sentence_length=16384'):
    tok_lib.train_tokenizer([long_line], str(tmp_path / 't'), 300)
  stats = {}
  path = tok_lib.train_tokenizer(_corpus(20) + [long_line], str(tmp_path / 't'), 400, stats=stats)
  assert stats['lines_too_long'] == 1 and stats['lines'] > 20
  tok = tok_lib.Tokenizer.load(path)
  assert tok.decode(tok.encode(long_line)) == long_line  # Still encoded whole.


def test_reserved_ids_agree_with_the_config_check():
  from configs import data as data_configs  # pylint: disable=g-import-not-at-top
  assert data_configs.TOKENIZER_RESERVED_IDS == 4 + len(tok_lib.CONTROL_TOKENS) + 1 + 256


def test_vocab_size_below_the_characters_says_the_minimum(tmp_path):
  text = ''.join(chr(0x4E00 + i) for i in range(200))  # 200 distinct characters.
  with pytest.raises(UserError, match=r'vocab_size=300 is too small .* need (\d+)') as e:
    tok_lib.train_tokenizer([text[i:i + 20] for i in range(0, 200, 5)], str(tmp_path / 't'), 300)
  minimum = int(re.search(r'need (\d+)', str(e.value)).group(1))
  assert 300 < minimum
