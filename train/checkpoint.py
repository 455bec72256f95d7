"""Checkpoints: an Orbax `CheckpointManager` holding state, loader state and metadata.

One step directory holds three items:
  `state`:  the train state (params, opt_state, step, rng), saved with
            `StandardSave` and restored onto the shardings of an abstract
            target, so a checkpoint written on one mesh restores on another;
  `loader`: the data-iterator state (JSON, one file per process, all equal:
            it does not depend on the process count), so a run resumed on any
            number of processes sees exactly the batches an uninterrupted one would;
  `meta`:   JSON with the step and the metrics logged with it, plus the
            Checkpointer's `extra_meta` (a LoRA run records its base there).

Saves are asynchronous (the device keeps training while the host writes); call
`wait()` or `close()` before the process exits. The manager keeps the latest
`keep` checkpoints plus the one with the lowest `eval/loss`.

What a failed restore means decides what happens to the step:

* corrupt: a missing commit marker or required file, an empty file, or an
  array file shorter than its index says (truncated). Reported with its step
  and path, moved aside to `<directory>.corrupt/`, and the previous good step
  is restored.
* a mismatch: the checkpoint's state tree (keys and shapes, extra keys
  included) differs from the one this run builds, because the config changed
  (`scan_layers`, the model shape, the optimizer chain). A clear error naming
  the differing keys and the directory; nothing is moved.
* transient (an unavailable or timed-out read, a dropped connection): retried
  a few times, then a loud failure; nothing is moved.
* anything else (out of memory, an unknown error): a loud failure; nothing is
  moved. A good checkpoint is never destroyed because it could not be read now.

On several processes every process classifies its own attempt and they agree
on the worst outcome (a collective), so all fall back, or all fail, together
and no host waits at a barrier the others never reach.

The directory may be local or on Cloud Storage (`gs://bucket/run/checkpoints`):
Orbax takes either, and this module's own files (loader states, the checks
of a step, moving a bad step aside) go through `etils.epath`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from configs.cli import UserError
from train import paths

STATE = 'state'
LOADER = 'loader'
META = 'meta'
ITEMS = (STATE, LOADER, META)
# Files every committed step must hold, relative to the step directory. Orbax
# writes `commit_success.txt` last, just before the atomic rename.
REQUIRED_FILES = (
    'commit_success.txt',
    f'{STATE}/_METADATA',
    f'{STATE}/manifest.ocdbt',
    f'{META}/metadata',
)


def _loader_file(process_index: int, process_count: int) -> str:
  return f'process_{process_index}-of-{process_count}.json'


class LoaderStateHandler(ocp.CheckpointHandler):
  """The loader state as JSON, one file per process.

  The state is the same on every process (the loader plans global batches),
  so a checkpoint written by N processes restores on M: a process reads its
  own file, else any other. Each still writes its own, so no process waits
  for another's write.
  """

  def save(self, directory, args: LoaderSave) -> None:
    # One whole-object write: fine on Cloud Storage, which has no appends.
    path = epath.Path(directory) / _loader_file(jax.process_index(), jax.process_count())
    path.write_text(json.dumps(args.state))

  def restore(self, directory, args: LoaderRestore | None = None) -> dict[str, Any]:
    """This process's state, or that of any process of another process count."""
    del args
    directory = epath.Path(directory)
    path = directory / _loader_file(jax.process_index(), jax.process_count())
    if not path.exists():
      others = sorted(p for p in directory.iterdir() if p.name.startswith('process_'))
      if not others:
        raise FileNotFoundError(f'missing file {LOADER}/{path.name}')
      path = others[0]
    return json.loads(path.read_text())

  def metadata(self, directory) -> None:
    return None

  def finalize(self, directory) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(LoaderStateHandler, for_save=True)
@dataclasses.dataclass
class LoaderSave(ocp.args.CheckpointArgs):
  state: dict[str, Any]


@ocp.args.register_with_handler(LoaderStateHandler, for_restore=True)
@dataclasses.dataclass
class LoaderRestore(ocp.args.CheckpointArgs):
  pass


class CheckpointError(RuntimeError):
  """A checkpoint step that cannot be restored; the message names step and path."""


class CorruptCheckpointError(CheckpointError):
  """A step that is incomplete or truncated on disk: safe to move aside."""


class CheckpointMismatchError(UserError, CheckpointError):
  """The checkpoint's state tree differs from the run's (a config change); nothing moves."""


# Words in a restore error (anywhere in its chain) that mean: the files of the
# step are damaged. TensorStore reports a truncated OCDBT file as OUT_OF_RANGE
# ("Requested byte range [0, 4837) is not valid for value of size 2620").
_CORRUPT_MARKERS = ('FileNotFoundError:', 'NOT_FOUND', 'OUT_OF_RANGE', 'DATA_LOSS', 'is not valid for value of size',
                    'truncated', 'Truncated', 'corrupt', 'Corrupt', 'checksum',
                    'Unexpected end', 'unexpected end of')
# ... and: a read that may work if tried again.
_TRANSIENT_MARKERS = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'ABORTED', 'Connection reset',
                      'Temporary failure', 'timed out', '503', '429')
RESTORE_ATTEMPTS = 3
RETRY_SECONDS = 1.0

# Restore outcomes, ordered by severity: processes agree on the worst one.
_OK, _CORRUPT, _FAILED = 0, 1, 2


def _error_chain_text(error: BaseException) -> str:
  parts, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    parts.append(f'{type(error).__name__}: {error}')
    error = error.__cause__ or error.__context__
  return '\n'.join(parts)


def _is_transient(error: BaseException) -> bool:
  if isinstance(error, (TimeoutError, ConnectionError)):
    return True
  text = _error_chain_text(error)
  return any(m in text for m in _TRANSIENT_MARKERS)


def _is_corrupt(error: BaseException) -> bool:
  text = _error_chain_text(error)
  return any(m in text for m in _CORRUPT_MARKERS)


def _first_line(error: BaseException) -> str:
  """The most specific one-line description: the innermost error that says something."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in reversed(chain):
    text = str(e).strip()
    if text:
      return f'{type(e).__name__}: {text.splitlines()[0][:300]}'
  return type(chain[0]).__name__


def _agree(code: int) -> int:
  """The worst outcome over all processes (a collective when there are several)."""
  if jax.process_count() == 1:
    return code
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.int32(code))))


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def tree_shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{('params', 'embed', 'embedding'): shape} for every array leaf, as Orbax names them."""
  def shape(leaf) -> tuple[int, ...]:
    if jax.dtypes.issubdtype(getattr(leaf, 'dtype', None), jax.dtypes.prng_key):   # stored as its key data
      return tuple(jax.eval_shape(jax.random.key_data, leaf).shape)
    return tuple(leaf.shape)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(_key_name(k) for k in path): shape(leaf) for path, leaf in flat}


def tree_differences(saved: dict[tuple[str, ...], tuple[int, ...]],
                     target: dict[tuple[str, ...], tuple[int, ...]]) -> list[str]:
  """Human-readable differences between a checkpoint's tree and the target's."""
  out = []
  for key in sorted(set(saved) - set(target)):
    out.append(f'{"/".join(key)} is in the checkpoint but not in this run')
  for key in sorted(set(target) - set(saved)):
    out.append(f'{"/".join(key)} is in this run but not in the checkpoint')
  for key in sorted(set(saved) & set(target)):
    if tuple(saved[key]) != tuple(target[key]):
      out.append(f'{"/".join(key)} has shape {tuple(saved[key])} in the checkpoint but '
                 f'{tuple(target[key])} in this run')
  return out


def eval_loss_of(metrics: dict[str, Any] | None) -> float:
  """Ranks checkpoints: lower is better; steps without an eval loss rank last."""
  return best_score_of(metrics)


def best_score_of(metrics: dict[str, Any] | None, metric: str = 'eval/loss',
                  mode: str = 'min') -> float:
  """Ranks checkpoints by `metric` (lower score is better); steps without it rank last."""
  if not metrics or metrics.get(metric) is None:
    return math.inf
  value = float(metrics[metric])
  return value if mode == 'min' else -value


def _json_safe(metrics: dict[str, Any] | None) -> dict[str, Any]:
  """Plain floats/ints for JSON; non-finite values become None."""
  out = {}
  for key, value in (metrics or {}).items():
    if hasattr(value, 'item'):
      value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
      value = None
    out[key] = value
  return out


class Checkpointer:
  """Saves and restores train state + loader state under one directory."""

  def __init__(self, directory: str, *, keep: int = 3, keep_best: bool = True,
               async_save: bool = True, read_only: bool = False,
               best_metric: str = 'eval/loss', best_mode: str = 'min',
               extra_meta: dict[str, Any] | None = None):
    self.extra_meta = dict(extra_meta or {})
    # A string (local and absolute, or a `gs://` URL kept as is) for messages and Orbax.
    self.directory = paths.resolve_str(directory)
    score = functools.partial(best_score_of, metric=best_metric, mode=best_mode)
    self._score = score
    policies = [ocp.checkpoint_managers.LatestN(n=max(int(keep), 1))]
    if keep_best:
      # `reverse=True` sorts descending, and BestN keeps the tail: the lowest loss.
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=score, reverse=True, n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # `best_fn` makes the manager write the metrics with each step;
        # retention itself is decided by `preservation_policy`.
        best_fn=score,
        best_mode='min',
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  # --- queries -------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the lowest saved `eval/loss` (None if none has one)."""
    scored = [(self._score(self.metadata(s).get('metrics')), s) for s in self.all_steps()]
    scored = [(loss, s) for loss, s in scored if math.isfinite(loss)]
    return min(scored)[1] if scored else None

  def step_dir(self, step: int) -> str:
    return os.fspath(epath.Path(self.directory) / str(step))

  def metadata(self, step: int) -> dict[str, Any]:
    """The `meta` item of a step (step, metrics, time), read as plain JSON."""
    path = epath.Path(self.step_dir(step)) / META / 'metadata'
    try:
      return json.loads(path.read_text())
    except (OSError, ValueError):
      return {}

  # --- saving --------------------------------------------------------------

  def save(self, step: int, state: Any, loader_state: dict[str, Any] | None = None,
           metrics: dict[str, Any] | None = None) -> bool:
    """Starts an asynchronous save of `state` and `loader_state` at `step`.

    Returns False (and writes nothing) if `step` is already saved.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    metrics = _json_safe(metrics)
    meta = {**self.extra_meta, 'step': step, 'metrics': metrics, 'saved_at': time.time()}
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        LOADER: LoaderSave(loader_state or {}),
        META: ocp.args.JsonSave(meta),
    })
    return self._manager.save(step, args=args, metrics=metrics, force=True)

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # --- restoring -----------------------------------------------------------

  def check_step(self, step: int) -> None:
    """Raises CheckpointError if a committed file of `step` is missing or empty."""
    step_dir = self.step_dir(step)
    for rel in REQUIRED_FILES:
      path = epath.Path(step_dir) / rel
      if not path.is_file():
        what = 'commit marker' if rel.endswith('commit_success.txt') else 'file'
        raise CheckpointError(
            f'Checkpoint step {step} at {step_dir} is incomplete: missing {what} {rel}')
      if path.stat().length == 0:
        raise CheckpointError(f'Checkpoint step {step} at {step_dir} is corrupt: {rel} is empty')

  def saved_shapes(self, step: int) -> dict[tuple[str, ...], tuple[int, ...]] | None:
    """Global array keys and shapes of the `state` item of `step` (Orbax's metadata).

    None if the metadata cannot be read; then the restore itself decides.
    """
    try:
      metadata = ocp.StandardCheckpointHandler().metadata(
          epath.Path(self.step_dir(step)) / STATE)
    except Exception:  # pylint: disable=broad-except  # a pre-check only; restore reports
      return None
    return tree_shapes(getattr(metadata, 'item_metadata', metadata))

  def check_matches(self, step: int, abstract: Any, prefix: tuple[str, ...] = ()) -> None:
    """Raises CheckpointMismatchError if `step`'s tree (under `prefix`) differs from `abstract`."""
    saved = self.saved_shapes(step)
    if saved is None:
      return
    saved = {k: v for k, v in saved.items() if k[:len(prefix)] == prefix}
    target = {prefix + k: v for k, v in tree_shapes(abstract).items()}
    differences = tree_differences(saved, target)
    if differences:
      shown = '; '.join(differences[:8])
      more = f' (and {len(differences) - 8} more)' if len(differences) > 8 else ''
      raise CheckpointMismatchError(
          f'Checkpoint step {step} at {self.step_dir(step)} does not match the state this run '
          f'builds ({len(differences)} differences: {shown}{more}). The config changed since '
          f'the checkpoint was written; use the config it was written with, or a new workdir. '
          f'Nothing was moved.')

  def _restore_with_retries(self, step: int, args: Any) -> Any:
    """Orbax's restore; transient errors are retried, others classified and re-raised."""
    for attempt in range(RESTORE_ATTEMPTS):
      try:
        return self._manager.restore(step, args=args)
      except Exception as e:  # pylint: disable=broad-except  # classified just below
        where = f'Checkpoint step {step} at {self.step_dir(step)}'
        if _is_corrupt(e):
          raise CorruptCheckpointError(f'{where} is corrupt: {_first_line(e)}') from e
        if _is_transient(e) and attempt + 1 < RESTORE_ATTEMPTS:
          print(f'WARNING: {where}: transient read error ({_first_line(e)}); retrying.',
                file=sys.stderr, flush=True)
          time.sleep(RETRY_SECONDS * 2**attempt)
          continue
        kind = 'a transient error that persisted' if _is_transient(e) else 'an error'
        raise CheckpointError(
            f'{where} could not be restored ({kind}: {_first_line(e)}). It was left in place; '
            f'fix the cause and start again.') from e
    raise AssertionError('unreachable')

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` onto the shardings in `abstract_state`.

    `abstract_state` is the train state as a pytree of `jax.ShapeDtypeStruct`
    with `sharding` set (e.g. from `jax.eval_shape` plus the state shardings).
    Returns (state, loader_state); the loader state is the same on every
    process (the data order does not depend on the process count). Raises
    CorruptCheckpointError (damaged files), CheckpointMismatchError (another
    state tree) or CheckpointError (anything else); see the module docstring.
    """
    try:
      self.check_step(step)
    except CheckpointError as e:
      raise CorruptCheckpointError(str(e)) from None
    self.check_matches(step, abstract_state)
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state),
        LOADER: LoaderRestore(),
        META: ocp.args.JsonRestore(),
    })
    try:
      restored = self._restore_with_retries(step, args)
    except FileNotFoundError as e:   # a loader state file missing: the step is incomplete
      raise CorruptCheckpointError(
          f'Checkpoint step {step} at {self.step_dir(step)} is incomplete: {e}') from e
    return restored[STATE], restored[LOADER]

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest good step; None if the directory holds none.

    A corrupt newest step is reported (stderr and log), moved aside, and the
    one before it is tried; any other failure is raised and moves nothing
    (module docstring). All processes take the same decision.
    """
    for step in reversed(self.all_steps()):
      error, outcome, restored = None, _OK, None
      try:
        restored = self.restore(step, abstract_state)
      except CorruptCheckpointError as e:
        error, outcome = e, _CORRUPT
      except Exception as e:  # pylint: disable=broad-except  # re-raised after agreeing
        error, outcome = e, _FAILED
      agreed = _agree(outcome)
      if agreed == _OK:
        return restored
      if agreed == _FAILED:
        if outcome == _FAILED:
          raise error
        raise CheckpointError(
            f'Checkpoint step {step} at {self.step_dir(step)} could not be restored on another '
            'process (see its log); nothing was moved.') from error
      message = (f'{error}. Falling back to the previous checkpoint.' if error is not None else
                 f'Checkpoint step {step} at {self.step_dir(step)} is corrupt on another '
                 'process. Falling back to the previous checkpoint.')
      logging.error(message)
      print(f'WARNING: {message}', file=sys.stderr, flush=True)
      self._quarantine(step)
    return None

  def restore_params(self, step: int | None, abstract_params: Any) -> tuple[int, Any]:
    """Restores only `params` (no optimizer state) of `step` (None = newest good).

    Returns (step, params). For generation and evaluation.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    if not steps or (step is not None and step not in self.all_steps()):
      raise CheckpointError(f'No checkpoint {"" if step is None else f"step {step} "}'
                            f'in {self.directory}; saved steps: {self.all_steps()}')
    errors = []
    for s in steps:
      # Exactly the run's parameter tree, extra keys included: a partial restore
      # (e.g. 2 of a run's 4 layers) is never silent.
      self.check_matches(s, abstract_params, prefix=('params',))
      try:
        self.check_step(s)
        # A fresh read-only manager: the `state` item is read here with the
        # PyTree handler, whose partial restore skips the optimizer state.
        reader = ocp.CheckpointManager(self.directory, item_names=(STATE,),
                                       options=ocp.CheckpointManagerOptions(read_only=True))
        restored = reader.restore(s, args=ocp.args.Composite(**{
            STATE: ocp.args.PyTreeRestore(
                item={'params': abstract_params},
                restore_args=jax.tree.map(_restore_args, {'params': abstract_params}),
                partial_restore=True)}))
        return s, restored[STATE]['params']
      except CheckpointError as e:
        errors.append(str(e))
      except Exception as e:  # pylint: disable=broad-except
        errors.append(f'Checkpoint step {s} at {self.step_dir(s)} is unreadable: '
                      f'{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}')
      print(f'WARNING: {errors[-1]}', file=sys.stderr, flush=True)
    raise CheckpointError('; '.join(errors))

  def _quarantine(self, step: int) -> None:
    """Moves a bad step out of the way so a resumed run can save that step again."""
    if jax.process_index() == 0:
      target_dir = epath.Path(self.directory + '.corrupt')
      target_dir.mkdir(parents=True, exist_ok=True)
      target = target_dir / f'{step}-{int(time.time())}'
      # A rename locally; on Cloud Storage a copy of every object and a delete.
      epath.Path(self.step_dir(step)).rename(target)
      print(f'Moved bad checkpoint step {step} to {target}', file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'strata_quarantine_{step}')
    self._manager.reload()


def _restore_args(leaf: Any) -> ocp.ArrayRestoreArgs | ocp.RestoreArgs:
  sharding = getattr(leaf, 'sharding', None)
  if sharding is None:
    return ocp.RestoreArgs()
  return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype)


def abstract_like(tree: Any, shardings: Any) -> Any:
  """A pytree of `jax.ShapeDtypeStruct` with `shardings`, the restore target."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
