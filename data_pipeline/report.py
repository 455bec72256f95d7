"""What each stage did, as counts: the content of `data_report.json`.

Per stage: documents and UTF-8 bytes in and out, and the documents dropped by
reason (they sum to in - out). The sources stage names the skipped files and
records with their reasons (the first ones), the clean stage adds PII
replacements by type, dedup adds examples of near-duplicate pairs, and the
report ends with documents, bytes and tokens per split. A run that fails still
writes its report, with the stages it finished and the error.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Iterable

from data_pipeline.sources import Document


def num_bytes(docs: Iterable[Document]) -> int:
  return sum(len(doc.text.encode('utf-8')) for doc in docs)


@dataclasses.dataclass
class Stage:
  name: str
  documents_in: int = 0
  bytes_in: int = 0
  documents_out: int = 0
  bytes_out: int = 0
  dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  details: dict[str, Any] = dataclasses.field(default_factory=dict)
  seconds: float = 0.0

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    del out['name']  # The key it is stored under.
    out['dropped'] = dict(sorted(self.dropped.items()))
    out['seconds'] = round(self.seconds, 2)
    return out


@dataclasses.dataclass
class Report:
  stages: list[Stage] = dataclasses.field(default_factory=list)
  splits: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def stage(self, name: str) -> Stage:
    self.stages.append(Stage(name))
    return self.stages[-1]

  def to_dict(self) -> dict[str, Any]:
    return {
        **self.meta,
        'stages': {stage.name: stage.to_dict() for stage in self.stages},
        'splits': self.splits,
    }


def write(report: dict[str, Any], path: str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(report, f, indent=2, sort_keys=False)
    f.write('\n')
  os.replace(tmp, path)


def what_was_dropped(report: dict[str, Any]) -> str:
  """One line: documents in and out of each stage so far and why each was dropped.

  E.g. `sources 40 -> 40; clean 40 -> 0 (too_short: 40); exact_dedup 0 -> 0`.
  """
  parts = []
  for name, s in report['stages'].items():
    dropped = ', '.join(f'{reason}: {n:,}' for reason, n in sorted(s['dropped'].items()) if n)
    parts.append(f"{name} {s['documents_in']:,} -> {s['documents_out']:,}"
                 + (f' ({dropped})' if dropped else ''))
  return '; '.join(parts)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
  """Left-aligns the first column, right-aligns the rest, rules off the header."""
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(cell.ljust(w) if i == 0 else cell.rjust(w)
                     for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
  return [lines[0], '-' * len(lines[0])] + lines[1:]


def summary_table(report: dict[str, Any]) -> str:
  """The stages (documents and bytes in/out, dropped) and the splits of a report."""
  stages = [('stage', 'docs in', 'docs out', 'dropped', 'MB in', 'MB out')] + [
      (name, f"{s['documents_in']:,}", f"{s['documents_out']:,}",
       f"{sum(s['dropped'].values()):,}", f"{s['bytes_in'] / 1e6:.2f}",
       f"{s['bytes_out'] / 1e6:.2f}") for name, s in report['stages'].items()]
  splits = [('split', 'docs', 'tokens', 'MB')] + [
      (name, f"{s['documents']:,}", f"{s['tokens']:,}", f"{s['bytes'] / 1e6:.2f}")
      for name, s in report.get('splits', {}).items()]
  return '\n'.join(_table(stages) + [''] + _table(splits))
