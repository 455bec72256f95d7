"""Rewards for RL: Python functions registered by name, and a reward-model scorer.

A reward function scores one finished rollout:

  fn(prompt: str, completion: str, example: dict) -> float

`prompt` is the user's last message, `completion` the generated text up to
the stop token, `example` the prompt's record (for the embedded instructions:
`function_name`, `answer`, ...). Functions are registered with
`@register('name')` over a factory that takes the `reward` config section,
and picked with `--config.reward.function=name`. Generated code is never
executed: the code rewards read it with `ast` (train/code_checks.py).

A reward model (`--config.reward.model=runs/rm`) is a run whose parameters
are the trunk plus `score_head` (the Transformer with head='scalar', as the
reward stage trains it); its score of a rollout is read at the last real
token of the response: the `<|end|>` it generated (rows are right-padded, so
that is a gather at each row's own index, never at padding).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from configs.cli import UserError
from model import config as model_config_lib
from model import transformer
from train import checkpoint as checkpoint_lib
from train import mesh as mesh_lib
from train import objectives
from train import paths
from train import run_dir

RewardFn = Callable[[str, str, Mapping[str, Any]], float]
_REGISTRY: dict[str, Callable[[ml_collections.ConfigDict], RewardFn]] = {}


def register(name: str):
  """Decorator: `@register('name')` over `factory(reward_config) -> RewardFn`."""
  def wrap(factory):
    _REGISTRY[name] = factory
    return factory
  return wrap


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str, reward_config: ml_collections.ConfigDict) -> RewardFn:
  if name not in _REGISTRY:
    raise UserError(f'config key reward.function={name!r} is not a registered reward; '
                    f'known: {names()}.')
  return _REGISTRY[name](reward_config)


def _requested_name(example: Mapping[str, Any]) -> str | None:
  name = example.get('function_name')
  if not name:
    raise UserError(f'prompt {example.get("id", "?")} has no function_name, which the code '
                    'rewards need (the embedded stdlib instructions have one).')
  return name


@register('parses_and_names')
def parses_and_names(reward_config: ml_collections.ConfigDict) -> RewardFn:
  """1 if the completion parses and defines the requested function (at top level),
  `reward.parse_credit` if it only parses, 0 otherwise. Never executed."""
  from train import code_checks  # pylint: disable=g-import-not-at-top
  credit = float(reward_config.get('parse_credit', 0.0))

  def reward(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    del prompt
    check = code_checks.check_completion(completion, _requested_name(example))
    return 1.0 if check.defines_name else (credit if check.parses else 0.0)
  return reward


@register('parses')
def parses(reward_config: ml_collections.ConfigDict) -> RewardFn:
  """1 if the completion parses with `ast`, else 0."""
  del reward_config
  from train import code_checks  # pylint: disable=g-import-not-at-top

  def reward(prompt: str, completion: str, example: Mapping[str, Any]) -> float:
    del prompt, example
    return float(code_checks.check_completion(completion, None).parses)
  return reward


# ------------------------------------------------------------- reward models

def scalar_abstract_params(model: transformer.Transformer, mesh: jax.sharding.Mesh,
                           rules: Any) -> Any:
  """ShapeDtypeStructs (with shardings on `mesh`) of `model`'s params with head='scalar'."""
  tokens = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(
      lambda rng: model.init(rng, tokens, head='scalar')['params'], jax.random.key(0))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      nn.meta.unbox(boxed), shardings)


def load_reward_model(source: str, mesh: jax.sharding.Mesh, rules: Any,
                      key: str = 'reward.model') -> tuple[transformer.Transformer, Any]:
  """(model, params) of the reward-model run at `source`, placed on `mesh`.

  The run's parameters must be a scalar-head Transformer's (trunk +
  score_head); a language-model run is refused with a one-line error.
  """
  source = paths.resolve_str(source)
  if not (epath.Path(source) / run_dir.CONFIG_FILE).exists():
    raise UserError(f'config key {key}={source}: no {run_dir.CONFIG_FILE} there; give the '
                    'directory of a reward-model run (python -m train.reward).')
  config = run_dir.load_config(source)
  model = transformer.Transformer(model_config_lib.ModelConfig.from_config(config.model))
  abstract = scalar_abstract_params(model, mesh, rules)
  reader = checkpoint_lib.Checkpointer(os.fspath(epath.Path(source) / run_dir.CHECKPOINT_DIR),
                                       read_only=True)
  try:
    saved = reader.saved_shapes(reader.latest_step()) if reader.latest_step() is not None else None
    if saved is not None and not any('score_head' in k for k in saved):
      raise UserError(f'config key {key}={source} is not a reward model: its parameters have '
                      'no score_head (train one with python -m train.reward).')
    _, params = reader.restore_params(None, abstract)
  except checkpoint_lib.CheckpointError as e:
    raise UserError(f'config key {key}={source}: {e}') from None
  finally:
    reader.close()
  return model, params


def last_token_scores(model: nn.Module, params: Any, batch: objectives.Batch,
                      last_index_B: jax.Array) -> jax.Array:
  """The scalar head's score at each row's `last_index_B` (its last real token), [B]."""
  scores_BT = objectives.forward(model, params, batch, None, head='scalar')
  return jnp.take_along_axis(scores_BT, last_index_B[:, None], axis=1)[:, 0]
