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


# --- The real pre-training entry point, in subprocesses -----------------------

TINY_FLAGS = [
    '--config=configs/pretrain.py:tiny',
    '--config.data.preset=files',
    '--config.model.vocab_size=320', '--config.model.d_model=32', '--config.model.num_layers=2',
    '--config.model.num_heads=2', '--config.model.num_kv_heads=1', '--config.model.head_dim=16',
    '--config.model.mlp_dim=64', '--config.model.max_len=32', '--config.seq_len=32',
    '--config.batch_size=4', '--config.num_train_steps=24', '--config.eval_every=8',
    '--config.eval_steps=2', '--config.checkpoint_every=8', '--config.keep_checkpoints=3',
    '--config.log_every=1', '--config.optimizer.warmup_steps=4',
]


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
  """A synthetic corpus with some structure (so the loss can fall), vocab 320."""
  from data_pipeline import shards  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('data'))
  rs = np.random.RandomState(0)

  def docs(n, prefix):
    for i in range(n):
      start = rs.randint(4, 300)
      length = rs.randint(5, 60)
      tokens = [int(4 + (start + 3 * j) % 316) for j in range(length)]
      yield f'{prefix}{i}', tokens, 4 * length

  shards.write_dataset(data_dir, {'train': docs(200, 'tr'), 'validation': docs(20, 'va'),
                                  'test': docs(20, 'te')})
  return data_dir


@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory):
  # Shared by the subprocesses so only the first one compiles the steps.
  return str(tmp_path_factory.mktemp('jax_cache'))


def _train_cmd(workdir, data_dir, *extra):
  return [sys.executable, os.path.join(REPO, 'tests', 'loop_run.py'), f'--workdir={workdir}',
          *TINY_FLAGS, f'--config.data.workdir={data_dir}', *extra]


def _env(cache, **hooks):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('XLA_FLAGS', None)
  env.update({k: str(v) for k, v in hooks.items()})
  return env


def _run_train(workdir, data_dir, cache, *extra, **hooks):
  return subprocess.run(_train_cmd(workdir, data_dir, *extra), env=_env(cache, **hooks),
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def _popen(workdir, data_dir, cache, log_prefix, **hooks):
  """Starts a run in the background; its stdout/stderr go to files (no pipe can fill up)."""
  out, err = open(f'{log_prefix}.out', 'w'), open(f'{log_prefix}.err', 'w')
  return subprocess.Popen(_train_cmd(workdir, data_dir), env=_env(cache, **hooks), cwd=REPO,
                          stdout=out, stderr=err)


def _read(path) -> str:
  with open(path) as f:
    return f.read()


def _wait_for(predicate, proc, log_prefix, timeout=240.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f'run exited early ({proc.returncode}): '
                           f'{_read(f"{log_prefix}.err")[-3000:]}')
    time.sleep(0.1)
  proc.kill()
  raise AssertionError('timed out waiting for the run')


def _started(workdir, min_step, checkpoint_step):
  def check():
    done = os.path.exists(os.path.join(workdir, 'checkpoints', str(checkpoint_step),
                                       'commit_success.txt'))
    return done and max(_train_losses(workdir) or [0]) >= min_step
  return check


def test_pretrain_sigkill_resume_is_bitwise_exact(tmp_path, tiny_data, compile_cache):
  full = tmp_path / 'full'
  result = _run_train(full, tiny_data, compile_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  records = metrics.read_metrics(str(full))
  assert any('eval/loss' in r for r in records) and any('train/loss' in r for r in records)
  assert any(r.get('perf/peak_flops_per_sec') == 1e11 for r in records)
  assert all(r['perf/mfu'] > 0 for r in records if 'train/loss' in r)
  expected = _train_losses(full)
  assert sorted(expected) == list(range(1, 25))
  with open(full / 'config.json') as f:
    assert json.load(f)['data']['workdir'] == tiny_data

  # Killed with SIGKILL at step >= 11, after the step-8 checkpoint committed.
  killed = tmp_path / 'killed'
  log = str(tmp_path / 'killed_log')
  proc = _popen(killed, tiny_data, compile_cache, log, STRATA_TEST_SLOW_AFTER=8)
  _wait_for(_started(killed, 11, 8), proc, log)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  before_restart = _train_losses(killed)
  assert max(before_restart) >= 11
  assert all(before_restart[s] == expected[s] for s in before_restart), (before_restart, expected)
  checkpointer = checkpoint.Checkpointer(str(killed / 'checkpoints'), read_only=True)
  assert checkpointer.all_steps() == [8]
  checkpointer.close()

  result = _run_train(killed, tiny_data, compile_cache)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resumed from checkpoint step 8' in result.stdout
  resumed = _train_losses(killed)
  assert sorted(resumed) == list(range(1, 25))
  # Bitwise: float32 losses round-trip exactly through JSON.
  assert [resumed[s] for s in range(9, 25)] == [expected[s] for s in range(9, 25)], (
      resumed, expected)

  # generate/evaluate open the run: params only, newest good step first.
  from train import run_dir  # pylint: disable=g-import-not-at-top
  config, model, params, _, _ = run_dir.load_run(str(killed))
  assert config.checkpoint_step == 24 and model.config.d_model == 32
  assert set(params) == set(jax.eval_shape(lambda: params))
  _truncate_array_files_of(str(killed / 'checkpoints' / '24'))
  config, _, older, _, _ = run_dir.load_run(str(killed))
  assert config.checkpoint_step == 16
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params),
                                                      jax.tree.leaves(older)))


def _truncate_array_files_of(step_dir: str) -> None:
  # Every array data file, since how Orbax spreads params and optimizer state
  # over files varies from run to run; the params must be among the damage.
  files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
           for n in names if f'{os.sep}d{os.sep}' in os.path.join(root, n)]
  assert files, f'no array data files under {step_dir}'
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def test_pretrain_sigterm_saves_and_exits_cleanly(tmp_path, tiny_data, compile_cache):
  workdir = tmp_path / 'run'
  log = str(tmp_path / 'log')
  proc = _popen(workdir, tiny_data, compile_cache, log, STRATA_TEST_SLOW_AFTER=2)
  _wait_for(lambda: max(_train_losses(workdir) or [0]) >= 3, proc, log)
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=120)
  out, err = _read(f'{log}.out'), _read(f'{log}.err')
  assert proc.returncode == 0, err[-3000:]
  assert 'SIGTERM received' in out
  steps = checkpoint.Checkpointer(str(workdir / 'checkpoints')).all_steps()
  assert steps and steps[-1] >= 3 and steps[-1] < 24
  assert '"reason": "preempted"' in out


def test_pretrain_nan_stops_without_checkpoint(tmp_path, tiny_data, compile_cache):
  workdir = tmp_path / 'run'
  result = _run_train(workdir, tiny_data, compile_cache, STRATA_TEST_NAN_AT=16)
  assert result.returncode == 1
  assert 'Non-finite train/loss = nan at step 16' in result.stderr
  assert 'last good checkpoint is step 8' in result.stderr
  assert checkpoint.Checkpointer(str(workdir / 'checkpoints')).all_steps() == [8]


def test_pretrain_num_epochs_sets_the_length(tmp_path, tiny_data, compile_cache):
  from data_pipeline import loader as loader_lib  # pylint: disable=g-import-not-at-top
  expected = loader_lib.make_loader(tiny_data, 'train', seq_len=32, batch_size=4,
                                    num_epochs=1).num_batches
  workdir = tmp_path / 'run'
  result = _run_train(workdir, tiny_data, compile_cache, '--config.num_epochs=1',
                      '--config.num_train_steps=0', '--config.checkpoint_every=0')
  assert result.returncode == 0, result.stderr[-3000:]
  assert max(_train_losses(workdir)) == expected
  assert f'"step": {expected}, "reason": "completed"' in result.stdout
  assert checkpoint.Checkpointer(str(workdir / 'checkpoints')).latest_step() == expected


def test_the_stage_names_the_metric_best_and_patience_follow(tmp_path):
  """An accuracy to maximise: the best checkpoint is the highest, patience counts from it."""
  accuracies = iter([0.5, 0.8, 0.7, 0.6])
  evaluate = lambda params: (lambda a: {'loss': 1.0 - a, 'perplexity': 1.0, 'accuracy': a,
                                        'num_pairs': 10})(next(accuracies))
  ckpt_dir = os.path.join(tmp_path, 'checkpoints')
  ckpt = checkpoint.Checkpointer(ckpt_dir, keep=1, best_metric='eval/accuracy', best_mode='max')
  try:
    result = loop.run(workdir=str(tmp_path), loop_cfg=loop.LoopConfig(
        num_train_steps=20, eval_every=5, patience=2, best_metric='accuracy', best_mode='max'),
        train_step=_toy_step, train_loader=ToyLoader(), to_global=jax.device_put,
        checkpointer=ckpt, init_state=_init, abstract_state=_abstract(), evaluate=evaluate,
        console=False)
  finally:
    ckpt.close()
  assert result.reason == 'early_stopped' and result.step == 20
  assert result.best_eval_loss == 0.8        # the best value of the named metric
  records = [r for r in metrics.read_metrics(str(tmp_path)) if 'eval/accuracy' in r]
  assert [r['eval/accuracy'] for r in records] == [0.5, 0.8, 0.7, 0.6]
  assert records[-1]['eval/best_accuracy'] == 0.8 and 'eval/num_pairs' not in records[-1]
  reader = checkpoint.Checkpointer(ckpt_dir, best_metric='eval/accuracy', best_mode='max')
  assert reader.best_step() == 10
  reader.close()
