"""Cleaning: PII placeholders, look-alikes kept, HTML, NFC, quality filters."""

from __future__ import annotations

import collections
import os

import pytest

from configs import data as data_configs
from data_pipeline import clean
from data_pipeline import sources

PII = [
    ('EMAIL', 'write to jane.doe+lists@example.co.uk today', 'jane.doe'),
    ('EMAIL', 'Author: Jürgen <jürgen@beispiel.de>', 'beispiel'),
    ('PHONE', 'call (555) 123-4567 now', '123-4567'),
    ('PHONE', 'call 555-123-4567 now', '555-123'),
    ('PHONE', 'call +1 415 555 2671 now', '2671'),
    ('PHONE', 'ring +44 20 7946 0958.', '7946'),
    ('IP_ADDRESS', 'host 192.168.1.20 is up', '192.168'),
    ('IP_ADDRESS', 'dns 8.8.8.8.', '8.8.8.8'),
    ('IP_ADDRESS', 'url http://10.0.0.1:8080/x', '10.0.0.1'),
    ('IP_ADDRESS', 'v6 2001:db8:85a3::8a2e:370:7334 here', '8a2e'),
    ('IP_ADDRESS', 'link fe80::1ff:fe23:4567:890a%eth0 here', 'fe23'),
    ('CREDIT_CARD', 'visa 4111 1111 1111 1111 ok', '1111 1111'),
    ('CREDIT_CARD', 'mc 5500-0000-0000-0004 ok', '0004'),
    ('CREDIT_CARD', 'amex 378282246310005 ok', '378282'),
    ('PRIVATE_KEY', 'key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAq1w2e3r4t5y6u7i8o9p0\n'
                    'aSdFgHjKl0123456789+/==\n-----END RSA PRIVATE KEY-----\nend', 'MIIE'),
    ('PRIVATE_KEY', '-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n'
                    '-----END OPENSSH PRIVATE KEY-----', 'b3Bl'),
    ('AWS_KEY', 'id AKIAIOSFODNN7EXAMPLE set', 'AKIAIOSF'),
    ('AWS_KEY', 'aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY', 'wJalr'),
    ('BEARER_TOKEN', 'Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln', 'eyJhb'),
    ('API_KEY', 'token = "ghp_' + 'aB3' * 12 + '"', 'ghp_'),
    ('API_KEY', 'OPENAI_API_KEY=sk-proj-abc123def456ghi789jkl012', 'sk-proj'),
]


@pytest.mark.parametrize('kind,text,secret', PII)
def test_pii_replaced_with_typed_placeholder(kind, text, secret):
  counts = collections.Counter()
  out = clean.scrub_pii(text, counts)
  assert f'<{kind}>' in out, out
  assert secret not in out, out
  assert counts == {kind: 1}


def test_pii_keeps_the_context_around_the_secret():
  assert clean.scrub_pii('Authorization: Bearer abc123def456') == 'Authorization: Bearer <BEARER_TOKEN>'
  assert clean.scrub_pii("aws_secret_access_key='" + 'A1' * 20 + "'") == (
      "aws_secret_access_key='<AWS_KEY>'")
  assert clean.scrub_pii('mail a@b.org, c@d.net.') == 'mail <EMAIL>, <EMAIL>.'


LOOK_ALIKES = [
    'Python 3.11.7.1 is installed',
    'version 3.11.7.1',
    'version: 3.11.7.1',
    'pip install pkg==3.11.7.1',
    'requires>=3.11.7.1',
    'tag v3.11.7.1',
    'oid 1.3.6.1.4.1 (a longer dotted run)',
    'not an address 256.1.1.1',
    'color: #ff8800; background: #FFF;',
    'sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
    'commit 2f58076a9c1e0d3b4a5f6e7d8c9b0a1f2e3d4c5b',
    'uuid 123e4567-e89b-12d3-a456-426614174000',
    'plain numbers 1234567890 and 42 and 3.14159',
    'a large int 1234567890123456 that fails Luhn',
    'card-like 4111 1111 1111 1112 that fails Luhn',
    'calendar row 23 24 25 26 27 28 29',
    'dates 2024-01-15 and 15.01.2024, time 12:30:45.123',
    'slices a[::2], b[1:2:3] and C++ std::vector<int>, dict {1:2}',
    'mac 00:1A:2B:3C:4D:5E',
    '@property\ndef f(self): return x @ y',
    'the bearer of this letter',
    'task-management-dashboard-component',
    '+1.000000 and x += 12345678',
]


@pytest.mark.parametrize('text', LOOK_ALIKES)
def test_look_alikes_kept(text):
  counts = collections.Counter()
  assert clean.scrub_pii(text, counts) == text
  assert not counts


def test_version_vs_address_rule():
  """The same dotted quad is a version after a cue and an address otherwise."""
  assert clean.scrub_pii('Python 3.11.7.1') == 'Python 3.11.7.1'
  assert clean.scrub_pii('ping 3.11.7.1') == 'ping <IP_ADDRESS>'
  assert clean.scrub_pii('8.8.8.8 and 192.168.1.20') == '<IP_ADDRESS> and <IP_ADDRESS>'


def test_html_stripped_only_from_html():
  page = ('<!DOCTYPE html><html><head><title>T</title><style>p {color: red}</style>'
          '<script>var x = 1;</script></head><body><p>Fish &amp; chips</p>'
          '<div>second <b>bold</b> block</div></body></html>')
  text = clean.strip_html(page)
  assert text == 'T\n\nFish & chips\n\nsecond bold block'
  assert clean.looks_like_html(page)
  assert not clean.looks_like_html('if a < b and c > d:\n  return vector<int>()')


def test_clean_document_normalises_strips_and_scrubs():
  config = data_configs.get_config('files').clean
  doc = sources.Document('d', '<html><body><p>Cafe\u0301 owner: ann@example.com</p>'
                         '<p>' + 'plenty of ordinary words here. ' * 3 + '</p></body></html>', 'file')
  dropped, pii = collections.Counter(), collections.Counter()
  out = clean.clean_document(doc, config, dropped, pii)
  assert out.text.startswith('Caf\u00e9 owner: <EMAIL>\n')
  assert '<p>' not in out.text and pii == {'EMAIL': 1} and not dropped


def test_code_not_html_stripped_in_stdlib_preset():
  config = data_configs.get_config('stdlib').clean
  code = '<html>\n' + 'def f(a, b):\n  return a < b and b > 0\n' * 3 + '</p>\n'
  out = clean.clean_document(sources.Document('c', code, 'stdlib'), config,
                             collections.Counter(), collections.Counter())
  assert out.text == code


@pytest.mark.parametrize('text,reason', [
    ('tiny', 'too_short'),
    ('ok line\n' + 'x' * 1001 + '\n', 'line_too_long'),
    ('!@#$%^&*()_+{}|:"<>?~' * 10, 'low_alnum_fraction'),
    ('same line again\n' * 10 + 'one other line\n', 'repeated_lines'),
])
def test_quality_filters_drop_and_count_by_reason(text, reason):
  config = data_configs.get_config('files').clean
  dropped = collections.Counter()
  assert clean.clean_document(sources.Document('x', text, 'file'), config, dropped,
                              collections.Counter()) is None
  assert dropped == {reason: 1}


def test_real_stdlib_code_passes_the_filters():
  config = data_configs.get_config('stdlib').clean
  root = sources.stdlib_root()
  for rel in ('json/decoder.py', 'argparse.py', 'collections/__init__.py', 'typing.py'):
    with open(os.path.join(root, rel), encoding='utf-8') as f:
      assert clean.quality_problem(f.read(), config) is None, rel


def test_malformed_markup_that_html_parser_rejects_is_still_stripped():
  # html.parser raises AssertionError on `<![` followed by a non-name; the
  # document must be cleaned, not crash the run.
  text = '<html><body><p>Keep this text.</p><script>s = "<!["</script></body></html>'
  out = clean.strip_html(text)
  assert 'Keep this text.' in out
  assert '<p>' not in out and '<body>' not in out
