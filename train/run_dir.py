"""Opens a finished (or running) run directory for generation and evaluation.

`load_run(workdir)` reads `<workdir>/config.json`, rebuilds the model, makes
a mesh over the devices at hand (the run's own mesh if it fits, else every
device on the FSDP axis) and restores only the parameters of a checkpoint,
not the optimizer state. `workdir` may be a `gs://` URL; its files are read
through `etils.epath`.

A LoRA run's checkpoints hold adapters only: `load_run` restores them, loads
the base they record (path, step; its fingerprint checked) and returns the
merged params (train/lora.py), so generation, evaluation and export see one
plain parameter tree for every run. `load_params(workdir)` is the short form.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections

from configs.cli import UserError
from model import config as model_config_lib
from model import transformer
from train import checkpoint as checkpoint_lib
from train import lora as lora_lib
from train import mesh as mesh_lib
from train import paths
from train import run_files
from train import state as state_lib

# The file names of a run workdir, defined where the run writes them.
CONFIG_FILE = run_files.CONFIG_FILE
CHECKPOINT_DIR = run_files.CHECKPOINT_DIR
TOKENIZER_FILE = run_files.TOKENIZER_FILE


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise UserError(f'{path} does not exist: is {workdir} a training run directory?')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def tokenizer_path(config: ml_collections.ConfigDict, workdir: str) -> str | None:
  """The run's copy of the tokenizer, else the one in its data workdir."""
  for path in (epath.Path(workdir) / TOKENIZER_FILE,
               epath.Path(config.data.workdir) / TOKENIZER_FILE):
    if path.exists():
      return os.fspath(path)
  return None


def _mesh_for(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  try:
    return mesh_lib.make_mesh(config.mesh)
  except ValueError as e:
    # e.g. a run trained on a pod opened on a laptop: shard params over what is here.
    logging.info('The run\'s mesh does not fit these devices (%s); using fsdp over all.', e)
    config.mesh.update(dict(data=1, fsdp=-1, tensor=1, num_slices=1))
    return mesh_lib.make_mesh(config.mesh)


def load_run(workdir: str, step: int | None = None, *,
             model_class: Any = transformer.Transformer) -> tuple[
    ml_collections.ConfigDict, transformer.Transformer, Any, Any, jax.sharding.Mesh]:
  """(config, model, params, tokenizer, mesh) of `workdir` at `step` (None = latest good).

  `tokenizer` is None if neither the run nor its data workdir holds one.
  `config.checkpoint_step` is set to the step whose params were restored.
  `model_class` builds the model whose parameter tree the run saved (a reward
  model's: `train.reward.ScoreModel`).
  """
  workdir = paths.resolve_str(workdir)
  config = load_config(workdir)
  model = model_class(model_config_lib.ModelConfig.from_config(config.model))
  mesh = _mesh_for(config)
  lora_cfg = lora_lib.LoraConfig.from_config(config)
  if lora_cfg is None:
    abstract, _ = state_lib.abstract_state(config, model, mesh)
    lora = None
  else:
    lora = lora_lib.setup(config, model, mesh, lora_cfg)
    abstract = lora.abstract_state
  checkpointer = checkpoint_lib.Checkpointer(os.fspath(epath.Path(workdir) / CHECKPOINT_DIR),
                                             read_only=True)
  try:
    restored_step, params = checkpointer.restore_params(step, abstract.params)
    recorded = None if lora is None else lora_lib.recorded_base(checkpointer, restored_step)
  finally:
    checkpointer.close()  # Orbax's background threads must not outlive the restore.
  if lora is not None:
    if recorded is None:
      raise UserError(f'{workdir} is a LoRA run but its checkpoint step {restored_step} '
                      f'records no base ({lora_lib.META_KEY} in its meta).')
    base, _ = lora_lib.load_base(None, lora, recorded)
    params = lora_lib.merge(base, params, lora.spec)
    logging.info('LoRA run %s: adapters of step %d merged into %s step %d.', workdir,
                 restored_step, recorded['path'], recorded['step'])
  config.checkpoint_step = restored_step
  tokenizer = None
  path = tokenizer_path(config, workdir)
  if path is not None:
    from data_pipeline import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    # SentencePiece opens only local files; bytes read through epath also work for gs://.
    tokenizer = tokenizer_lib.Tokenizer.from_bytes(epath.Path(path).read_bytes(), path)
    if tokenizer.vocab_size != model.config.vocab_size:
      # Ids past the tokenizer's pieces would fail to decode (or decode wrongly).
      raise UserError(f'The tokenizer {path} has {tokenizer.vocab_size} pieces but the run\'s '
                      f'model has vocab_size {model.config.vocab_size}: they do not belong '
                      'together.')
  else:
    logging.warning('No tokenizer found for run %s.', workdir)
  return config, model, params, tokenizer, mesh


def load_params(workdir: str, step: int | None = None) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, params) of `workdir` at `step`: a LoRA run's adapters merged into its base."""
  config, _, params, _, _ = load_run(workdir, step)
  return config, params


def open_run(workdir: str, step: int | None = None, *,
             model_class: Any = transformer.Transformer) -> tuple[
    ml_collections.ConfigDict, transformer.Transformer, Any, Any, jax.sharding.Mesh]:
  """`load_run` for an entry point: a workdir that is not a run, or a step that cannot be
  restored, is a one-line UserError."""
  if not (epath.Path(workdir) / CONFIG_FILE).exists():
    raise UserError(f'--workdir={workdir} is not a training run directory '
                    f'(no {CONFIG_FILE} in it)')
  try:
    return load_run(workdir, step, model_class=model_class)
  except checkpoint_lib.CheckpointError as e:  # no such step, none saved, or unreadable
    raise UserError(str(e)) from e
