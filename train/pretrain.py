"""Pre-training: next-token prediction on a prepared corpus, with the shared loop.

`train(config, workdir)` is what `python -m train` runs:
  1. checks the workdir and the config (ranges, combinations, the batch over
     the mesh) before anything is written;
  2. builds the embedded `stdlib` corpus first if its `DONE` marker is missing;
  3. reads the data's tokenizer and fingerprint, and on resume refuses data
     or a tokenizer other than the run's (train/run_files.py);
  4. builds the mesh, the model, the sharded state (or restores it), the
     loaders and the jitted steps, and hands them to `train.loop.run`, which
     writes config.json (a local `data.workdir` made absolute, so generate and
     evaluate find the data from any directory), tokenizer.model and data.json
     once the state is restored or initialised.

The run and data workdirs may be Cloud Storage URLs (`gs://bucket/run`, as
on a TPU pod): every file here goes through `etils.epath` and a URL is never
made "absolute" (see `train.paths`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from configs import pretrain as pretrain_config
from configs.cli import UserError
from data_pipeline import loader as loader_lib
from model import config as model_config_lib
from model import transformer
from train import checkpoint as checkpoint_lib
from train import loop
from train import mesh as mesh_lib
from train import mfu
from train import paths
from train import run_files
from train import state as state_lib
from train import steps as steps_lib

def ensure_data(config: ml_collections.ConfigDict) -> None:
  """Builds the embedded corpus if it is the configured one and is missing."""
  data_workdir = config.data.workdir
  if (epath.Path(data_workdir) / 'DONE').exists():
    return
  if config.data.get('preset', None) == 'stdlib' and paths.is_remote(data_workdir):
    # The data pipeline writes local files only; building "into" a URL would
    # leave a local folder named gs:.
    raise UserError(
        f'No prepared data in data.workdir={data_workdir} (no DONE). Build it locally and copy '
        f'it there: python -m data_pipeline --config=configs/data.py:stdlib --workdir=runs/data '
        f'&& gcloud storage rsync --recursive runs/data {data_workdir}')
  if config.data.get('preset', None) == 'stdlib':
    from data_pipeline import pipeline  # pylint: disable=g-import-not-at-top
    print(f'Data in {data_workdir} is not prepared; building the stdlib corpus first.',
          flush=True)
    pipeline.ensure_prepared(data_workdir, preset='stdlib')
    return
  if not (epath.Path(data_workdir) / 'tfds').is_dir():
    raise UserError(
        f'No prepared data in data.workdir={data_workdir} (no tfds/ and no DONE); run '
        f'`python -m data_pipeline --config=configs/data.py:{config.data.get("preset", "files")} '
        f'--workdir={data_workdir}` first.')


def _peak_flops(mesh: jax.sharding.Mesh) -> tuple[float | None, dict[str, Any]]:
  """Peak FLOP/s of the mesh's devices (table for TPU/GPU, a measured matmul on CPU)."""
  devices = list(mesh.devices.flat)
  try:
    peak, source = mfu.peak_flops(devices)
  except KeyError as e:   # an accelerator missing from the table: train without MFU
    logging.warning('%s', e)
    return None, {}
  return peak, {'perf/peak_flops_per_sec': peak, 'perf/peak_source': source,
                'perf/num_devices': len(devices)}


def _model_config(config: ml_collections.ConfigDict) -> model_config_lib.ModelConfig:
  try:
    return model_config_lib.ModelConfig.from_config(config.model)
  except (KeyError, ValueError, TypeError) as e:
    raise UserError(f'config.model: {str(e).strip(chr(39))}') from None


def _check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 batch_sharding: jax.sharding.NamedSharding) -> None:
  shards = math.prod(mesh.shape[a] for a in _axes(batch_sharding.spec[0]))
  if config.batch_size % shards:
    raise UserError(f'config key batch_size={config.batch_size} cannot be split over the '
                    f'{shards} devices that share the batch (mesh {dict(mesh.shape)}); use a '
                    f'multiple of {shards}.')
  if config.batch_size % jax.process_count():
    raise UserError(f'config key batch_size={config.batch_size} is not a multiple of the '
                    f'{jax.process_count()} processes.')


def _axes(spec_entry: Any) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return tuple(spec_entry) if isinstance(spec_entry, (tuple, list)) else (spec_entry,)


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.LoopResult:
  """Pre-trains per `config` in `workdir`, resuming from its latest checkpoint.

  Everything that can be checked is checked before the first file of the run
  is written, and config.json / tokenizer.model / data.json are written only
  once the state is restored or initialised (see train/run_files.py).
  """
  pretrain_config.validate(config)
  workdir = run_files.check_workdir(workdir, config.data.workdir)
  model_cfg = _model_config(config)
  with config.unlocked():
    config.data.workdir = paths.resolve_str(config.data.workdir)
  ensure_data(config)
  tokenizer = run_files.read_tokenizer(config)
  fingerprint = run_files.data_fingerprint(config.data.workdir, tokenizer[0])
  if run_files.has_checkpoint(workdir):
    run_files.check_same_data(workdir, fingerprint)

  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.logical_rules(config.mesh)
  model = transformer.Transformer(model_cfg)
  abstract_state, state_shardings = state_lib.abstract_state(config, model, mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  _check_batch(config, mesh, batch_sharding)
  data_dir = config.data.workdir
  train_loader = loader_lib.make_loader(
      data_dir, 'train', seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed,
      num_epochs=config.num_epochs, shuffle=True, sharding=batch_sharding)
  to_global = lambda batch: loader_lib.global_batch(batch, batch_sharding, config.batch_size)
  loop_cfg = loop.LoopConfig.from_config(config)
  # Batches in num_epochs passes over the data; None when num_epochs is None.
  data_steps = getattr(train_loader, 'num_batches', None)
  if data_steps is not None:
    # Whichever ends first: num_train_steps (if > 0) or num_epochs over the data.
    loop_cfg = dataclasses.replace(
        loop_cfg, num_train_steps=min(loop_cfg.num_train_steps or data_steps, data_steps))
  # The learning-rate schedule spans the steps the run really takes.
  train_step = steps_lib.make_train_step(config, model, mesh, state_shardings, batch_sharding,
                                         num_train_steps=loop_cfg.num_train_steps)
  eval_step = steps_lib.make_eval_step(config, model, mesh, state_shardings.params,
                                       batch_sharding)
  eval_steps = config.eval_steps if config.eval_steps and config.eval_steps > 0 else None
  evaluate = None
  if config.eval_every:
    evaluate = loop.make_evaluator(
        eval_step,
        lambda: loader_lib.make_loader(
            data_dir, 'validation', seq_len=config.seq_len, batch_size=config.batch_size,
            seed=config.seed, num_epochs=1, shuffle=False, drop_remainder=False,
            sharding=batch_sharding),
        to_global, eval_steps)

  peak, startup = _peak_flops(mesh)
  startup['model/num_params'] = model_config_lib.num_params(model_cfg)
  checkpointer = checkpoint_lib.Checkpointer(
      os.fspath(epath.Path(workdir) / run_files.CHECKPOINT_DIR), keep=config.keep_checkpoints)
  try:
    return loop.run(
        workdir=workdir, loop_cfg=loop_cfg, train_step=train_step, train_loader=train_loader,
        to_global=to_global, checkpointer=checkpointer,
        init_state=lambda: state_lib.create_sharded_state(
            config, model, mesh, jax.random.key(config.seed))[0],
        abstract_state=abstract_state, evaluate=evaluate,
        tokens_per_step=config.batch_size * config.seq_len,
        flops_per_token=model_config_lib.flops_per_token(model_cfg, config.seq_len),
        peak_flops=peak, startup_metrics=startup,
        on_ready=lambda: run_files.record_start(config, workdir, tokenizer, fingerprint))
  finally:
    checkpointer.close()


def summary(result: loop.LoopResult) -> str:
  return json.dumps({'step': result.step, 'reason': result.reason,
                     'best_eval_loss': result.best_eval_loss,
                     'last_checkpoint': result.last_checkpoint})
