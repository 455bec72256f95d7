"""Copy-task rows mixed into pre-training batches: random tokens, then the same again.

Copying from the context (an "induction head": find the earlier occurrence of
the current token and predict what followed it) is what lets a model write the
function name its prompt asked for. Language models grow it only after far
more tokens than a CPU run sees: `tiny` after 2M or 8M tokens of code does not
copy at all (README, "Preferences"), so every stage after it that needs a
look-back has nothing to build on. These rows can only be predicted by
copying, and since x's length varies the copy must be found by content, not
at a fixed offset: the hope was that they teach it early. Measured on `tiny`,
they did not within a CPU budget at a learning rate of 3e-3 (README,
"Preferences": 450 steps at a quarter of the rows, 300 at all of them); a
fixed offset, which a positional head solves, is learnt in ~150 steps. At
1e-3 content-based copying does start (benchmarks/copy_learning.py: `tiny`
on nothing but copy rows, 9.06 -> 6.80 nats on the repeats in 800 steps; a
2-layer model of its width, 0.24 after 2,000), still more steps than a
quarter of a 450-step run gives it. `tiny` with half its rows copy rows (x
of 8-32) for 2,000 steps at 1e-3 had not formed one either: 5.33 nats on
held-out copy rows, still falling slowly (README, "Preferences").

Each copy row packs documents [BOS] x x [EOS], x a uniform draw of
`min_len..max_len` ordinary token ids, with `segment_ids`/`positions` like the
packer's so attention never crosses them. Its `loss_mask` is 0 on BOS, the
first x (noise: nothing predicts it, and learning it would only flatten the
model's unigram prior) and the repeat's first token (nothing says where the
repeat starts), and 1 on the rest of the repeat and EOS; real rows get a
`loss_mask` of 1 wherever they have a token, so the loss is the one of
`train/losses.py` unchanged.

Which rows are replaced, and by what, is a function of (seed, step, global
row) only: the same on any number of processes and after a resume. The real
rows a copy row replaces are skipped for that epoch (the loader's plan does
not move), so `fraction` of the batch's rows trade real text for the task.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# Salt of the row rng, so it never equals another rng seeded by (seed, step).
_SALT = 0xC0B1


@dataclasses.dataclass(frozen=True)
class CopyTask:
  """fraction: share of each batch's rows replaced; x is `min_len..max_len` ids from `ids`."""
  fraction: float
  min_len: int
  max_len: int
  ids: np.ndarray

  def __post_init__(self):
    if not 0.0 <= self.fraction <= 1.0:
      raise ValueError(f'copy task fraction must be in [0, 1], got {self.fraction}')
    if not 1 <= self.min_len <= self.max_len:
      raise ValueError(f'copy task lengths must satisfy 1 <= min_len <= max_len, got '
                       f'{self.min_len}, {self.max_len}')
    if len(self.ids) < 2:
      raise ValueError('copy task needs at least 2 token ids to draw from')


def row(rng: np.random.Generator, seq_len: int, task: CopyTask, bos_id: int,
        eos_id: int) -> dict[str, np.ndarray]:
  """One packed row of [BOS] x x [EOS] documents (the last one cut at seq_len)."""
  out = {k: np.zeros(seq_len, np.int32) for k in ('tokens', 'segment_ids', 'positions',
                                                   'loss_mask')}
  col, segment = 0, 1
  while col < seq_len:
    x = task.ids[rng.integers(0, len(task.ids), size=rng.integers(task.min_len,
                                                                   task.max_len + 1))]
    doc = np.concatenate([[bos_id], x, x, [eos_id]]).astype(np.int32)
    # Learnt: the repeat after its first token (which nothing announces), and EOS.
    mask = np.concatenate([np.zeros(2 + len(x)), np.ones(len(x))]).astype(np.int32)
    n = min(len(doc), seq_len - col)
    out['tokens'][col:col + n] = doc[:n]
    out['loss_mask'][col:col + n] = mask[:n]
    out['segment_ids'][col:col + n] = segment
    out['positions'][col:col + n] = np.arange(n)
    col, segment = col + n, segment + 1
  return out


def mix(batch: dict[str, np.ndarray], step: int, rows: np.ndarray, task: CopyTask,
        seed: int, bos_id: int, eos_id: int) -> dict[str, np.ndarray]:
  """`batch` (this process's `rows` of global batch `step`) with copy rows mixed in.

  The result always has a `loss_mask` (1 on every real token of a real row).
  """
  unknown = set(batch) - {'tokens', 'segment_ids', 'positions', 'loss_mask'}
  if unknown:
    raise ValueError(f'copy task rows cannot fill the fields {sorted(unknown)}')
  out = {k: np.array(v) for k, v in batch.items()}
  if 'loss_mask' not in out:
    out['loss_mask'] = (out['segment_ids'] > 0).astype(np.int32)
  seq_len = out['tokens'].shape[1]
  for i, global_row in enumerate(np.asarray(rows).tolist()):
    rng = np.random.default_rng([_SALT, seed, step, global_row])
    if rng.random() < task.fraction:
      for name, values in row(rng, seq_len, task, bos_id, eos_id).items():
        out[name][i] = values
  return out


class Mixed:
  """A train loader whose batches have copy rows mixed in; state and length are the loader's."""

  def __init__(self, loader: Any, task: CopyTask, seed: int, bos_id: int, eos_id: int):
    self._loader, self._task, self._seed = loader, task, seed
    self._bos, self._eos = bos_id, eos_id
    self.num_batches, self.rows = loader.num_batches, loader.rows

  def __iter__(self) -> Mixed:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    step = self._loader.step
    batch = next(self._loader)
    return mix(batch, step, self.rows, self._task, self._seed, self._bos, self._eos)

  def get_state(self) -> dict[str, Any]:
    return self._loader.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._loader.set_state(state)
