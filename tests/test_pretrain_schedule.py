"""train.pretrain sizes the learning-rate schedule from the steps the run takes.

With `num_epochs` (and `num_train_steps=0`, or larger than the data allows)
the run ends when the data does; the cosine must span those steps, not decay
from peak to `end_lr` in the one step after warm-up. The test runs
`pretrain.train` up to the loop with a stand-in loader whose length is known,
then reads the learning rate that the real train step logs at chosen steps.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import pretrain as pretrain_configs
from train import pretrain
from train import stage as stage_lib

PEAK, END_FACTOR, WARMUP = 1e-2, 0.1, 10
DATA_STEPS = 120   # the stand-in loader's batches over all its epochs
SEQ_LEN, BATCH = 16, 2


class _Loader:
  """Yields one fixed batch; `num_batches` is what a finite num_epochs sets."""

  def __init__(self, num_batches: int | None):
    self.num_batches = num_batches
    rng = np.random.default_rng(0)
    self.batch = {
        'tokens': rng.integers(1, 128, (BATCH, SEQ_LEN)).astype(np.int32),
        'segment_ids': np.ones((BATCH, SEQ_LEN), np.int32),
        'positions': np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), (BATCH, SEQ_LEN)).copy()}


def _run_until_loop(tmp_path, monkeypatch, num_train_steps: int):
  """`pretrain.train` up to `loop.run`: returns the arguments it would get."""
  (tmp_path / 'data' / 'tfds').mkdir(parents=True)
  config = pretrain_configs.get_config(
      f'tiny,model.vocab_size=128,model.d_model=32,model.num_layers=1,model.num_heads=2,'
      f'model.num_kv_heads=1,model.head_dim=16,model.mlp_dim=64,seq_len={SEQ_LEN},'
      f'model.max_len={SEQ_LEN},batch_size={BATCH},num_train_steps={num_train_steps},'
      f'num_epochs=3,eval_every=0,optimizer.learning_rate={PEAK},'
      f'optimizer.warmup_steps={WARMUP},optimizer.end_lr_factor={END_FACTOR}')
  with config.unlocked():
    config.data.workdir = str(tmp_path / 'data')
    config.data.preset = 'files'
  monkeypatch.setattr(stage_lib.loader_lib, 'make_loader',
                      lambda *args, **kwargs: _Loader(DATA_STEPS))
  monkeypatch.setattr(stage_lib, 'peak_flops', lambda mesh: (None, {}))
  captured = {}
  monkeypatch.setattr(stage_lib.loop, 'run', lambda **kwargs: captured.update(kwargs))
  pretrain.train(config, str(tmp_path / 'run'))
  return captured


def _logged_learning_rates(run_args, steps: list[int]) -> list[float]:
  """'train/learning_rate' of the real train step when the state is at each step."""
  state = jax.device_get(run_args['init_state']())
  batch = run_args['train_loader'].batch
  rates = []
  for step in steps:
    _, metrics = run_args['train_step'](state.replace(step=np.asarray(step, np.int32)), batch)
    rates.append(float(metrics['train/learning_rate']))
  return rates


@pytest.mark.parametrize('num_train_steps,run_steps', [
    (0, DATA_STEPS),      # "until the data ends": num_epochs bounds the run
    (60, 60),             # fewer: num_train_steps ends the run and sizes the schedule
])
def test_schedule_spans_the_run(tmp_path, monkeypatch, num_train_steps, run_steps):
  run_args = _run_until_loop(tmp_path, monkeypatch, num_train_steps)
  assert run_args['loop_cfg'].num_train_steps == run_steps
  decay = run_steps - WARMUP
  middle, last = WARMUP + decay // 2, run_steps - 1
  rates = _logged_learning_rates(run_args, [WARMUP - 1, WARMUP + 1, middle, last])
  np.testing.assert_allclose(rates[0], PEAK, rtol=1e-6)                 # end of warm-up
  assert rates[1] > 0.99 * PEAK, rates                                  # no drop after it
  # Half-way through the decay the cosine is half-way between peak and end.
  np.testing.assert_allclose(rates[2], PEAK * (END_FACTOR + (1 - END_FACTOR) / 2), rtol=1e-5)
  # The last step is within one step of the end value, not long past it.
  np.testing.assert_allclose(rates[3], PEAK * END_FACTOR, rtol=1e-2)
  assert rates[3] > PEAK * END_FACTOR
