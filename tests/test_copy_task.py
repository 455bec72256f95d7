"""Copy-task rows: their layout, their mixing into batches, and that a model learns from them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from configs.cli import UserError
from data_pipeline import copy_task
from data_pipeline import loader
from data_pipeline import shards
from model.transformer import Transformer
from train import losses
from train import pretrain
from train import stage as stage_lib

BOS, EOS = 1, 2
TASK = copy_task.CopyTask(fraction=0.5, min_len=3, max_len=9, ids=np.arange(4, 40))


def _documents(row: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(tokens, positions, loss_mask) of each segment of a row, in order."""
  out = []
  for segment in range(1, int(row['segment_ids'].max()) + 1):
    where = row['segment_ids'] == segment
    assert np.flatnonzero(where).tolist() == list(range(np.argmax(where),
                                                        np.argmax(where) + where.sum()))
    out.append((row['tokens'][where], row['positions'][where], row['loss_mask'][where]))
  return out


def test_a_row_packs_bos_x_x_eos_documents_with_the_loss_on_the_repeat():
  rng = np.random.default_rng(0)
  for _ in range(20):
    row = copy_task.row(rng, 64, TASK, BOS, EOS)
    assert (row['segment_ids'] > 0).all()  # the row is full
    docs = _documents(row)
    assert len(docs) >= 2
    for k, (tokens, positions, mask) in enumerate(docs):
      assert positions.tolist() == list(range(len(tokens)))
      assert tokens[0] == BOS
      if k < len(docs) - 1:  # whole documents; only the last may be cut
        n = (len(tokens) - 2) // 2
        assert len(tokens) == 2 * n + 2 and TASK.min_len <= n <= TASK.max_len
        x = tokens[1:n + 1]
        assert np.isin(x, TASK.ids).all()
        assert tokens[n + 1:2 * n + 1].tolist() == x.tolist() and tokens[-1] == EOS
        # No loss on BOS, the first x (noise) or the repeat's first token.
        assert mask.tolist() == [0] * (n + 2) + [1] * n
      else:
        assert mask[0] == 0


def _batch(rows: int, seq_len: int = 32) -> dict[str, np.ndarray]:
  tokens = np.arange(rows * seq_len, dtype=np.int32).reshape(rows, seq_len) % 50 + 4
  segment_ids = np.ones((rows, seq_len), np.int32)
  segment_ids[:, -5:] = 0  # padding at the end of every row
  tokens[:, -5:] = 0
  positions = np.where(segment_ids > 0, np.arange(seq_len), 0).astype(np.int32)
  return {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions}


def test_mixing_depends_on_seed_step_and_global_row_only():
  batch = _batch(16)
  rows = np.arange(16)
  full = copy_task.mix(batch, 7, rows, TASK, 0, BOS, EOS)
  replaced = [i for i in range(16) if not np.array_equal(full['tokens'][i], batch['tokens'][i])]
  assert 2 <= len(replaced) <= 14  # fraction 0.5 of 16 rows
  # Real rows: untouched, with a loss mask on every real token.
  for i in set(range(16)) - set(replaced):
    assert full['loss_mask'][i].tolist() == (batch['segment_ids'][i] > 0).astype(int).tolist()
  # A process holding rows 3, 8 and 12 gets exactly those rows of the batch.
  mine = np.array([3, 8, 12])
  part = copy_task.mix({k: v[mine] for k, v in batch.items()}, 7, mine, TASK, 0, BOS, EOS)
  for name in full:
    np.testing.assert_array_equal(part[name], full[name][mine])
  # Another step or seed replaces other rows or with other ids.
  assert not np.array_equal(copy_task.mix(batch, 8, rows, TASK, 0, BOS, EOS)['tokens'],
                            full['tokens'])
  assert not np.array_equal(copy_task.mix(batch, 7, rows, TASK, 1, BOS, EOS)['tokens'],
                            full['tokens'])
  # The input batch is not written to.
  np.testing.assert_array_equal(batch['tokens'], _batch(16)['tokens'])
  # Fraction 0 and 1.
  none = copy_task.mix(batch, 7, rows, copy_task.CopyTask(0.0, 3, 9, TASK.ids), 0, BOS, EOS)
  np.testing.assert_array_equal(none['tokens'], batch['tokens'])
  every = copy_task.mix(batch, 7, rows, copy_task.CopyTask(1.0, 3, 9, TASK.ids), 0, BOS, EOS)
  assert (every['tokens'][:, 0] == BOS).all() and (every['segment_ids'] > 0).all()


def test_mixing_refuses_fields_it_cannot_fill_and_bad_settings():
  with pytest.raises(ValueError, match='rejected'):
    copy_task.mix(dict(_batch(2), rejected=np.zeros((2, 32), np.int32)), 0, np.arange(2), TASK,
                  0, BOS, EOS)
  with pytest.raises(ValueError, match='fraction'):
    copy_task.CopyTask(1.5, 3, 9, TASK.ids)
  with pytest.raises(ValueError, match='min_len'):
    copy_task.CopyTask(0.5, 9, 3, TASK.ids)


def test_the_mixed_loader_resumes_at_the_same_batch(tmp_path):
  rng = np.random.default_rng(0)
  shards.write_dataset(str(tmp_path), {'train': [
      (f'd{i}', rng.integers(4, 60, size=rng.integers(5, 40)).tolist(), 1) for i in range(40)]})

  def make():
    source = loader.make_loader(str(tmp_path), 'train', seq_len=32, batch_size=8, seed=3)
    return copy_task.Mixed(source, TASK, 3, BOS, EOS)

  first = make()
  batches = [next(first) for _ in range(6)]
  second = make()
  for _ in range(3):
    next(second)
  state = second.get_state()
  third = make()
  third.set_state(state)
  for expected in batches[3:]:
    got = next(third)
    for name in expected:
      np.testing.assert_array_equal(got[name], expected[name])
  assert all(set(b) == {'tokens', 'segment_ids', 'positions', 'loss_mask'} for b in batches)


def test_pretrain_config_checks_the_copy_keys():
  config = pretrain_config.get_config('tiny')
  assert config.data.copy_fraction == 0.0  # off unless asked for
  pretrain_config.validate(config)
  for key, value, message in [('copy_fraction', 1.5, 'data.copy_fraction'),
                              ('copy_min_len', 0, 'data.copy_min_len'),
                              ('copy_max_len', 4, 'data.copy_min_len=8 is more than')]:
    bad = pretrain_config.get_config('tiny')
    bad.data[key] = value
    with pytest.raises(UserError, match=message):
      pretrain_config.validate(bad)


def test_pretrain_trains_on_real_rows_and_the_repeats_only(tmp_path, monkeypatch,
                                                           stdlib_tokenizer):
  """`python -m train` with data.copy_fraction: the real train step's loss on a
  mixed batch is, summed by hand with the model run on each document alone,
  every next-token target of the real rows plus the repeat of each copy row
  (after its first token, and EOS), and nothing of the noise."""
  n, batch_size = 9, 8
  seq_len = 2 * n + 2  # one whole [BOS] x x [EOS] per copy row
  data_dir = tmp_path / 'data'
  rng = np.random.default_rng(0)
  shards.write_dataset(str(data_dir), {'train': [
      (f'd{i}', rng.integers(4, 500, size=rng.integers(3, 30)).tolist(), 1) for i in range(40)]})
  with open(stdlib_tokenizer.path, 'rb') as f, open(data_dir / 'tokenizer.model', 'wb') as out:
    out.write(f.read())
  vocab = stdlib_tokenizer.vocab_size
  config = pretrain_config.get_config(
      f'tiny,model.vocab_size={vocab},model.d_model=32,model.num_layers=1,model.num_heads=2,'
      f'model.num_kv_heads=1,model.head_dim=16,model.mlp_dim=64,seq_len={seq_len},'
      f'model.max_len={seq_len},batch_size={batch_size},num_train_steps=4,eval_every=0,'
      f'data.copy_fraction=0.5,data.copy_min_len={n},data.copy_max_len={n}')
  with config.unlocked():
    config.data.workdir = str(data_dir)
    config.data.preset = 'files'
  monkeypatch.setattr(stage_lib, 'peak_flops', lambda mesh: (None, {}))
  captured = {}
  monkeypatch.setattr(stage_lib.loop, 'run', lambda **kwargs: captured.update(kwargs))
  pretrain.train(config, str(tmp_path / 'run'))

  batch = next(captured['train_loader'])
  bos, eos = stdlib_tokenizer.bos_id, stdlib_tokenizer.eos_id
  is_copy = [row[0] == bos and row[1:n + 1].tolist() == row[n + 1:2 * n + 1].tolist()
             and row[-1] == eos and (batch['segment_ids'][i] == 1).all()
             for i, row in enumerate(batch['tokens'])]
  assert 0 < sum(is_copy) < batch_size, is_copy
  state = jax.device_get(captured['init_state']())
  _, metrics = captured['train_step'](state, captured['to_global'](batch))

  model = Transformer(stage_lib.model_config(config))

  def nll(tokens):  # per target, the document run alone
    logits = model.apply({'params': state.params}, jnp.asarray(tokens, jnp.int32)[None])
    return -np.asarray(losses.token_log_probs(logits[0, :-1], jnp.asarray(tokens[1:])))

  total, count = 0.0, 0
  for i, copy in enumerate(is_copy):
    if copy:  # targets x[1:] and EOS of the repeat: predicted at n + 1 .. 2n + 1
      total += nll(batch['tokens'][i])[n + 1:].sum()
      count += n
      continue
    segments = batch['segment_ids'][i]
    for segment in range(1, segments.max() + 1):
      doc = batch['tokens'][i][segments == segment]
      total += nll(doc).sum()
      count += len(doc) - 1
  assert metrics['train/num_tokens'] == count
  np.testing.assert_allclose(metrics['train/loss'], total / count, rtol=2e-5)


def test_copy_learning_benchmark_reports_the_repeat_loss():
  """benchmarks/copy_learning.py on a small model: a held-out repeat loss per
  evaluation, starting near ln V (the init cannot copy), and falling when
  every repeat sits at one offset (a positional head suffices)."""
  from benchmarks import copy_learning  # pylint: disable=g-import-not-at-top
  config = pretrain_config.get_config(
      'tiny,model.vocab_size=64,model.d_model=64,model.num_layers=2,model.num_heads=4,'
      'model.num_kv_heads=2,model.head_dim=16,model.mlp_dim=128,model.max_len=128,'
      'seq_len=128,batch_size=16,data.copy_min_len=30,data.copy_max_len=30')
  records = list(copy_learning.learning_curve(config, steps=150, learning_rate=3e-3, warmup=20,
                                              pool=0, eval_every=50))
  assert [r['step'] for r in records] == [0, 50, 100, 150]
  assert abs(records[0]['repeat_loss'] - np.log(64)) < 0.3
  assert records[-1]['repeat_loss'] < 0.5 * records[0]['repeat_loss'], records
