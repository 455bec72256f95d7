"""Checkpoints: an Orbax `CheckpointManager` holding state, loader state and metadata.

One step directory holds three items:
  `state`:  the train state (params, opt_state, step, rng), saved with
            `StandardSave` and restored onto the shardings of an abstract
            target, so a checkpoint written on one mesh restores on another;
  `loader`: each process's data-iterator state (JSON, one file per process),
            so a resumed run sees exactly the batches an uninterrupted one would;
  `meta`:   JSON with the step and the metrics logged with it.

Saves are asynchronous (the device keeps training while the host writes); call
`wait()` or `close()` before the process exits. The manager keeps the latest
`keep` checkpoints plus the one with the lowest `eval/loss`.

A step directory that is incomplete (a missing file or commit marker) or that
fails to restore (a truncated array file) is reported with its step and path,
moved aside to `<directory>.corrupt/`, and the previous good step is restored.

The directory may be local or on Cloud Storage (`gs://bucket/run/checkpoints`):
Orbax takes either, and this module's own files (loader states, the checks
of a step, moving a bad step aside) go through `etils.epath`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp

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


def eval_loss_of(metrics: dict[str, Any] | None) -> float:
  """Ranks checkpoints: lower is better; steps without an eval loss rank last."""
  if not metrics or metrics.get('eval/loss') is None:
    return math.inf
  return float(metrics['eval/loss'])


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
               async_save: bool = True, read_only: bool = False):
    # A string (local and absolute, or a `gs://` URL kept as is) for messages and Orbax.
    self.directory = paths.resolve_str(directory)
    policies = [ocp.checkpoint_managers.LatestN(n=max(int(keep), 1))]
    if keep_best:
      # `reverse=True` sorts descending, and BestN keeps the tail: the lowest loss.
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=eval_loss_of, reverse=True, n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        # `best_fn` makes the manager write the metrics with each step;
        # retention itself is decided by `preservation_policy`.
        best_fn=eval_loss_of,
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
    scored = [(eval_loss_of(self.metadata(s).get('metrics')), s) for s in self.all_steps()]
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
    meta = {'step': step, 'metrics': metrics, 'saved_at': time.time()}
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

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores `step` onto the shardings in `abstract_state`.

    `abstract_state` is the train state as a pytree of `jax.ShapeDtypeStruct`
    with `sharding` set (e.g. from `jax.eval_shape` plus the state shardings).
    Returns (state, loader_state); loader_state is this process's, or None if
    the step was written by a different number of processes. Raises
    CheckpointError if the step is unreadable.
    """
    self.check_step(step)
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardRestore(abstract_state),
        LOADER: LoaderRestore(),
        META: ocp.args.JsonRestore(),
    })
    try:
      restored = self._manager.restore(step, args=args)
    except Exception as e:  # Orbax/TensorStore raise many types; all mean "unreadable".
      first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
      raise CheckpointError(
          f'Checkpoint step {step} at {self.step_dir(step)} is corrupt or unreadable: '
          f'{type(e).__name__}: {first_line}') from e
    return restored[STATE], restored[LOADER]

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest good step; None if the directory holds none.

    A bad newest step is reported (stderr and log), moved aside, and the one
    before it is tried.
    """
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, abstract_state)
      except CheckpointError as e:
        message = f'{e}. Falling back to the previous checkpoint.'
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
