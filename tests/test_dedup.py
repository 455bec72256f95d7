"""Dedup: exact and near duplicates removed, distinct documents kept, deterministic."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data_pipeline import dedup
from data_pipeline.sources import Document

_WORDS = [f'w{i}' for i in range(5000)]


def _text(seed: int, num_words: int = 300) -> str:
  rng = random.Random(seed)
  return ' '.join(rng.choice(_WORDS) for _ in range(num_words))


def _edit(text: str, num_changes: int, seed: int) -> str:
  words = text.split()
  rng = random.Random(seed)
  for k in rng.sample(range(len(words)), num_changes):
    words[k] = f'changed{k}'
  return ' '.join(words)


def _shingles(text: str, n: int = 5) -> set[str]:
  words = text.split()
  return {' '.join(words[i:i + n]) for i in range(len(words) - n + 1)}


def _jaccard(a: str, b: str) -> float:
  sa, sb = _shingles(a), _shingles(b)
  return len(sa & sb) / len(sa | sb)


def _corpus() -> tuple[list[Document], dict[str, float]]:
  base = _text(0)
  near = _edit(base, 2, seed=1)         # ~0.94 Jaccard: a near duplicate.
  far = _edit(base, 40, seed=2)         # ~0.3 Jaccard: a distinct revision.
  docs = [
      Document('a/base', base, 't'),
      Document('b/near', near, 't'),
      Document('c/far', far, 't'),
      Document('d/exact', '  ' + base.replace(' ', '\n', 7) + '\n', 't'),  # Whitespace only.
  ] + [Document(f'e/distinct{i}', _text(100 + i), 't') for i in range(20)]
  return docs, {'near': _jaccard(base, near), 'far': _jaccard(base, far)}


def test_fixture_similarities_are_what_the_test_assumes():
  _, sims = _corpus()
  assert sims['near'] > 0.9 and sims['far'] < 0.5


def test_exact_duplicates_removed_ignoring_whitespace():
  docs, _ = _corpus()
  kept, removed = dedup.exact_dedup(docs)
  assert removed == [('d/exact', 'a/base')]
  assert 'd/exact' not in {d.id for d in kept} and 'a/base' in {d.id for d in kept}


def test_near_duplicates_above_threshold_removed_distinct_kept():
  docs, _ = _corpus()
  kept, removed = dedup.near_dedup(docs[:3] + docs[4:], threshold=0.8)
  kept_ids = {d.id for d in kept}
  assert [(a, b) for a, b, _ in removed] == [('b/near', 'a/base')]
  assert removed[0][2] >= 0.8
  assert kept_ids == {d.id for d in docs} - {'b/near', 'd/exact'}


def test_threshold_is_respected():
  docs, sims = _corpus()
  # With a threshold above the near pair's similarity nothing is removed.
  kept, removed = dedup.near_dedup(docs[:3], threshold=0.99)
  assert not removed and len(kept) == 3
  # With a threshold below the far pair's similarity it goes too.
  kept, removed = dedup.near_dedup(docs[:3], threshold=max(0.1, sims['far'] - 0.15))
  assert [d.id for d in kept] == ['a/base']


def test_keeps_first_by_id_and_is_deterministic():
  docs, _ = _corpus()
  first, _ = dedup.near_dedup(docs)
  shuffled = docs[:]
  random.Random(3).shuffle(shuffled)
  second, removed = dedup.near_dedup(shuffled)
  assert [d.id for d in first] == [d.id for d in second]
  # The earliest id of a group survives, whatever the input order.
  assert 'a/base' in {d.id for d in second} and 'b/near' in {a for a, _, _ in removed}


def test_chains_do_not_drop_a_document_for_resembling_a_dropped_one():
  base = _text(7)
  step1 = _edit(base, 6, seed=8)
  step2 = _edit(step1, 6, seed=9)  # Close to step1, further from base.
  docs = [Document('1', base, 't'), Document('2', step1, 't'), Document('3', step2, 't')]
  threshold = (_jaccard(base, step2) + min(_jaccard(base, step1), _jaccard(step1, step2))) / 2
  kept, removed = dedup.near_dedup(docs, threshold=threshold, num_perm=1024)
  assert [d.id for d in kept] == ['1', '3'] and [r[0] for r in removed] == ['2']


def test_minhash_estimates_jaccard():
  a, b = _text(11, 2000), _edit(_text(11, 2000), 150, seed=12)
  vocab, ids = {}, iter(range(10**9))
  sig = dedup.minhash_signatures(
      [dedup.shingle_hashes(t, 5, vocab, ids) for t in (a, b)], num_perm=256)
  estimate = float(np.mean(sig[0] == sig[1]))
  assert abs(estimate - _jaccard(a, b)) < 0.08


def test_lsh_bands_put_the_threshold_near_the_target():
  bands, rows = dedup.lsh_params(128, 0.8)
  assert bands * rows <= 128
  assert 0.7 <= (1 / bands) ** (1 / rows) <= 0.9


@pytest.mark.parametrize('settings', [
    {'ngram': 0}, {'num_perm': 0}, {'threshold': 0.0}, {'threshold': 2.0}, {'threshold': -1.0},
])
def test_settings_out_of_range_are_refused_not_applied(settings):
  docs = [Document(f'd{i}', _text(i), 'test') for i in range(40)]
  assert len(dedup.near_dedup(docs)[0]) == 40  # Distinct documents.
  with pytest.raises(ValueError, match=f'{next(iter(settings))}='):
    dedup.near_dedup(docs, **settings)
