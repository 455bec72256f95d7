"""Loader: packing invariants, exact epochs, shuffling, process-count independence, state."""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from data_pipeline import loader
from data_pipeline import shards
from data_pipeline.tokenizer import BOS_ID, EOS_ID

SEQ_LEN = 16


def _documents(n: int, seed: int) -> list[list[int]]:
  # Lengths around every packing edge: empty, exactly filling a row with
  # bos/eos, one over, and several rows long. Token ids >= 4 so bos/eos only
  # come from the loader.
  rng = np.random.default_rng(seed)
  edges = [0, 1, SEQ_LEN - 3, SEQ_LEN - 2, SEQ_LEN - 1, SEQ_LEN, 3 * SEQ_LEN + 5]
  lengths = edges + rng.integers(0, 2 * SEQ_LEN, size=n - len(edges)).tolist()
  return [rng.integers(4, 500, size=length).tolist() for length in lengths]


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> tuple[str, list[list[int]]]:
  workdir = str(tmp_path_factory.mktemp('data'))
  docs = _documents(41, 0)
  shards.write_dataset(workdir, {
      'train': [(f'd{i}', d, 10 * len(d) + 1) for i, d in enumerate(docs)],
      'validation': [(f'v{i}', d, 1) for i, d in enumerate(_documents(9, 1))]})
  return workdir, docs


def _check_row(tokens, segment_ids, positions) -> list[np.ndarray]:
  """Asserts the packing invariants of one row; returns its pieces in order."""
  num_real = int(np.count_nonzero(segment_ids))
  # Padding only at the end, and all zero.
  assert (segment_ids[:num_real] > 0).all()
  assert not tokens[num_real:].any() and not positions[num_real:].any()
  pieces = []
  ids = segment_ids[:num_real]
  # Segments are 1, 2, 3, ... in contiguous blocks.
  starts = np.flatnonzero(np.diff(ids, prepend=0))
  assert ids[starts].tolist() == list(range(1, len(starts) + 1))
  for k, start in enumerate(starts):
    end = starts[k + 1] if k + 1 < len(starts) else num_real
    piece = tokens[start:end]
    # Positions restart at 0 for each piece.
    assert positions[start:end].tolist() == list(range(end - start))
    # One document per segment: bos only first, eos only last.
    assert BOS_ID not in piece[1:] and EOS_ID not in piece[:-1]
    # Only the first piece of a row may continue a document.
    assert k == 0 or piece[0] == BOS_ID
    pieces.append(piece)
  return pieces


def _documents_from(batches) -> list[list[int]]:
  """Reassembles the documents (without bos/eos) from a stream of batches."""
  docs, current = [], None
  for batch in batches:
    assert set(batch) == {'tokens', 'segment_ids', 'positions'}
    for v in batch.values():
      assert v.dtype == np.int32 and v.shape[1] == SEQ_LEN
    for row in zip(batch['tokens'], batch['segment_ids'], batch['positions']):
      for piece in _check_row(*row):
        if piece[0] == BOS_ID:
          assert current is None, 'a document started before the last one ended'
          current = []
        assert current is not None, 'a piece continues no document'
        current.extend(piece.tolist())
        if piece[-1] == EOS_ID:
          docs.append(current[1:-1])
          current = None
  assert current is None, 'the stream ended inside a document'
  return docs


def _counter(docs) -> collections.Counter:
  return collections.Counter(tuple(d) for d in docs)


def _make(workdir, **kwargs) -> loader.Loader:
  args = dict(seq_len=SEQ_LEN, batch_size=4, seed=0)
  args.update(kwargs)
  return loader.make_loader(workdir, args.pop('split', 'train'), **args)


def test_one_epoch_packs_every_document_exactly_once(data):
  workdir, docs = data
  batches = list(_make(workdir, num_epochs=1, drop_remainder=False))
  assert _counter(_documents_from(batches)) == _counter(docs)
  # Packing is tight: only documents that fit a row whole cause padding.
  num_tokens = sum(len(d) + 2 for d in docs)
  num_rows = sum(int(b['segment_ids'].any(axis=1).sum()) for b in batches)
  assert num_rows < 1.5 * num_tokens / SEQ_LEN


def test_eval_mode_covers_every_token_once_in_order(data):
  workdir, docs = data
  batches = list(_make(workdir, batch_size=3, num_epochs=1, shuffle=False,
                       drop_remainder=False))
  assert all(b['tokens'].shape == (3, SEQ_LEN) for b in batches)
  assert _documents_from(batches) == docs
  num_tokens = sum(int(np.count_nonzero(b['segment_ids'])) for b in batches)
  assert num_tokens == sum(len(d) + 2 for d in docs)
  # The last batch was padded with all-zero rows.
  assert not batches[-1]['segment_ids'][-1].any()


def test_drop_remainder_gives_full_batches(data):
  workdir, _ = data
  batches = list(_make(workdir, batch_size=5, num_epochs=1, drop_remainder=True))
  assert batches and all(b['tokens'].shape == (5, SEQ_LEN) for b in batches)


def _epoch_orders(workdir, seed, num_docs):
  stream = _documents_from(_make(workdir, seed=seed, num_epochs=2, drop_remainder=False))
  assert len(stream) == 2 * num_docs
  return stream[:num_docs], stream[num_docs:]


def test_shuffle_changes_per_epoch_and_is_reproducible(data):
  workdir, docs = data
  first, second = _epoch_orders(workdir, 0, len(docs))
  assert _counter(first) == _counter(second) == _counter(docs)
  assert first != docs and second != first
  assert _epoch_orders(workdir, 0, len(docs)) == (first, second)
  assert _epoch_orders(workdir, 1, len(docs))[0] != first


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_restored_state_continues_exactly(data):
  workdir, docs = data
  reference = _make(workdir, batch_size=2)
  expected = [next(reference) for _ in range(60)]
  # An epoch is about 25 batches here, so k = 40 resumes inside epoch two.
  rows_per_epoch = sum(len(d) + 2 for d in docs) / SEQ_LEN / 2
  assert rows_per_epoch < 40
  epochs = []
  for k in [0, 1, 7, 13, 24, 25, 26, 40]:
    run = _make(workdir, batch_size=2)
    for _ in range(k):
      next(run)
    state = json.loads(json.dumps(run.get_state()))
    epochs.append(state['epoch'])
    resumed = _make(workdir, batch_size=2)
    resumed.set_state(state)
    for i in range(k, k + 12):
      assert _same(next(resumed), expected[i]), (k, i)
  assert epochs[0] == 0 and epochs[-1] == 1


def test_restore_in_eval_mode_near_the_end(data):
  workdir, _ = data
  expected = list(_make(workdir, num_epochs=1, shuffle=False, drop_remainder=False))
  run = _make(workdir, num_epochs=1, shuffle=False, drop_remainder=False)
  for _ in range(len(expected) - 1):
    next(run)
  resumed = _make(workdir, num_epochs=1, shuffle=False, drop_remainder=False)
  resumed.set_state(run.get_state())
  assert _same(next(resumed), expected[-1])
  with pytest.raises(StopIteration):
    next(resumed)


def test_state_from_other_settings_is_refused(data):
  workdir, _ = data
  state = _make(workdir).get_state()
  with pytest.raises(ValueError, match='seed=0, 1'):
    _make(workdir, seed=1).set_state(state)


def _halves(batch_size: int) -> list[list[int]]:
  """Rows of two processes that hold alternating pairs of rows (not contiguous)."""
  return [[r for r in range(batch_size) if (r // 2) % 2 == p] for p in range(2)]


def _assembled(parts: list[dict[str, np.ndarray]], rows: list[list[int]]) -> dict:
  batch_size = sum(len(r) for r in rows)
  out = {k: np.zeros((batch_size, SEQ_LEN), np.int32) for k in parts[0]}
  for part, part_rows in zip(parts, rows):
    for k, v in part.items():
      out[k][part_rows] = v
  return out


@pytest.mark.parametrize('kwargs', [dict(), dict(num_epochs=1, shuffle=False,
                                                 drop_remainder=False)])
def test_global_batch_does_not_depend_on_the_process_count(data, kwargs):
  workdir, _ = data
  one = _make(workdir, batch_size=8, **kwargs)
  rows = _halves(8)
  two = [_make(workdir, batch_size=8, rows=r, **kwargs) for r in rows]
  assert two[0].num_batches == one.num_batches
  for step in range(one.num_batches or 30):
    expected = next(one)
    assert _same(_assembled([next(t) for t in two], rows), expected), step
  if kwargs:
    with pytest.raises(StopIteration):
      next(two[0])


def test_state_saved_by_two_processes_resumes_in_one_and_back(data):
  workdir, _ = data
  reference = _make(workdir, batch_size=8)
  expected = [next(reference) for _ in range(14)]
  rows = _halves(8)
  two = [_make(workdir, batch_size=8, rows=r) for r in rows]
  for _ in range(5):
    for t in two:
      next(t)
  states = [json.loads(json.dumps(t.get_state())) for t in two]
  assert states[0] == states[1]  # Any process's file will do.
  one = _make(workdir, batch_size=8)
  one.set_state(states[1])
  for step in range(5, 10):
    assert _same(next(one), expected[step]), step
  back = [_make(workdir, batch_size=8, rows=r) for r in rows]
  for t in back:
    t.set_state(one.get_state())
  for step in range(10, 14):
    assert _same(_assembled([next(t) for t in back], rows), expected[step]), step


def test_version_1_state_keeps_the_step(data):
  workdir, _ = data
  expected = list(itertools.islice(_make(workdir), 4))
  run = _make(workdir)
  run.set_state({'version': 1, 'spec': {'process_index': 0}, 'iterator': {}, 'emitted': 3})
  assert _same(next(run), expected[3])


@pytest.mark.parametrize('kwargs', [
    dict(num_epochs=1, drop_remainder=False),
    dict(num_epochs=1, drop_remainder=True, batch_size=3),
    dict(num_epochs=3, drop_remainder=False, shuffle=False, batch_size=5),
    dict(num_epochs=2, drop_remainder=True, seq_len=7),
])
def test_num_batches_is_exact(data, kwargs):
  workdir, _ = data
  run = _make(workdir, **kwargs)
  assert run.num_batches == len(list(run))
  assert _make(workdir).num_batches is None  # Repeats forever.


def test_eval_mode_with_processes_sees_every_token_once(data):
  workdir, _ = data
  docs = _documents(9, 1)  # The validation split.
  rows = [[0, 2], [1]]
  runs = [list(_make(workdir, split='validation', batch_size=3, num_epochs=1,
                     drop_remainder=False, shuffle=False, rows=r)) for r in rows]
  assert len(runs[0]) == len(runs[1])  # Every process takes part in every step.
  batches = [{k: np.concatenate([a[k], b[k]])[[0, 2, 1]] for k in a}
             for a, b in zip(*runs)]
  assert _documents_from(batches) == docs


def test_num_bytes_and_global_batch(data):
  workdir, docs = data
  assert loader.num_bytes(workdir, 'train') == sum(10 * len(d) + 1 for d in docs)
  assert loader.num_bytes(workdir, 'validation') == 9
  batch = next(_make(workdir, split='validation'))
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  arrays = loader.global_batch(batch, sharding, 4)
  assert set(arrays) == set(batch)
  for k, v in arrays.items():
    assert isinstance(v, jax.Array) and v.sharding == sharding
    np.testing.assert_array_equal(np.asarray(v), batch[k])


def test_process_rows_on_a_mesh_of_8_devices(data):
  workdir, _ = data
  code = textwrap.dedent(f"""
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from data_pipeline import loader
      devices = jax.devices()
      def check(mesh_devices, axes, spec, expected_rows):
        sharding = NamedSharding(Mesh(np.array(mesh_devices), axes), spec)
        # Two stand-in processes of 4 devices each.
        procs = [devices[:4], devices[4:]]
        rows = [loader.process_rows(sharding, 8, {SEQ_LEN}, p).tolist() for p in procs]
        assert rows == expected_rows, rows
        full = loader.make_loader({workdir!r}, 'train', seq_len={SEQ_LEN}, batch_size=8)
        parts = [loader.make_loader({workdir!r}, 'train', seq_len={SEQ_LEN}, batch_size=8,
                                    rows=r) for r in rows]
        for _ in range(3):
          batch = next(full)
          for part, r in zip(parts, rows):
            local = next(part)
            for k in batch:
              np.testing.assert_array_equal(local[k], batch[k][r])
        # This process holds all 8 devices: the global arrays are the batch.
        arrays = loader.global_batch(batch, sharding, 8)
        for k, v in arrays.items():
          assert v.shape == (8, {SEQ_LEN}) and v.sharding == sharding, k
          np.testing.assert_array_equal(np.asarray(v), batch[k])
      d = devices
      # Batch over 'data' x 'fsdp': process 0 holds rows 0-3, process 1 rows 4-7.
      check(np.reshape(d, (4, 2)), ('data', 'fsdp'), P(('data', 'fsdp'), None),
            [[0, 1, 2, 3], [4, 5, 6, 7]])
      # Each batch slice spans both processes (tensor axis across them): both hold all rows.
      check([[d[0], d[1], d[4], d[5]], [d[2], d[3], d[6], d[7]]], ('data', 'tensor'),
            P('data', None), [list(range(8))] * 2)
      # Interleaved devices: each process holds every other pair of rows.
      check([d[0], d[1], d[4], d[5], d[2], d[3], d[6], d[7]], ('data',), P('data', None),
            [[0, 1, 4, 5], [2, 3, 6, 7]])
      print('ok')
  """)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                          text=True, timeout=120, check=False, cwd=repo)
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-2000:]


def test_bad_arguments(data, tmp_path):
  workdir, _ = data
  with pytest.raises(FileNotFoundError, match='no strata_corpus dataset'):
    _make(str(tmp_path))
  with pytest.raises(ValueError, match="split 'dev' not in"):
    _make(workdir, split='dev')
  with pytest.raises(ValueError, match=r'rows must be a non-empty subset of \[0, 4\)'):
    _make(workdir, rows=[4])


def _sft_records(n: int, seed: int = 0) -> list[dict]:
  """Conversations as the chat template renders them: BOS, a prompt (mask 0), an answer (1)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    prompt = rng.integers(10, 100, size=int(rng.integers(2, 8))).tolist()
    answer = rng.integers(100, 200, size=int(rng.integers(1, 6))).tolist()
    tokens = [2] + prompt + answer
    out.append({'id': f'c{i}', 'tokens': tokens, 'num_bytes': len(tokens),
                'loss_mask': [0] * (1 + len(prompt)) + [1] * len(answer)})
  return out


def test_sequence_records_with_a_loss_mask_pack_aligned_and_whole(tmp_path):
  """SFT data: no BOS/EOS added, the mask moves with its tokens, no example is cut or mixed."""
  from train import losses  # pylint: disable=g-import-not-at-top
  records = _sft_records(40)
  shards.write_dataset(str(tmp_path), {'train': records, 'validation': records[:7]},
                       fields=('loss_mask',), framing='sequence')
  batches = loader.make_loader(str(tmp_path), 'train', seq_len=16, batch_size=4,
                                  num_epochs=1, shuffle=True, drop_remainder=False)
  by_tokens = {tuple(r['tokens']): r['loss_mask'] for r in records}
  seen = []
  for batch in batches:
    answer_targets = 0
    assert set(batch) == {'tokens', 'segment_ids', 'positions', 'loss_mask'}
    for row in range(4):
      segments = batch['segment_ids'][row]
      for segment in set(segments.tolist()) - {0}:
        where = segments == segment
        tokens = tuple(batch['tokens'][row][where].tolist())
        assert tokens in by_tokens, tokens           # whole, never cut or mixed
        assert tokens[0] == 2 and 2 not in tokens[1:]  # one BOS, none added
        assert batch['loss_mask'][row][where].tolist() == by_tokens[tokens]
        assert batch['positions'][row][where].tolist() == list(range(len(tokens)))
        seen.append(tokens)
        answer_targets += sum(by_tokens[tokens][1:])
      assert not batch['loss_mask'][row][segments == 0].any()
    # The loss counts exactly the answer tokens: masked-in targets inside a segment.
    _, weights = losses.next_token_targets({k: jax.numpy.asarray(v) for k, v in batch.items()})
    assert float(weights.sum()) == answer_targets
  assert sorted(seen) == sorted(by_tokens)            # every example exactly once
