"""Pre-training: next-token prediction on a prepared corpus, with the shared loop.

`train(config, workdir)` is what `python -m train` runs:
  1. writes `<workdir>/config.json` (with a local `data.workdir` made absolute,
     so generate/evaluate find the data and tokenizer from any directory);
  2. builds the embedded `stdlib` corpus first if its `DONE` marker is missing;
  3. copies the tokenizer into the run (`<workdir>/tokenizer.model`);
  4. builds the mesh, the model, the sharded state (or restores it), the
     loaders and the jitted steps, and hands them to `train.loop.run`.

The run and data workdirs may be Cloud Storage URLs (`gs://bucket/run`, as
on a TPU pod): every file here goes through `etils.epath` and a URL is never
made "absolute" (see `train.paths`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from data_pipeline import loader as loader_lib
from model import config as model_config_lib
from model import transformer
from train import checkpoint as checkpoint_lib
from train import loop
from train import mesh as mesh_lib
from train import mfu
from train import paths
from train import state as state_lib
from train import steps as steps_lib

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
TOKENIZER_FILE = 'tokenizer.model'


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`<workdir>/config.json`; a changed config on resume is kept as config.<n>.json."""
  workdir = epath.Path(workdir)
  path = workdir / CONFIG_FILE
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if jax.process_index() != 0:
    return
  if path.exists():
    previous = path.read_text()
    if previous != text:
      n = 1
      while (workdir / f'config.{n}.json').exists():
        n += 1
      path.replace(workdir / f'config.{n}.json')
      logging.warning('The config differs from the run\'s previous one, kept as config.%d.json', n)
  paths.write_text_atomic(path, text)


def ensure_data(config: ml_collections.ConfigDict) -> None:
  """Builds the embedded corpus if it is the configured one and is missing."""
  data_workdir = config.data.workdir
  if (epath.Path(data_workdir) / 'DONE').exists():
    return
  if config.data.get('preset', None) == 'stdlib' and paths.is_remote(data_workdir):
    # The data pipeline writes local files only; building "into" a URL would
    # leave a local folder named gs:.
    raise FileNotFoundError(
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
    raise FileNotFoundError(
        f'No prepared data in data.workdir={data_workdir} (no tfds/ and no DONE); run '
        f'`python -m data_pipeline --config=configs/data.py:{config.data.get("preset", "files")} '
        f'--workdir={data_workdir}` first.')


def record_tokenizer(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Copies the data's tokenizer into the run and checks it fits the model's vocabulary."""
  source = epath.Path(config.data.workdir) / TOKENIZER_FILE
  if not source.exists():
    logging.warning('No tokenizer at %s; generate/evaluate will need one.', source)
    return None
  from data_pipeline import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  # SentencePiece reads only local files; the bytes through epath work for gs:// too.
  model_bytes = source.read_bytes()
  vocab_size = tokenizer_lib.Tokenizer.from_bytes(model_bytes, os.fspath(source)).vocab_size
  if vocab_size > config.model.vocab_size:
    raise ValueError(
        f'Tokenizer {source} has {vocab_size} pieces but model.vocab_size is '
        f'{config.model.vocab_size}; set --config.model.vocab_size={vocab_size}.')
  target = epath.Path(workdir) / TOKENIZER_FILE
  if jax.process_index() == 0:
    target.write_bytes(model_bytes)
    vocab = source.with_suffix('.vocab')
    if vocab.exists():
      target.with_suffix('.vocab').write_bytes(vocab.read_bytes())
  return os.fspath(target)


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


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.LoopResult:
  """Pre-trains per `config` in `workdir`, resuming from its latest checkpoint."""
  workdir = paths.resolve_str(workdir)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  with config.unlocked():
    config.data.workdir = paths.resolve_str(config.data.workdir)
  write_config(config, workdir)
  ensure_data(config)
  record_tokenizer(config, workdir)

  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.logical_rules(config.mesh)
  model_cfg = model_config_lib.ModelConfig.from_config(config.model)
  model = transformer.Transformer(model_cfg)
  abstract_state, state_shardings = state_lib.abstract_state(config, model, mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)

  data_dir = config.data.workdir
  train_loader = loader_lib.make_loader(
      data_dir, 'train', seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed,
      num_epochs=config.num_epochs, shuffle=True, sharding=batch_sharding)
  to_global = lambda batch: loader_lib.global_batch(batch, batch_sharding, config.batch_size)

  train_step = steps_lib.make_train_step(config, model, mesh, state_shardings, batch_sharding)
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
      os.fspath(epath.Path(workdir) / CHECKPOINT_DIR), keep=config.keep_checkpoints)
  loop_cfg = loop.LoopConfig.from_config(config)
  epoch_steps = getattr(train_loader, 'num_batches', None)   # set when num_epochs is finite
  if epoch_steps is not None:
    # Whichever ends first: num_train_steps (if > 0) or num_epochs over the data.
    loop_cfg = dataclasses.replace(
        loop_cfg, num_train_steps=min(loop_cfg.num_train_steps or epoch_steps, epoch_steps))
  try:
    return loop.run(
        workdir=workdir, loop_cfg=loop_cfg, train_step=train_step, train_loader=train_loader,
        to_global=to_global, checkpointer=checkpointer,
        init_state=lambda: state_lib.create_sharded_state(
            config, model, mesh, jax.random.key(config.seed))[0],
        abstract_state=abstract_state, evaluate=evaluate,
        tokens_per_step=config.batch_size * config.seq_len,
        flops_per_token=model_config_lib.flops_per_token(model_cfg, config.seq_len),
        peak_flops=peak, startup_metrics=startup)
  finally:
    checkpointer.close()


def summary(result: loop.LoopResult) -> str:
  return json.dumps({'step': result.step, 'reason': result.reason,
                     'best_eval_loss': result.best_eval_loss,
                     'last_checkpoint': result.last_checkpoint})
