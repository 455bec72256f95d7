"""Packing plan: hand-worked examples of the rule (fitting documents whole, long ones cut)."""

from __future__ import annotations

import numpy as np

from data_pipeline import packing


def _pieces(plan: packing.Plan) -> list[tuple[int, ...]]:
  return list(zip(plan.doc.tolist(), plan.start.tolist(), plan.length.tolist(),
                  plan.row.tolist(), plan.col.tolist(), plan.segment.tolist()))


def test_fitting_documents_are_never_cut_and_long_ones_fill_rows():
  # Rows of 8; sizes include bos/eos. (doc, start, length, row, col, segment):
  plan = packing.plan_epoch(np.array([0, 1, 2, 3]), np.array([3, 6, 20, 2]), 8)
  assert _pieces(plan) == [
      (0, 0, 3, 0, 0, 1),
      (1, 0, 6, 1, 0, 1),   # 3 + 6 > 8: row 0 closes with padding.
      (2, 0, 2, 1, 6, 2),   # Too long for any row: fills the rest of row 1...
      (2, 2, 8, 2, 0, 1),   # ...then whole rows...
      (2, 10, 8, 3, 0, 1),
      (2, 18, 2, 4, 0, 1),  # ...and its tail starts row 4,
      (3, 0, 2, 4, 2, 2)]   # which the next document shares.
  assert plan.num_rows == 5


def test_exactly_full_rows_and_order():
  plan = packing.plan_epoch(np.array([3, 2, 1, 0]), np.array([9, 4, 4, 8]), 8)
  assert _pieces(plan) == [
      (3, 0, 8, 0, 0, 1),
      (2, 0, 4, 1, 0, 1), (1, 0, 4, 1, 4, 2),
      (0, 0, 8, 2, 0, 1), (0, 8, 1, 3, 0, 1)]
  assert plan.num_rows == 4
  which, piece = plan.pieces(np.array([1, 3]))
  assert which.tolist() == [0, 0, 1] and piece.tolist() == [1, 2, 4]
