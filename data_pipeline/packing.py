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

  def pieces(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row index into `rows`, piece index) of every piece of those rows, in order."""
    first = np.searchsorted(self.row, rows)
    count = np.searchsorted(self.row, rows + 1) - first
    which = np.repeat(np.arange(len(rows)), count)
    # Piece indices first[k], first[k] + 1, ... for each row k, concatenated.
    offsets = np.arange(len(which)) - np.repeat(np.cumsum(count) - count, count)
    return which, np.repeat(first, count) + offsets


def plan_epoch(order: np.ndarray, lengths: np.ndarray, seq_len: int) -> Plan:
  """Packs documents `order` (indices into `lengths`, bos/eos included) into rows."""
  sizes = lengths.tolist()  # Python ints: this loop runs once per document.
  docs, starts, pieces_len, rows, cols = [], [], [], [], []
  row = used = 0
  for doc in order.tolist():
    size = sizes[doc]
    if size <= seq_len:
      if used + size > seq_len:  # Close the row with padding.
        row, used = row + 1, 0
      docs.append(doc)
      starts.append(0)
      pieces_len.append(size)
      rows.append(row)
      cols.append(used)
      used += size
    else:  # The rest of this row, then whole rows from column 0.
      later = range(seq_len - used, size, seq_len)
      k = 1 + len(later)
      docs.extend([doc] * k)
      starts.append(0)
      starts.extend(later)
      pieces_len.append(seq_len - used)
      pieces_len.extend([seq_len] * (k - 2))
      pieces_len.append(size - later[-1])
      rows.extend(range(row, row + k))
      cols.append(used)
      cols.extend([0] * (k - 1))
      row, used = row + k - 1, size - later[-1]
    if used == seq_len:
      row, used = row + 1, 0
  num_rows = row + (used > 0)
  as_array = lambda values: np.array(values, np.int64)
  rows_ = as_array(rows)
  # Segment = 1 + the piece's place in its row.
  segment = np.arange(len(rows_)) - np.searchsorted(rows_, rows_) + 1
  return Plan(as_array(docs), as_array(starts), as_array(pieces_len), rows_, as_array(cols),
              segment, num_rows)
