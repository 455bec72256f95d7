"""Loader throughput: packed rows per second from the pre-tokenized shards.

  python -m benchmarks.loader --data_dir=runs/data --seq_len=256 --batch_size=32

Prints one JSON object: rows/s and tokens/s for shuffled training batches and
for unshuffled evaluation batches, the fraction of row slots that hold real
tokens, the time to the first batch (and from creating the loader to it,
which evaluation pays every time), and the cost of saving and restoring the
iterator state. The training step must never wait on this.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import numpy as np

from configs import cli
from data_pipeline import loader as loader_lib
from train import console

_DATA_DIR = flags.DEFINE_string('data_dir', 'runs/data', 'Data workdir from `python -m data_pipeline`.')
_SPLIT = flags.DEFINE_string('split', 'train', 'Split to read.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 256, 'Row length.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Rows per batch.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 300, 'Batches timed per mode.')


def _time_batches(loader: loader_lib.Loader, num_batches: int) -> dict[str, float]:
  start = time.perf_counter()
  first = next(loader)
  first_batch_s = time.perf_counter() - start
  real = int((first['segment_ids'] != 0).sum())
  rows, timed = first['tokens'].shape[0], 0
  start = time.perf_counter()
  for batch in loader:
    real += int((batch['segment_ids'] != 0).sum())
    rows += batch['tokens'].shape[0]
    timed += 1
    if timed >= num_batches:
      break
  elapsed = time.perf_counter() - start
  timed_rows = rows - first['tokens'].shape[0]
  seq_len = first['tokens'].shape[1]
  return {
      'batches': timed,
      'rows_per_sec': timed_rows / elapsed,
      'tokens_per_sec': timed_rows * seq_len / elapsed,
      'fill_fraction': real / (rows * seq_len),
      'first_batch_s': first_batch_s,
  }


def main(argv: list[str]) -> None:
  del argv
  console.quiet_libraries()  # library INFO logs would bury the report
  if not os.path.exists(os.path.join(_DATA_DIR.value, 'DONE')):
    raise cli.UserError(f'no finished dataset in {_DATA_DIR.value!r}: run '
                     f'`python -m data_pipeline --config=configs/data.py:stdlib --workdir={_DATA_DIR.value}` first.')
  common = dict(seq_len=_SEQ_LEN.value, batch_size=_BATCH_SIZE.value)
  start = time.perf_counter()
  train = loader_lib.make_loader(_DATA_DIR.value, _SPLIT.value, seed=0, **common)
  create_s = time.perf_counter() - start
  result = {'data_dir': _DATA_DIR.value, 'split': _SPLIT.value, 'seq_len': _SEQ_LEN.value,
            'batch_size': _BATCH_SIZE.value, 'train': _time_batches(train, _NUM_BATCHES.value)}
  result['train']['create_to_first_batch_s'] = create_s + result['train']['first_batch_s']

  start = time.perf_counter()
  state = json.loads(json.dumps(train.get_state()))
  restored = loader_lib.make_loader(_DATA_DIR.value, _SPLIT.value, seed=0, **common)
  restored.set_state(state)
  expected, got = next(train), next(restored)
  result['state_restore_s'] = time.perf_counter() - start
  result['state_restore_exact'] = all(np.array_equal(expected[k], got[k]) for k in expected)

  start = time.perf_counter()
  evaluation = loader_lib.make_loader(_DATA_DIR.value, _SPLIT.value, num_epochs=1, shuffle=False,
                                      drop_remainder=False, **common)
  create_s = time.perf_counter() - start
  result['eval'] = _time_batches(evaluation, _NUM_BATCHES.value)
  result['eval']['create_to_first_batch_s'] = create_s + result['eval']['first_batch_s']
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  cli.run(main)
