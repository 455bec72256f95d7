"""The training loop on a toy regression problem (fast), plus the real pre-training run.

The toy tests drive `train.loop.run` with a linear model, a deterministic
loader with get_state/set_state and a scripted `evaluate`, so each behaviour
(metrics, best checkpoint, early stopping, NaN, SIGTERM, resume) is checked
in a second. `test_pretrain_*` run `python -m train` on a tiny synthetic
dataset in subprocesses: SIGKILL + restart is bitwise the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import checkpoint
from train import loop
from train import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class ToyState:
  step: jax.Array
  params: dict
  opt_state: dict
  rng: jax.Array


def _init() -> ToyState:
  return ToyState(step=jnp.zeros((), jnp.int32), params={'w': jnp.zeros((4,))},
                  opt_state={'m': jnp.zeros((4,))}, rng=jax.random.key_data(jax.random.key(0)))


def _abstract() -> ToyState:
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      jax.eval_shape(_init))


@jax.jit
def _toy_step(state: ToyState, batch: dict) -> tuple[ToyState, dict]:
  noise = jax.random.normal(jax.random.fold_in(state.rng, state.step), (4,)) * 1e-3

  def loss_fn(w):
    return jnp.mean((batch['x'] @ w - batch['y']) ** 2)

  loss, grad = jax.value_and_grad(loss_fn)(state.params['w'])
  m = 0.9 * state.opt_state['m'] + grad
  w = state.params['w'] - 0.05 * m + noise
  new = ToyState(step=state.step + 1, params={'w': w}, opt_state={'m': m}, rng=state.rng)
  return new, {'train/loss': loss, 'train/grad_norm': jnp.linalg.norm(grad),
               'train/learning_rate': jnp.float32(0.05)}


class ToyLoader:
  """Batch i is a pure function of i, so its state is just the index."""

  def __init__(self, limit: int | None = None):
    self.index, self.limit = 0, limit

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self.limit is not None and self.index >= self.limit:
      raise StopIteration
    rs = np.random.RandomState(self.index)
    x = rs.randn(8, 4).astype(np.float32)
    self.index += 1
    return {'x': x, 'y': x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)}

  def get_state(self) -> dict:
    return {'index': self.index}

  def set_state(self, state: dict) -> None:
    self.index = state['index']


def _run(workdir, *, step_fn=_toy_step, evaluate=None, loader=None, keep=2, **cfg):
  cfg = dict(dict(num_train_steps=20, log_every=1), **cfg)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=keep)
  try:
    return loop.run(workdir=str(workdir), loop_cfg=loop.LoopConfig(**cfg), train_step=step_fn,
                    train_loader=loader or ToyLoader(), to_global=jax.device_put,
                    checkpointer=ckpt, init_state=_init, abstract_state=_abstract(),
                    evaluate=evaluate, tokens_per_step=32, flops_per_token=10.0,
                    peak_flops=1e9, console=False), ckpt
  finally:
    ckpt.close()


def _scripted_eval(losses):
  it = iter(losses)
  return lambda params: (lambda l: {'loss': l, 'perplexity': float(np.exp(l))})(next(it))


def _train_losses(workdir) -> dict[int, float]:
  return {r['step']: r['train/loss'] for r in metrics.read_metrics(str(workdir))
          if 'train/loss' in r}


def test_metrics_and_best_checkpoint(tmp_path):
  result, ckpt = _run(tmp_path, eval_every=5, checkpoint_every=5, keep=1,
                      evaluate=_scripted_eval([3.0, 1.0, 2.0, 2.5]))
  assert result.reason == 'completed' and result.step == 20
  records = metrics.read_metrics(str(tmp_path))
  train = [r for r in records if 'train/loss' in r]
  evals = [r for r in records if 'eval/loss' in r]
  assert [r['step'] for r in train] == list(range(1, 21))
  assert [(r['step'], r['eval/loss']) for r in evals] == [(5, 3.0), (10, 1.0), (15, 2.0), (20, 2.5)]
  assert train[-1]['train/loss'] < train[0]['train/loss']
  for key in ('tokens', 'train/learning_rate', 'train/grad_norm', 'perf/tokens_per_sec',
              'perf/mfu', 'perf/step_time'):
    assert key in train[-1], key
  assert train[-1]['tokens'] == 20 * 32
  assert any('perf/peak_flops_per_sec' in r for r in records)
  # keep=1 latest plus the best by eval loss (step 10).
  reopened = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  assert reopened.all_steps() == [10, 20]
  assert reopened.best_step() == 10
  assert os.listdir(tmp_path / 'tensorboard')


def test_early_stopping_after_patience(tmp_path):
  result, _ = _run(tmp_path, num_train_steps=100, eval_every=2, patience=3,
                   evaluate=_scripted_eval([5.0, 4.0, 4.5, 4.2, 4.1, 1.0]))
  # Best at the 2nd eval (step 4); evals 3, 4, 5 (steps 6, 8, 10) do not improve.
  assert result.reason == 'early_stopped'
  assert result.step == 10
  assert result.best_eval_loss == 4.0
  assert checkpoint.Checkpointer(str(tmp_path / 'checkpoints')).latest_step() == 10


@pytest.mark.parametrize('bad_step', [9, 10])
def test_nan_stops_without_checkpointing_bad_state(tmp_path, capsys, bad_step):
  def poisoned(state, batch):
    if int(state.step) + 1 == bad_step:   # this call computes step `bad_step`
      batch = dict(batch, y=batch['y'] * np.nan)
    return _toy_step(state, batch)

  with pytest.raises(loop.NonFiniteLossError, match=f'at step {bad_step}') as info:
    _run(tmp_path, step_fn=poisoned, checkpoint_every=5, keep=5)
  assert info.value.step == bad_step and np.isnan(info.value.value)
  assert f'Non-finite train/loss = nan at step {bad_step}' in capsys.readouterr().err
  steps = checkpoint.Checkpointer(str(tmp_path / 'checkpoints')).all_steps()
  assert steps == [5]   # step 10 (after or at the bad step) was never saved


def test_sigterm_saves_and_returns(tmp_path):
  def step_then_signal(state, batch):
    out = _toy_step(state, batch)
    if int(state.step) + 1 == 7:
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  result, _ = _run(tmp_path, step_fn=step_then_signal, checkpoint_every=100)
  assert result.reason == 'preempted' and result.step == 7
  assert checkpoint.Checkpointer(str(tmp_path / 'checkpoints')).all_steps() == [7]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # handler restored


def test_resume_is_exact_and_epoch_end_stops(tmp_path):
  full, _ = _run(tmp_path / 'full', num_train_steps=20, checkpoint_every=8)
  _run(tmp_path / 'split', num_train_steps=12, checkpoint_every=8)
  # A second run with a larger budget resumes at 12 with the loader at batch 12.
  resumed, _ = _run(tmp_path / 'split', num_train_steps=20, checkpoint_every=8)
  assert resumed.step == 20
  assert _train_losses(tmp_path / 'split') == _train_losses(tmp_path / 'full')
  np.testing.assert_array_equal(np.asarray(resumed.state.params['w']),
                                np.asarray(full.state.params['w']))
  ended, _ = _run(tmp_path / 'epoch', num_train_steps=None, loader=ToyLoader(limit=6))
  assert ended.reason == 'end_of_data' and ended.step == 6
