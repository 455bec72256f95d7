"""The training loop every stage reuses: steps, evaluation, checkpoints, metrics.

The loop knows nothing about language models. A stage hands it a jitted
`train_step(state, batch) -> (state, metrics)`, an iterator of host batches
with `get_state()`/`set_state()`, a function that turns a host batch into a
global `jax.Array` batch, an optional `evaluate(params) -> {'loss', ...}`, and
a `Checkpointer`.

How it keeps the device busy and the checkpoints clean:

* Metrics are read one step late. Step k is dispatched first, then step k-1's
  metrics are fetched to the host, so the host waits only for work that is
  already finished while step k runs.
* Every read checks that `train/loss` and `train/grad_norm` are finite. A
  non-finite value stops the run with `NonFiniteLossError` naming the step and
  value. A checkpoint of step k is written only after step k's own metrics
  were read and found finite (the pending read is flushed first), so the
  state produced by a bad step is never saved.
* SIGTERM (preemption) only sets a flag; at the next step boundary the loop
  saves a checkpoint and returns cleanly. The first Ctrl-C (SIGINT) does the
  same (it is turned into a SIGTERM to this process, so on several processes
  it goes through JAX's preemption sync too); a second Ctrl-C aborts at once.
* A run on a workdir with a checkpoint restores state and loader state and
  continues; the step rng is `fold_in(rng, step)`, so a resumed run repeats
  the uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax

from configs.cli import UserError
from train import checkpoint as checkpoint_lib
from train import metrics as metrics_lib

# Metrics that must be finite for the state after the step to be usable.
FINITE_KEYS = ('train/loss', 'train/grad_norm')


class NonFiniteLossError(RuntimeError):
  """Training produced a non-finite loss or gradient norm."""

  def __init__(self, step: int, key: str, value: float, last_checkpoint: int | None):
    self.step, self.key, self.value = step, key, value
    super().__init__(
        f'Non-finite {key} = {value} at step {step}; stopping. The state after this step was '
        f'not checkpointed; the last good checkpoint is '
        f'{"step " + str(last_checkpoint) if last_checkpoint is not None else "none"}.')


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """When to stop, evaluate, checkpoint and log. 0 or None switches a feature off."""
  num_train_steps: int | None = None   # None/<=0: until the loader runs out (num_epochs)
  eval_every: int = 0
  checkpoint_every: int = 0
  patience: int | None = None          # evaluations without improvement before stopping
  log_every: int = 1
  checkpoint_best: bool = True         # also save when the best metric improves
  best_metric: str = 'loss'            # the evaluation's metric that "best" and patience follow
  best_mode: str = 'min'               # 'min' (a loss) or 'max' (an accuracy)

  @classmethod
  def from_config(cls, config: Any) -> LoopConfig:
    """Reads the shared top-level keys (num_train_steps, eval_every, ...) of a stage config."""
    def get(key, default):
      value = config.get(key, default) if hasattr(config, 'get') else getattr(config, key, default)
      return default if value is None else value
    return cls(num_train_steps=int(get('num_train_steps', 0)) or None,
               eval_every=int(get('eval_every', 0)),
               checkpoint_every=int(get('checkpoint_every', 0)),
               patience=int(get('patience', 0)) or None,
               best_metric=str(get('best_metric', 'loss')),
               best_mode=str(get('best_mode', 'min')),
               log_every=max(int(get('log_every', 1)), 1))


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  reason: str                      # 'completed' | 'end_of_data' | 'early_stopped' | 'preempted'
  best_eval_loss: float | None     # the best value of the early-stopping metric (loss by default)
  last_checkpoint: int | None
  history: list[dict[str, Any]]   # the records written this run


def make_evaluator(eval_step: Callable[[Any, Any], Mapping[str, jax.Array]],
                   make_batches: Callable[[], Iterable[Mapping[str, Any]]],
                   to_global: Callable[[Mapping[str, Any]], Any],
                   eval_steps: int | None) -> Callable[[Any], dict[str, float]]:
  """`evaluate(params)` over a fresh validation pass: `eval_steps` batches, or all if None/-1/0."""
  from train import steps as steps_lib  # pylint: disable=g-import-not-at-top

  def evaluate(params: Any) -> dict[str, float]:
    batches: Iterable[Mapping[str, Any]] = make_batches()
    if eval_steps is not None and eval_steps > 0:
      batches = itertools.islice(batches, eval_steps)
    return steps_lib.evaluate_batches(eval_step, params, (to_global(b) for b in batches))

  return evaluate


def restore_or_init(checkpointer: checkpoint_lib.Checkpointer, loader: Any,
                    init_state: Callable[[], Any], abstract_state: Any) -> tuple[Any, int]:
  """The newest good checkpoint (state + loader position), else a fresh state.

  Returns (state, step).
  """
  restored = checkpointer.restore_latest(abstract_state)
  if restored is None:
    return init_state(), 0
  state, loader_state = restored
  step = int(jax.device_get(state.step))
  if loader_state:
    try:
      loader.set_state(loader_state)
    except ValueError as e:
      raise UserError(
          f'Cannot resume the data position saved with checkpoint step {step} in '
          f'{checkpointer.directory}: {e}. Resume with the settings the run started with, '
          'or start a new workdir.') from e
  return state, step


class _Preemption:
  """Preemption notice, polled at step boundaries.

  One process: SIGTERM sets a flag. Several processes: JAX's preemption sync
  service (it catches SIGTERM itself) names one step at which every process
  saves, so no process waits in a collective for one that has left.
  """

  def __init__(self):
    self.requested = False
    self.interrupted = False
    self._previous = None
    self._multiprocess = jax.process_count() > 1

  def __enter__(self) -> _Preemption:
    self._previous_int = None
    if threading.current_thread() is threading.main_thread():
      self._previous_int = signal.signal(signal.SIGINT, self._handle_interrupt)
    if self._multiprocess and self._sync_service_available():
      return self
    self._multiprocess = False
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle_interrupt(self, signum, frame) -> None:  # pylint: disable=unused-argument
    """First Ctrl-C: a clean stop with a checkpoint; the second one aborts."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print('\nCtrl-C: saving a checkpoint at the next step boundary and exiting '
          '(press Ctrl-C again to abort without saving).', file=sys.stderr, flush=True)
    self.interrupted = True
    os.kill(os.getpid(), signal.SIGTERM)

  @staticmethod
  def _sync_service_available() -> bool:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      multihost_utils.reached_preemption_sync_point(-1)
      return True
    except RuntimeError:
      return False

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self.requested = True

  def reached(self, step: int) -> bool:
    if self._multiprocess:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      self.requested = self.requested or multihost_utils.reached_preemption_sync_point(step)
    return self.requested

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    if self._previous_int is not None:
      signal.signal(signal.SIGINT, self._previous_int)


def _host_metrics(step: int, device_metrics: Mapping[str, Any]) -> dict[str, float]:
  host = jax.device_get(dict(device_metrics))
  return {k: float(v) for k, v in host.items() if getattr(v, 'size', 1) == 1}


def _check_finite(step: int, metrics: Mapping[str, float], last_checkpoint: int | None) -> None:
  for key in FINITE_KEYS:
    if key in metrics and not math.isfinite(metrics[key]):
      raise NonFiniteLossError(step, key, metrics[key], last_checkpoint)


def run(*, workdir: str, loop_cfg: LoopConfig, train_step: Callable[[Any, Any], tuple[Any, Any]],
        train_loader: Iterator[Mapping[str, Any]], to_global: Callable[[Mapping[str, Any]], Any],
        checkpointer: checkpoint_lib.Checkpointer, init_state: Callable[[], Any],
        abstract_state: Any, evaluate: Callable[[Any], Mapping[str, float]] | None = None,
        tokens_per_step: int | None = None, flops_per_token: float | None = None,
        peak_flops: float | None = None, startup_metrics: Mapping[str, Any] | None = None,
        console: bool = True, on_ready: Callable[[], None] | None = None) -> LoopResult:
  """Trains until `num_train_steps`, the end of the data, early stopping or SIGTERM.

  `init_state()` is called only when `checkpointer` has nothing to resume;
  `abstract_state` (ShapeDtypeStructs with shardings) is the restore target.
  `tokens_per_step` (global batch x length) gives `tokens` and tokens/s;
  `flops_per_token` and `peak_flops` (of all devices in use) give MFU.
  `on_ready()` runs once the state is restored or initialised, before the
  first metric is written: a start refused by the restore writes nothing.
  """
  state, start_step = restore_or_init(checkpointer, train_loader, init_state, abstract_state)
  if on_ready is not None:   # e.g. the stage writes config.json only now
    on_ready()
  total = loop_cfg.num_train_steps
  writer = metrics_lib.MetricsWriter(workdir, total_steps=total, start_step=start_step,
                                     console=console)
  best_eval, evals_since_best = math.inf, 0
  if start_step:
    saved = checkpointer.metadata(start_step).get('metrics', {})
    best_eval = saved.get('loop/best_eval_loss') or math.inf
    evals_since_best = int(saved.get('loop/evals_since_best') or 0)
    writer.message(f'Resumed from checkpoint step {start_step} in {checkpointer.directory}')
  startup = dict(startup_metrics or {})
  if peak_flops:
    startup['perf/peak_flops_per_sec'] = peak_flops
  if startup:
    writer.write(start_step, startup, print_line=False)

  writer.message(f'Training from step {start_step} to {total or "the end of the data"} '
                 f'({tokens_per_step or "?"} tokens/step); the first step compiles.')
  history: list[dict[str, Any]] = []
  last_checkpoint = checkpointer.latest_step() if start_step else None
  step = start_step
  loader_state = train_loader.get_state()
  pending: tuple[int, Any] | None = None   # (step, device metrics) not yet read
  last_train: dict[str, float] = {}
  interval = {'start': time.perf_counter(), 'steps': 0}
  run_start, run_start_step = None, None    # set after the first read (compilation excluded)
  reason = 'completed'
  eval_metrics: dict[str, Any] = {}

  def eta(done_step: int) -> float | None:
    if not total or run_start is None or done_step <= run_start_step:
      return None
    return (time.perf_counter() - run_start) / (done_step - run_start_step) * (total - done_step)

  def read_pending() -> None:
    """Reads the pending step's metrics, checks them and logs on log steps."""
    nonlocal pending, last_train, run_start, run_start_step
    if pending is None:
      return
    done_step, device_metrics = pending
    pending = None
    host = _host_metrics(done_step, device_metrics)
    _check_finite(done_step, host, last_checkpoint)
    last_train = host
    now = time.perf_counter()
    interval['steps'] += 1
    if run_start is None:
      run_start, run_start_step = now, done_step
    # The first step is logged too: it shows compilation finished.
    if done_step % loop_cfg.log_every == 0 or done_step in (total, start_step + 1):
      record = dict(host)
      step_time = (now - interval['start']) / interval['steps']
      record['perf/step_time'] = step_time
      if tokens_per_step:
        record['tokens'] = done_step * tokens_per_step
        record['perf/tokens_per_sec'] = tokens_per_step / step_time
        if flops_per_token and peak_flops:
          record['perf/mfu'] = flops_per_token * tokens_per_step / step_time / peak_flops
      history.append(writer.write(done_step, record, eta_seconds=eta(done_step)))
      interval.update(start=time.perf_counter(), steps=0)

  def save(metrics: Mapping[str, Any]) -> None:
    nonlocal last_checkpoint
    read_pending()   # never save a state whose own step has not been checked
    merged = dict(last_train, **metrics)
    merged.update({'loop/best_eval_loss': best_eval if math.isfinite(best_eval) else None,
                   'loop/evals_since_best': evals_since_best})
    if checkpointer.save(step, state, loader_state, merged):
      last_checkpoint = step
    interval.update(start=time.perf_counter(), steps=0)

  try:
    with _Preemption() as preemption:
      while total is None or step < total:
        if preemption.reached(step):
          reason = 'preempted'
          what = 'Ctrl-C' if preemption.interrupted else 'SIGTERM'
          writer.message(f'{what} received: saving a checkpoint at step {step} and exiting.')
          break
        try:
          local_batch = next(train_loader)
        except StopIteration:
          reason = 'end_of_data'
          break
        loader_state = train_loader.get_state()
        state, device_metrics = train_step(state, to_global(local_batch))
        step += 1
        read_pending()                 # step - 1: already finished or nearly so
        pending = (step, device_metrics)

        eval_metrics = {}
        is_last = step == total
        if evaluate is not None and ((loop_cfg.eval_every and step % loop_cfg.eval_every == 0)
                                     or is_last):
          read_pending()
          t0 = time.perf_counter()
          result = evaluate(state.params)
          eval_metrics = {f'eval/{k}': float(v) for k, v in result.items()
                          if isinstance(v, (int, float)) and not k.startswith('num_')}
          if loop_cfg.best_metric not in result:
            raise KeyError(f'best_metric={loop_cfg.best_metric!r} is not among the evaluation\'s '
                           f'metrics {sorted(result)}')
          value = float(result[loop_cfg.best_metric])
          score = value if loop_cfg.best_mode == 'min' else -value
          improved = score < best_eval
          if improved:
            best_eval, evals_since_best = score, 0
          else:
            evals_since_best += 1
          best_value = best_eval if loop_cfg.best_mode == 'min' else -best_eval
          eval_metrics[f'eval/best_{loop_cfg.best_metric}'] = best_value
          eval_metrics['eval/time'] = time.perf_counter() - t0
          record = dict(eval_metrics)
          if tokens_per_step:
            record['tokens'] = step * tokens_per_step
          history.append(writer.write(step, record, print_line=False))
          trend = 'improved' if improved else f'{evals_since_best} without improvement'
          writer.message(f'eval step {step}: loss {result["loss"]:.4f} '
                         f'(perplexity {result["perplexity"]:.2f}, best '
                         f'{loop_cfg.best_metric} {best_value:.4f}, {trend})')
          interval.update(start=time.perf_counter(), steps=0)
          if loop_cfg.checkpoint_best and improved and not is_last:
            save(eval_metrics)
          if loop_cfg.patience and evals_since_best >= loop_cfg.patience:
            reason = 'early_stopped'
            writer.message(f'Early stopping at step {step}: {evals_since_best} evaluations '
                           f'without improvement (best {loop_cfg.best_metric} {best_value:.4f}).')
            break
        if loop_cfg.checkpoint_every and step % loop_cfg.checkpoint_every == 0 and not is_last:
          save(eval_metrics)

      # The end of training, however it came: the last state is checked and saved.
      read_pending()
      if step > start_step or reason == 'preempted':
        save(eval_metrics if step > start_step else {})
  except NonFiniteLossError as e:
    writer.error(f'ERROR: {e}')
    raise
  finally:
    checkpointer.wait()
    writer.close()
  if reason == 'preempted':
    writer.message(f'Checkpoint of step {step} saved; exiting after preemption.')
  return LoopResult(state=state, step=step, reason=reason,
                    best_eval_loss=((best_eval if loop_cfg.best_mode == 'min' else -best_eval)
                                    if math.isfinite(best_eval) else None),
                    last_checkpoint=last_checkpoint, history=history)
