"""Train / validation / test assignment by a hash of the document id.

A document's split depends on its id alone, so it never moves when other
documents are added or removed, and it is the same on every machine (a keyed
blake2b, not Python's per-process `hash`). It runs after dedup, so near
duplicates never straddle splits.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

from data_pipeline.sources import Document

SPLITS = ('train', 'validation', 'test')


def unit_interval(doc_id: str, salt: str = 'strata-split') -> float:
  """A uniform number in [0, 1) determined by `doc_id`."""
  digest = hashlib.blake2b(doc_id.encode('utf-8'), digest_size=8,
                           key=salt.encode('utf-8')).digest()
  return int.from_bytes(digest, 'big') / 2.0**64


def assign_split(doc_id: str, validation: float = 0.01, test: float = 0.01) -> str:
  """'validation' for the first `validation` of [0, 1), 'test' next, else 'train'."""
  if not (0.0 <= validation and 0.0 <= test and validation + test < 1.0):
    raise ValueError(f'Split fractions validation={validation}, test={test} must be '
                     '>= 0 and leave room for train.')
  u = unit_interval(doc_id)
  if u < validation:
    return 'validation'
  if u < validation + test:
    return 'test'
  return 'train'


def split_documents(docs: Iterable[Document], validation: float = 0.01,
                    test: float = 0.01) -> dict[str, list[Document]]:
  """Documents per split (every split present, possibly empty), in input order."""
  out: dict[str, list[Document]] = {name: [] for name in SPLITS}
  for doc in docs:
    out[assign_split(doc.id, validation, test)].append(doc)
  return out
