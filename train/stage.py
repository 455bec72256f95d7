"""The one stage runner: every training stage is a `Stage` handed to `run`.

A stage (pre-training, SFT, reward modelling, DPO, ...) says what is its own:
how its config is checked, how its data is prepared, the loss it trains and
evaluates, and which metric is "best". `run` does the rest, the same way for
all of them:

  1. checks the workdir and the config before anything is written
     (train/run_files.py); prepares the data; reads the tokenizer and the data
     fingerprint, and on resume refuses other data;
  2. with `init_from` (another run's directory), takes that run's model shape
     and checks its tokenizer is this data's;
  3. builds the mesh, the model, the abstract sharded state and the loaders,
     checking the batch splits over the mesh;
  4. builds the train and eval steps from the stage's loss;
  5. hands everything to `train.loop.run`, whose state is restored from the
     workdir, else initialised: fresh, or from `init_from`'s parameters
     (restored onto this mesh, every key checked) with a fresh optimizer;
  6. writes config.json, tokenizer.model and data.json once the state is there.

With `lora.rank` > 0 (train/lora.py) the state's params are the adapters
only; the base (init_from's params; on resume the step its checkpoints
recorded, its fingerprint checked) joins the stage's frozen trees as
`frozen['base']`, and the stage's losses are wrapped so they see base +
adapters through `objectives.forward`. A stage needs no LoRA code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from configs import cli
from configs.cli import UserError
from data_pipeline import copy_task
from data_pipeline import loader as loader_lib
from data_pipeline import tokenizer as tokenizer_lib
from model import config as model_config_lib
from model import transformer
from train import checkpoint as checkpoint_lib
from train import loop
from train import lora as lora_lib
from train import mesh as mesh_lib
from train import mfu
from train import objectives
from train import optimizer as optimizer_lib
from train import paths
from train import run_dir
from train import run_files
from train import state as state_lib
from train import steps as steps_lib

# Model keys a run may set for itself when it starts from another run's
# parameters (`init_from`); every other key (the shapes, the parameter tree)
# comes from that run.
RUNTIME_MODEL_KEYS = ('dropout_rate', 'remat_policy', 'attention_impl', 'dtype', 'loss_chunk_size')


@dataclasses.dataclass(frozen=True)
class Stage:
  """What a training stage contributes to `run`.

  name: for messages ('pretrain', 'sft', ...).
  validate: checks the config (ranges, combinations); raises UserError.
  prepare_data: makes sure `config.data.workdir` holds the stage's dataset.
  loss: (config, model) -> the training loss_fn (train/objectives.py).
  eval_loss: (config, model) -> the evaluation loss_fn; its aux sums become
    `eval/<name>` metrics and `eval/loss` decides the best checkpoint.
  frozen: (Built) -> (tree, shardings): the trees the losses read but never
    train (a reference policy, a reward model), placed once and passed to
    every train and eval step as the loss_fn's `frozen` argument; None for
    stages that need none. A dict of named trees ('reference', 'reward');
    with LoRA on the runner adds 'base' (the un-adapted params), which DPO
    and RL take as their reference then.
  model: ModelConfig -> the module the stage trains (default the LM
    `transformer.Transformer`; a reward model's defaults to its scalar head,
    so its state holds `score_head`).
  init_params: (Built) -> (step, params) with `init_from`: the parameters
    the state starts from, placed like `built.abstract_state.params`
    (default `params_from_run`: the source run's whole tree, every key
    checked; a reward model takes an LM's trunk and a new head).
  derive_data: (Built) -> a data directory to train and evaluate on in place
    of `config.data.workdir`, made from it once the model is built (DPO's
    reference log-probs, computed in one pass); None to keep the data as it
    is. The run's data fingerprint stays that of `config.data.workdir`.
  """
  name: str
  validate: Callable[[ml_collections.ConfigDict], None]
  prepare_data: Callable[[ml_collections.ConfigDict], None]
  loss: Callable[[Any, Any], objectives.LossFn] = steps_lib.default_loss
  eval_loss: Callable[[Any, Any], objectives.LossFn] = (
      lambda config, model: objectives.next_token(model))
  frozen: Callable[['Built'], tuple[Any, Any]] | None = None
  model: Callable[[model_config_lib.ModelConfig], Any] = transformer.Transformer
  init_params: Callable[['Built'], tuple[int, Any]] | None = None
  derive_data: Callable[['Built'], str | None] | None = None


@dataclasses.dataclass(frozen=True)
class Built:
  """What `run` has built before the steps, for a stage's `frozen` hook.

  init_from: the resolved source run directory, or None.
  abstract_params / param_shardings: the model's full parameter tree (to
    restore a reference model); with LoRA on, `abstract_state.params` are
    the adapters only, these stay the model's.
  lora: the LoRA set-up (train/lora.py), None when LoRA is off.
  workdir: the run directory.
  """
  config: ml_collections.ConfigDict
  model: transformer.Transformer
  mesh: jax.sharding.Mesh
  abstract_state: state_lib.TrainState
  state_shardings: state_lib.TrainState
  init_from: str | None
  abstract_params: Any = None
  param_shardings: Any = None
  lora: lora_lib.Setup | None = None
  workdir: str | None = None


def model_config(config: ml_collections.ConfigDict) -> model_config_lib.ModelConfig:
  try:
    return model_config_lib.ModelConfig.from_config(config.model)
  except (KeyError, ValueError, TypeError) as e:
    raise UserError(f'config.model: {str(e).strip(chr(39))}') from None


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                batch_sharding: jax.sharding.NamedSharding) -> None:
  """The global batch must split evenly over the devices (and processes) that share it."""
  spec = batch_sharding.spec[0]
  axes = () if spec is None else (tuple(spec) if isinstance(spec, (tuple, list)) else (spec,))
  shards = math.prod(mesh.shape[a] for a in axes)
  if config.batch_size % shards:
    raise UserError(f'config key batch_size={config.batch_size} cannot be split over the '
                    f'{shards} devices that share the batch (mesh {dict(mesh.shape)}); use a '
                    f'multiple of {shards}.')
  if config.batch_size % jax.process_count():
    raise UserError(f'config key batch_size={config.batch_size} is not a multiple of the '
                    f'{jax.process_count()} processes.')


def peak_flops(mesh: jax.sharding.Mesh) -> tuple[float | None, dict[str, Any]]:
  """Peak FLOP/s of the mesh's devices (table for TPU/GPU, a measured matmul on CPU)."""
  devices = list(mesh.devices.flat)
  try:
    peak, source = mfu.peak_flops(devices)
  except KeyError as e:   # an accelerator missing from the table: train without MFU
    logging.warning('%s', e)
    return None, {}
  return peak, {'perf/peak_flops_per_sec': peak, 'perf/peak_source': source,
                'perf/num_devices': len(devices)}


def adopt_init_from(config: ml_collections.ConfigDict,
                    tokenizer_bytes: bytes | None) -> str | None:
  """With `config.init_from`, takes that run's model shape and checks its tokenizer.

  Returns the resolved run directory, or None without init_from.
  """
  source = config.get('init_from') or None
  if source is None:
    return None
  source = paths.resolve_str(source)
  if not (epath.Path(source) / run_files.CONFIG_FILE).exists():
    raise UserError(f'init_from={config.init_from}: no {run_files.CONFIG_FILE} there; give '
                    'the directory of a finished run (e.g. runs/tiny).')
  source_model = run_dir.load_config(source).get('model', {})
  with config.unlocked():
    for key, value in source_model.items():
      if key in RUNTIME_MODEL_KEYS or key not in config.model:
        continue
      if config.model[key] != value:
        logging.info('init_from: model.%s = %r (from %s)', key, value, source)
      config.model[key] = value
  copy = epath.Path(source) / run_files.TOKENIZER_FILE
  if tokenizer_bytes is not None and copy.exists() and copy.read_bytes() != tokenizer_bytes:
    raise UserError(f'init_from={config.init_from} was trained with another tokenizer than '
                    f'the one of data.workdir={config.data.workdir}; prepare the data with '
                    f'{copy}.')
  return source


def params_from_run(source: str, abstract_params: Any) -> tuple[int, Any]:
  """(step, params) of `source`'s newest good checkpoint, placed like `abstract_params`.

  The checkpoint's parameter tree must equal `abstract_params`' (shape and
  sharding structs), extra keys included.
  """
  directory = os.fspath(epath.Path(source) / run_files.CHECKPOINT_DIR)
  reader = checkpoint_lib.Checkpointer(directory, read_only=True)
  try:
    return reader.restore_params(None, abstract_params)
  except checkpoint_lib.CheckpointMismatchError:
    raise
  except checkpoint_lib.CheckpointError as e:
    raise UserError(f'init_from={source}: {e}') from None
  finally:
    reader.close()


def shrink_and_perturb(params: Any, shrink: float, perturb: float, key: jax.Array) -> Any:
  """Every matrix W becomes `shrink * W + perturb * std(W) * noise` (Ash & Adams 2020);
  vectors (norm scales) are kept as they are."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [
      leaf if leaf.ndim < 2 else
      shrink * leaf + perturb * jax.numpy.std(leaf) * jax.random.normal(k, leaf.shape, leaf.dtype)
      for leaf, k in zip(leaves, keys)])


def state_from_run(config: ml_collections.ConfigDict, abstract: state_lib.TrainState,
                   shardings: state_lib.TrainState, source: str,
                   restore: Callable[[], tuple[int, Any]] | None = None) -> state_lib.TrainState:
  """A fresh state whose params are `source`'s newest good checkpoint's, on this mesh.

  `abstract` and `shardings` are this run's state (`state_lib.abstract_state`).
  `restore` () -> (step, params) replaces `params_from_run(source, ...)`.
  """
  step, params = restore() if restore else params_from_run(source, abstract.params)
  print(f'Initialised the parameters from {source} (step {step}); optimizer state fresh.',
        flush=True)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, config.num_train_steps)
  rng = np.asarray(jax.device_get(jax.random.key_data(jax.random.key(config.seed))))
  shrink, perturb = config.get('init_shrink', 1.0), config.get('init_perturb', 0.0)
  reshape = shrink != 1.0 or perturb
  if reshape:
    print(f'Shrunk the matrices by {shrink} and perturbed them by {perturb} of their std.',
          flush=True)

  def fresh(params, rng):
    if reshape:
      key = jax.random.fold_in(jax.random.wrap_key_data(rng), 1)
      params = shrink_and_perturb(params, shrink, perturb, key)
    return state_lib.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
                                opt_state=tx.init(params), rng=jax.random.split(rng)[1])

  return jax.jit(fresh, out_shardings=shardings)(params, rng)


def with_copy_task(config: ml_collections.ConfigDict, loader: loader_lib.Loader,
                   tokenizer_bytes: bytes | None) -> Any:
  """The train loader, with copy-task rows mixed in when `data.copy_fraction` > 0."""
  fraction = config.data.get('copy_fraction', 0.0)
  if not fraction:
    return loader
  if tokenizer_bytes is None:
    raise UserError(f'config key data.copy_fraction={fraction} draws token ids from the '
                    f'data\'s tokenizer, but {config.data.workdir} has none.')
  tokenizer = tokenizer_lib.Tokenizer.from_bytes(tokenizer_bytes)
  task = copy_task.CopyTask(fraction, config.data.copy_min_len, config.data.copy_max_len,
                            tokenizer.ordinary_ids())
  return copy_task.Mixed(loader, task, config.seed, tokenizer.bos_id, tokenizer.eos_id)


def run(stage: Stage, config: ml_collections.ConfigDict, workdir: str) -> loop.LoopResult:
  """Trains `stage` per `config` in `workdir`, resuming from its latest checkpoint."""
  stage.validate(config)
  workdir = run_files.check_workdir(workdir, config.data.workdir)
  with config.unlocked():
    config.data.workdir = paths.resolve_str(config.data.workdir)
  stage.prepare_data(config)
  tokenizer = run_files.read_tokenizer(config)
  init_from = adopt_init_from(config, tokenizer[0])
  model_cfg = model_config(config)
  fingerprint = run_files.data_fingerprint(config.data.workdir, tokenizer[0])
  if run_files.has_checkpoint(workdir):
    run_files.check_same_data(workdir, fingerprint)

  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.logical_rules(config.mesh)
  model = stage.model(model_cfg)
  lora_cfg = lora_lib.LoraConfig.from_config(config)
  lora = None
  if lora_cfg is None:
    abstract_state, state_shardings = state_lib.abstract_state(config, model, mesh)
    abstract_params, param_shardings = abstract_state.params, state_shardings.params
  else:
    if init_from is None:
      raise UserError(f'config key lora.rank={lora_cfg.rank} needs init_from: LoRA adapts '
                      'the params of another run (e.g. --config.init_from=runs/tiny).')
    lora = lora_lib.setup(config, model, mesh, lora_cfg)
    abstract_state, state_shardings = lora.abstract_state, lora.state_shardings
    abstract_params, param_shardings = lora.base_abstract, lora.base_shardings
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  check_batch(config, mesh, batch_sharding)
  built = Built(config=config, model=model, mesh=mesh, abstract_state=abstract_state,
                state_shardings=state_shardings, init_from=init_from,
                abstract_params=abstract_params, param_shardings=param_shardings, lora=lora,
                workdir=workdir)
  data_dir = (stage.derive_data(built) if stage.derive_data else None) or config.data.workdir
  train_loader = loader_lib.make_loader(
      data_dir, 'train', seq_len=config.seq_len, batch_size=config.batch_size, seed=config.seed,
      num_epochs=config.num_epochs, shuffle=True, sharding=batch_sharding)
  train_loader = with_copy_task(config, train_loader, tokenizer[0])
  to_global = lambda batch: loader_lib.global_batch(batch, batch_sharding, config.batch_size)
  loop_cfg = loop.LoopConfig.from_config(config)
  # Batches in num_epochs passes over the data; None when num_epochs is None.
  data_steps = getattr(train_loader, 'num_batches', None)
  if data_steps is not None:
    # Whichever ends first: num_train_steps (if > 0) or num_epochs over the data.
    loop_cfg = dataclasses.replace(
        loop_cfg, num_train_steps=min(loop_cfg.num_train_steps or data_steps, data_steps))
  checkpoint_dir = os.fspath(epath.Path(workdir) / run_files.CHECKPOINT_DIR)
  frozen, frozen_shardings = None, None
  if stage.frozen is not None:
    frozen, frozen_shardings = stage.frozen(built)
  train_loss, eval_loss = stage.loss(config, model), stage.eval_loss(config, model)
  extra_meta = {}
  if lora is not None:
    if frozen is not None and not isinstance(frozen, dict):
      raise TypeError(f'Stage {stage.name}: with LoRA its frozen hook must return a dict of '
                      'named trees, to which the runner adds "base".')
    recorded = None
    if run_files.has_checkpoint(workdir):
      reader = checkpoint_lib.Checkpointer(checkpoint_dir, read_only=True)
      try:
        recorded = lora_lib.recorded_base(reader)
      finally:
        reader.close()
    base, record = lora_lib.load_base(init_from, lora, recorded)
    print(f'{lora_lib.describe(lora.spec)}; base {record["path"]} step {record["step"]} '
          f'(fingerprint {record["fingerprint"][:12]}).', flush=True)
    frozen = dict(frozen or {}, base=base)
    frozen_shardings = dict(frozen_shardings or {}, base=lora.base_shardings)
    train_loss = lora_lib.wrap_loss(train_loss, lora.spec)
    eval_loss = lora_lib.wrap_loss(eval_loss, lora.spec)
    extra_meta[lora_lib.META_KEY] = record
  # The learning-rate schedule spans the steps the run really takes.
  train_step = steps_lib.make_train_step(config, model, mesh, state_shardings, batch_sharding,
                                         loss_fn=train_loss, frozen=frozen,
                                         frozen_shardings=frozen_shardings,
                                         num_train_steps=loop_cfg.num_train_steps)
  eval_step = steps_lib.make_eval_step(config, model, mesh, state_shardings.params,
                                       batch_sharding, loss_fn=eval_loss,
                                       frozen=frozen, frozen_shardings=frozen_shardings)
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

  if lora is not None:
    init_state = lambda: lora.init_state(config, jax.random.key(config.seed))
  elif init_from is None:
    init_state = lambda: state_lib.create_sharded_state(
        config, model, mesh, jax.random.key(config.seed))[0]
  else:
    restore = None if stage.init_params is None else (lambda: stage.init_params(built))
    init_state = lambda: state_from_run(config, abstract_state, state_shardings, init_from,
                                        restore)
  peak, startup = peak_flops(mesh)
  startup['model/num_params'] = model_config_lib.num_params(model_cfg)
  startup['model/trainable_params'] = state_lib.trainable_params(abstract_state)
  startup['model/optimizer_bytes'] = state_lib.optimizer_bytes(abstract_state)
  if lora is not None:
    startup['model/lora_rank'] = lora.spec.rank
    startup['model/lora_weights'] = len(lora.spec.targets)
  checkpointer = checkpoint_lib.Checkpointer(
      checkpoint_dir, keep=config.keep_checkpoints,
      best_metric=f'eval/{loop_cfg.best_metric}', best_mode=loop_cfg.best_mode,
      extra_meta=extra_meta)
  try:
    return loop.run(
        workdir=workdir, loop_cfg=loop_cfg, train_step=train_step, train_loader=train_loader,
        to_global=to_global, checkpointer=checkpointer, init_state=init_state,
        abstract_state=abstract_state, evaluate=evaluate,
        tokens_per_step=config.batch_size * config.seq_len,
        flops_per_token=model_config_lib.flops_per_token(model_cfg, config.seq_len),
        peak_flops=peak, startup_metrics=startup,
        on_ready=lambda: run_files.record_start(config, workdir, tokenizer, fingerprint))
  finally:
    checkpointer.close()


def summary(result: loop.LoopResult, best_metric: str = 'loss') -> str:
  """The run's end as one JSON line; the best value is named after the metric it is of."""
  return json.dumps({'step': result.step, 'reason': result.reason,
                     f'best_eval_{best_metric}': result.best_eval_loss,
                     'last_checkpoint': result.last_checkpoint})


def entry_point(train: Callable[[ml_collections.ConfigDict, str], loop.LoopResult]
                ) -> Callable[[list[str]], None]:
  """The `main(argv)` of a stage's `python -m` entry point over its `train(config, workdir)`.

  Reads the `config` and `workdir` flags the module defines, quietens library
  logs, joins the distributed job, trains, and prints the summary; a NaN loss
  exits 1 (the loop printed the step and value).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from train import console  # pylint: disable=g-import-not-at-top
  from train import distributed  # pylint: disable=g-import-not-at-top

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise UserError(f'Unexpected arguments: {argv[1:]}')
    console.quiet_libraries()
    distributed.initialize_from_flags()
    try:
      result = train(flags.FLAGS.config, flags.FLAGS.workdir)
    except loop.NonFiniteLossError:
      raise SystemExit(1) from None
    print(f'Training finished: {summary(result, flags.FLAGS.config.get("best_metric", "loss"))}',
          flush=True)
  return main


def run_command_line(main: Callable[[list[str]], None], config_help: str) -> None:
  """Defines the `--config` / `--workdir` flags of a stage's `python -m` command and runs `main`.

  Called under `if __name__ == '__main__'`, not at import: tests import several
  entry-point modules side by side, and a flag may be defined only once.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, config_help, lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, config).')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)
