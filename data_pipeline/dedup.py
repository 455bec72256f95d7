"""Deduplication: exact duplicates, then near duplicates by MinHash-LSH.

Both passes visit documents sorted by id and keep the first of each group, so
the same input (in any order) gives the same kept set.

Exact: a hash of the text with whitespace runs collapsed to one space, so
re-indented or re-wrapped copies count as the same document.

Near: a document is a set of n-gram shingles of its whitespace-separated
words. Each shingle is hashed once to a 32-bit integer x; `num_perm`
multiply-shift hash functions h_k(x) = ((a_k x + b_k) mod 2^64) >> 32 act as
random permutations (no division: numpy's uint64 arithmetic wraps), and the
minimum of each over a document's shingles is its MinHash signature: the
fraction of equal signature entries estimates the Jaccard similarity. All of
it is numpy over one flat array of every document's shingles. LSH banding
(b bands of r rows, b * r <= num_perm, chosen to put the S-curve's threshold
at the configured Jaccard threshold) proposes candidate pairs; a candidate is
a duplicate only if its estimated Jaccard similarity is >= the threshold. A
document is dropped when it duplicates an earlier document that was kept, so
chains (A~B, B~C, A!~C) never drop C for resembling a dropped B.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from data_pipeline.sources import Document



def normalized_hash(text: str) -> bytes:
  return hashlib.blake2b(' '.join(text.split()).encode('utf-8'), digest_size=16).digest()


def exact_dedup(docs: Iterable[Document]) -> tuple[list[Document], list[tuple[str, str]]]:
  """Keeps the first (by id) of each group of identical texts.

  Returns (kept, [(dropped id, kept id)]).
  """
  first: dict[bytes, str] = {}
  kept, removed = [], []
  for doc in sorted(docs, key=lambda d: d.id):
    key = normalized_hash(doc.text)
    if key in first:
      removed.append((doc.id, first[key]))
    else:
      first[key] = doc.id
      kept.append(doc)
  return kept, removed


def shingle_hashes(text: str, ngram: int, vocab: dict[str, int],
                   fresh_ids: Iterator[int]) -> np.ndarray:
  """The distinct 32-bit hashes of the word n-grams of `text`.

  Words become integers through `vocab`: a new word takes the next of
  `fresh_ids` (all in C via map; ids need to be distinct, not dense).
  """
  words = text.split()
  if not words:
    return np.zeros(0, np.uint64)
  ids = np.fromiter(map(vocab.setdefault, words, fresh_ids), np.uint64, len(words))
  n = min(ngram, len(ids))  # A short document is one shingle of all its words.
  with np.errstate(over='ignore'):  # Wrap-around is the point of the mixing.
    h = np.zeros(len(ids) - n + 1, np.uint64)
    for k in range(n):
      h = h * np.uint64(0x9E3779B97F4A7C15) + ids[k:len(ids) - n + 1 + k] + np.uint64(1)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
  return np.unique(h >> np.uint64(32))


def minhash_signatures(shingles: Sequence[np.ndarray], num_perm: int,
                       seed: int = 0) -> np.ndarray:
  """[num_docs, num_perm] uint32 signatures; every shingle array must be non-empty."""
  rng = np.random.default_rng(seed)
  a = rng.integers(0, 2**63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # Odd.
  b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
  flat = np.concatenate(shingles)
  starts = np.cumsum([0] + [len(s) for s in shingles[:-1]])
  signatures = np.empty((len(shingles), num_perm), np.uint32)
  with np.errstate(over='ignore'):
    for k in range(num_perm):
      signatures[:, k] = np.minimum.reduceat((a[k] * flat + b[k]) >> np.uint64(32), starts)
  return signatures


def lsh_params(num_perm: int, threshold: float) -> tuple[int, int]:
  """(bands, rows) minimising the false positive + false negative areas."""
  s = np.linspace(0.0, 1.0, 1001)
  best, best_cost = (1, num_perm), float('inf')
  for rows in range(1, num_perm + 1):
    bands = num_perm // rows
    p = 1.0 - (1.0 - s ** rows) ** bands  # P(candidate | Jaccard s).
    cost = np.trapezoid(np.where(s < threshold, p, 0.0), s) + np.trapezoid(
        np.where(s >= threshold, 1.0 - p, 0.0), s)
    if cost < best_cost:
      best, best_cost = (bands, rows), cost
  return best


def candidate_pairs(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
  """[num_pairs, 2] (i < j) of documents equal in at least one band."""
  pairs = []
  for band in range(bands):
    block = np.ascontiguousarray(signatures[:, band * rows:(band + 1) * rows])
    keys = block.view(np.dtype((np.void, block.dtype.itemsize * rows))).ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    for group in np.flatnonzero(counts > 1):
      members = np.flatnonzero(inverse == group)
      i, j = np.triu_indices(len(members), k=1)
      pairs.append(np.stack([members[i], members[j]], axis=1))
  if not pairs:
    return np.zeros((0, 2), np.int64)
  return np.unique(np.concatenate(pairs), axis=0)


def near_dedup(docs: Iterable[Document], *, ngram: int = 5, num_perm: int = 128,
               threshold: float = 0.8, seed: int = 0,
               progress: Callable[[Iterable], Iterable] = lambda it: it,
               ) -> tuple[list[Document], list[tuple[str, str, float]]]:
  """Drops near duplicates; returns (kept, [(dropped id, kept id, similarity)])."""
  # Out of range, each silently removes distinct documents or none at all
  # (ngram=0 made 39 of 40 distinct documents "duplicates"); the config is
  # checked too, this guards library callers.
  if ngram < 1 or num_perm < 1 or not 0.0 < threshold <= 1.0:
    raise ValueError(f'near_dedup: need ngram >= 1, num_perm >= 1 and 0 < threshold <= 1; '
                     f'got ngram={ngram}, num_perm={num_perm}, threshold={threshold}')
  docs = sorted(docs, key=lambda d: d.id)
  vocab, fresh_ids = {}, itertools.count()
  shingles = [shingle_hashes(doc.text, ngram, vocab, fresh_ids) for doc in progress(docs)]
  indexed = [i for i, s in enumerate(shingles) if len(s)]  # No words: nothing to compare.
  if len(indexed) < 2:
    return docs, []
  signatures = minhash_signatures([shingles[i] for i in indexed], num_perm, seed)
  bands, rows = lsh_params(num_perm, threshold)
  pairs = candidate_pairs(signatures, bands, rows)
  similarity = np.zeros(0)
  if len(pairs):
    similarity = (signatures[pairs[:, 0]] == signatures[pairs[:, 1]]).mean(axis=1)
  earlier = collections.defaultdict(list)  # Later doc -> similar earlier docs.
  for (i, j), sim in zip(pairs, similarity):
    if sim >= threshold:
      earlier[indexed[j]].append((indexed[i], float(sim)))
  dropped: dict[int, tuple[int, float]] = {}
  for j in sorted(earlier):
    match = next(((i, sim) for i, sim in earlier[j] if i not in dropped), None)
    if match is not None:
      dropped[j] = match
  kept = [doc for k, doc in enumerate(docs) if k not in dropped]
  removed = [(docs[j].id, docs[i].id, sim) for j, (i, sim) in sorted(dropped.items())]
  return kept, removed
