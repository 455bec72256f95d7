"""Cleaning: unicode normalisation, HTML stripping, quality filters, PII scrubbing.

Order per document: NFC normalisation -> HTML stripping (web text only) ->
quality filters (a dropped document is counted by reason) -> PII scrubbing
(each replacement counted by type). Filtering before scrubbing keeps the
regexes off text that is thrown away anyway.

PII becomes a typed placeholder, so a model still learns that an address was
there: <PRIVATE_KEY> (PEM private-key blocks), <AWS_KEY> (AKIA/ASIA access key
ids and the value of aws_secret_access_key assignments), <API_KEY> (GitHub,
OpenAI, Slack and Google key formats), <BEARER_TOKEN> (the token after
`Bearer`, which is kept), <EMAIL>, <CREDIT_CARD> (13-19 digits written whole
or in groups of 4+ split by spaces or dashes, issuer prefix 2-6, valid Luhn
checksum), <IP_ADDRESS> (IPv4 and IPv6, validated by value) and <PHONE>
(+country numbers with separators, (area) numbers, 555-123-4567 style).

Look-alikes that are kept, and why:
  * Version strings. `3.11.7.1` is a syntactically valid IPv4 address, so no
    pattern can tell them apart; context does. A dotted quad is kept when it
    is part of a longer dotted run (`1.3.6.1.4.1`), glued to a word (`v3.11.7.1`,
    `py3.11.7.1`), has an octet over 255 or with a leading zero, or follows a
    version cue: `version`, `ver`, `release`, `rev`, `python`, a lone `v`,
    or a comparison (`==`, `>=`, `<=`, `~=`, `!=`, `<`, `>`). Everything else
    (`192.168.1.20`, `8.8.8.8`) is an address.
  * Hex colours (`#ff8800`), hashes, UUIDs, dates, times, plain numbers: the
    patterns above need separators, prefixes or checksums these never have.
  * Code: `a[::2]`, `std::vector`, MAC addresses are not valid IPv6 addresses
    or have fewer than three groups; `@decorator` has no local part.
"""

from __future__ import annotations

import collections
import html.parser
import ipaddress
import re
import unicodedata
from typing import Callable, Iterable

import ml_collections
import numpy as np

from data_pipeline.sources import Document

# ----------------------------------------------------------------------------
# HTML.

_LOOKS_LIKE_HTML = re.compile(
    r'<!doctype html|<html\b|<body\b|</(?:p|div|span|a|li|td|h[1-6]|title)>', re.I)
_ANY_TAG = re.compile(r'<[^<>]*>')
_BLOCK_TAGS = frozenset(
    'address article aside blockquote br dd div dl dt footer form h1 h2 h3 h4 h5 h6 '
    'header hr li main nav ol p pre section table td th tr ul title'.split())


class _TextExtractor(html.parser.HTMLParser):
  """Keeps the text, drops tags, scripts and styles, decodes entities."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.parts: list[str] = []
    self._hidden = 0

  def handle_starttag(self, tag, attrs):
    if tag in ('script', 'style'):
      self._hidden += 1
    elif tag in _BLOCK_TAGS:
      self.parts.append('\n')

  def handle_endtag(self, tag):
    if tag in ('script', 'style'):
      self._hidden = max(0, self._hidden - 1)
    elif tag in _BLOCK_TAGS:
      self.parts.append('\n')

  def handle_data(self, data):
    if not self._hidden:
      self.parts.append(data)


def looks_like_html(text: str) -> bool:
  return _LOOKS_LIKE_HTML.search(text) is not None


def strip_html(text: str) -> str:
  """The visible text of an HTML document, one block per line."""
  parser = _TextExtractor()
  try:
    parser.feed(text)
    parser.close()
    visible = ''.join(parser.parts)
  except AssertionError:
    # html.parser asserts on some malformed markup (e.g. `<![` in a script);
    # such a page still has text worth keeping, so drop the tags by pattern.
    visible = html.unescape(_ANY_TAG.sub(' ', text))
  lines = [' '.join(line.split()) for line in visible.splitlines()]
  return re.sub(r'\n{3,}', '\n\n', '\n'.join(lines)).strip()


# ----------------------------------------------------------------------------
# PII.

_VERSION_CUE = re.compile(
    r'(?:\b(?:version|ver|release|rev|python|v)\.?|[=<>~!]=|[<>])\s*[:=]?\s*$', re.I)


def _luhn_ok(digits: str) -> bool:
  total = 0
  for i, ch in enumerate(reversed(digits)):
    d = int(ch)
    if i % 2:
      d = d * 2 - 9 if d > 4 else d * 2
    total += d
  return total % 10 == 0


def _credit_card(m: re.Match) -> str | None:
  groups = re.split(r'[ -]', m.group(0))
  # Cards are written in groups of 4 (or 4-6-5); shorter groups are tables.
  if len(groups) > 1 and min(map(len, groups[:-1])) < 4:
    return None
  digits = ''.join(groups)
  if 13 <= len(digits) <= 19 and _luhn_ok(digits):
    return '<CREDIT_CARD>'
  return None


def _ipv4(m: re.Match) -> str | None:
  octets = m.group(0).split('.')
  if any(len(o) > 1 and o[0] == '0' or int(o) > 255 for o in octets):
    return None
  before = m.string[max(0, m.start() - 16):m.start()]
  if _VERSION_CUE.search(before):
    return None
  return '<IP_ADDRESS>'


def _ipv6(m: re.Match) -> str | None:
  candidate = m.group(0)
  try:
    ipaddress.IPv6Address(candidate.split('%')[0])
  except ValueError:
    return None
  groups = [g for g in re.split(r'[:.]', candidate.split('%')[0]) if g]
  return '<IP_ADDRESS>' if len(groups) >= 3 else None


def _phone(m: re.Match) -> str | None:
  digits = re.sub(r'\D', '', m.group(0))
  return '<PHONE>' if 7 <= len(digits) <= 15 else None


def _keep_prefix(placeholder: str) -> Callable[[re.Match], str]:
  return lambda m: m.group(1) + placeholder


# A regex that starts with a lookbehind is tried at every position of the
# text; one that starts with a literal or a small character class lets the
# engine skip ahead. So the patterns below consume their first character and
# then look behind it (`[2-6](?<![\w-].)` = a digit 2-6 not glued to a word).
_HEX = '[0-9A-Fa-f]'
_EMAIL_DOMAIN = re.compile(r'@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b')

# (type, substrings one of which must be present (a cheap test that skips the
# regex on most documents) or None, pattern, replacement); a replacement that
# returns None keeps the match. Secrets run first so their digits are never
# mistaken for phones or cards.
_RULES: list[tuple[str, tuple[str, ...] | None, re.Pattern,
                   Callable[[re.Match], str | None]]] = [
    ('PRIVATE_KEY', ('-----BEGIN',), re.compile(
        r'-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----'
        r'(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|(?:\s*[A-Za-z0-9+/=]{16,})*)'),
     lambda m: '<PRIVATE_KEY>'),
    ('AWS_KEY', ('AKIA', 'ASIA'), re.compile(r'\b(?:AKIA|ASIA)[A-Z0-9]{16}\b'),
     lambda m: '<AWS_KEY>'),
    ('AWS_KEY', ('ecret', 'ECRET'), re.compile(
        r'(?i)(aws_?secret(?:_?access)?_?key["\']?\s*[:=]\s*["\']?)'
        r'[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])'),
     _keep_prefix('<AWS_KEY>')),
    ('BEARER_TOKEN', ('earer', 'EARER'), re.compile(
        r'\b((?i:bearer)\s+)(?=[A-Za-z0-9._~+/-]*\d)[A-Za-z0-9._~+/-]{8,}=*'),
     _keep_prefix('<BEARER_TOKEN>')),
    ('API_KEY', ('gh', 'sk-', 'xox', 'AIza'), re.compile(
        r'[gsxA](?<!\w.)(?:h[pousr]_[A-Za-z0-9]{36,255}|ithub_pat_[A-Za-z0-9_]{22,255}'
        r'|k-(?:proj-|ant-)?(?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{20,}'
        r'|ox[abposr]-[A-Za-z0-9-]{10,}|Iza[0-9A-Za-z_-]{35})\b'),
     lambda m: '<API_KEY>'),
    ('EMAIL', ('@',), _EMAIL_DOMAIN, None),  # Handled by _scrub_emails.
    ('CREDIT_CARD', None, re.compile(r'[2-6](?<![\w-].)(?:[ -]?\d){12,18}(?![\w-])'),
     _credit_card),
    ('IP_ADDRESS', (':',), re.compile(
        rf'(?::(?<![\w:.]:)(?::{_HEX}{{0,4}}){{1,7}}'
        rf'|{_HEX}(?<![\w:.].){_HEX}{{0,3}}(?::{_HEX}{{0,4}}){{2,7}})'
        r'(?:\.\d{1,3}){0,3}(?:%[A-Za-z0-9]+)?(?![\w:]|\.\d)'),
     _ipv6),
    ('IP_ADDRESS', ('.',), re.compile(r'\d(?<![\w.]\d)\d{0,2}\.(?:\d{1,3}\.){2}\d{1,3}(?!\w|\.\d)'),
     _ipv4),
    ('PHONE', None, re.compile(
        r'[+(\d](?:(?<=\+)(?<![\w+].)\d{1,3}(?:[ -]?\(\d{1,4}\)|[ -]\d{2,5}){2,5}'
        r'|(?<![\w.+-].)(?:(?<=\()\d{2,4}\) ?\d{3,4}[-. ]\d{4}|(?<=\d)\d{2}[-.]\d{3}[-.]\d{4}))'
        r'(?![\w-]|\.\d)'),
     _phone),
]
PII_TYPES = tuple(dict.fromkeys(name for name, *_ in _RULES))


def _scrub_emails(text: str, counts: collections.Counter) -> str:
  """Finds `@domain` (fast: a literal start), then walks left over the local part."""
  pieces, last = [], 0
  for m in _EMAIL_DOMAIN.finditer(text):
    start = m.start()
    while start > last and (text[start - 1].isalnum() or text[start - 1] in '._%+-'):
      start -= 1
    if start == m.start():
      continue  # `@decorator`: no local part.
    pieces += [text[last:start], '<EMAIL>']
    last = m.end()
    counts['EMAIL'] += 1
  return ''.join(pieces) + text[last:] if pieces else text


def scrub_pii(text: str, counts: collections.Counter | None = None) -> str:
  """Replaces PII with typed placeholders; adds replacements per type to `counts`."""
  counts = collections.Counter() if counts is None else counts
  for name, gate, pattern, replace in _RULES:
    if gate is not None and not any(g in text for g in gate):
      continue
    if replace is None:
      text = _scrub_emails(text, counts)
      continue

    def substitute(m: re.Match, name=name, replace=replace) -> str:
      out = replace(m)
      if out is None:
        return m.group(0)
      counts[name] += 1
      return out

    text = pattern.sub(substitute, text)
  return text


# ----------------------------------------------------------------------------
# Quality filters.

# Per UTF-8 byte: is it whitespace / an ASCII letter or digit. Bytes of
# non-ASCII characters count as alphanumeric (letters of other scripts) except
# continuation bytes, which count as nothing, so each character counts once.
_SPACE = np.zeros(256, bool)
_SPACE[list(b' \t\n\r\x0b\x0c')] = True
_ALNUM = np.zeros(256, bool)
_ALNUM[list(b'0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ')] = True
_ALNUM[0xC0:] = True
_CONTINUATION = np.zeros(256, bool)
_CONTINUATION[0x80:0xC0] = True


def alnum_fraction(text: str) -> float:
  """Alphanumeric characters over non-whitespace characters."""
  data = np.frombuffer(text.encode('utf-8'), np.uint8)
  non_space = len(data) - int(_SPACE[data].sum()) - int(_CONTINUATION[data].sum())
  return int(_ALNUM[data].sum()) / max(non_space, 1)


def quality_problem(text: str, config: ml_collections.ConfigDict) -> str | None:
  """The reason `text` fails the quality filters, or None if it passes."""
  if len(text) < config.min_chars:
    return 'too_short'
  lines = text.splitlines()
  if max(map(len, lines), default=0) > config.max_line_chars:
    return 'line_too_long'
  if alnum_fraction(text) < config.min_alnum_fraction:
    return 'low_alnum_fraction'
  stripped = [line.strip() for line in lines if line.strip()]
  if stripped:
    repeated = 1.0 - len(set(stripped)) / len(stripped)
    if repeated > config.max_repeated_line_fraction:
      return 'repeated_lines'
  return None


def clean_document(doc: Document, config: ml_collections.ConfigDict,
                   dropped: collections.Counter,
                   pii: collections.Counter) -> Document | None:
  """The cleaned document, or None (the reason counted in `dropped`)."""
  text = unicodedata.normalize(config.normalization, doc.text) if config.normalization else doc.text
  if config.strip_html and looks_like_html(text):
    text = strip_html(text)
  problem = quality_problem(text, config)
  if problem is not None:
    dropped[problem] += 1
    return None
  if config.scrub_pii:
    text = scrub_pii(text, pii)
  return Document(doc.id, text, doc.source)


def clean_documents(docs: Iterable[Document], config: ml_collections.ConfigDict,
                    dropped: collections.Counter,
                    pii: collections.Counter) -> list[Document]:
  out = []
  for doc in docs:
    cleaned = clean_document(doc, config, dropped, pii)
    if cleaned is not None:
      out.append(cleaned)
  return out
