"""The packing plan: which piece of which document fills each row of an epoch.

Computed from document lengths alone (`shards.document_lengths`), so every
process plans the same global rows without reading a record, and then reads
only the rows it holds (`data_pipeline.loader`).

The rule: documents are taken in order and laid into rows of `seq_len`. A
document that fits in a row is never cut: if it does not fit in what is left of
the row, the row is closed with padding and the document starts the next one.
A longer document must be cut anyway, so its first piece fills the rest of the
current row and the following pieces fill whole rows. Each piece is one segment
of its row (segment ids 1, 2, ... in row order; 0 is padding).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Plan:
  """The pieces of one epoch's rows, in row order.

  Piece i is elements [start[i], start[i] + length[i]) of document doc[i] (a
  document here includes its bos and eos), placed in row row[i] at column
  col[i] as segment segment[i].
  """
  doc: np.ndarray
  start: np.ndarray
  length: np.ndarray
  row: np.ndarray
  col: np.ndarray
  segment: np.ndarray
  num_rows: int

  def pieces(self, row: int) -> range:
    """Indices of the pieces of `row`."""
    first, end = np.searchsorted(self.row, [row, row + 1])
    return range(int(first), int(end))


def plan_epoch(order: np.ndarray, lengths: np.ndarray, seq_len: int) -> Plan:
  """Packs documents `order` (indices into `lengths`, bos/eos included) into rows."""
  pieces: list[tuple[int, int, int, int, int]] = []  # (doc, start, length, row, col)
  row = used = 0
  for doc in order.tolist():
    size = int(lengths[doc])
    if size <= seq_len:
      if used + size > seq_len:  # Close the row with padding.
        row, used = row + 1, 0
      pieces.append((doc, 0, size, row, used))
      used += size
    else:
      start = 0
      while start < size:
        n = min(seq_len - used, size - start)
        pieces.append((doc, start, n, row, used))
        start, used = start + n, used + n
        if used == seq_len:
          row, used = row + 1, 0
    if used == seq_len:
      row, used = row + 1, 0
  num_rows = row + (used > 0)
  table = np.array(pieces, np.int64).reshape(-1, 5)
  doc, start, length, rows, col = table.T
  # Segment = 1 + the piece's place in its row.
  first_of_row = np.searchsorted(rows, rows)
  segment = np.arange(len(rows)) - first_of_row + 1
  return Plan(doc, start, length, rows, col, segment, num_rows)
