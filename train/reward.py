"""Reward modelling: a scalar head on the SFT model, Bradley-Terry on preference pairs.

  python -m train.reward --config=configs/reward.py:tiny --workdir=runs/rm \\
      --config.init_from=runs/sft

The shared stage runner (train/stage.py) with preference data
(data_pipeline/preference_data.py, built once into `data.workdir`): each pair
is one packed document whose chosen and rejected rows are scored in two
forward passes of `ScoreModel`, the transformer with its scalar head
(`score_head`). A response's reward is the score at its last real token, its
`<|end|>` (train/losses.py `last_token_values`), and the loss is
`-log σ(r_chosen − r_rejected − margin)` plus optional centring
(train/losses.py `bradley_terry`). Metrics (train/ and eval/): loss,
accuracy (pairs ranked right), margin (mean r_c − r_r), reward_mean and
reward_sq (of all scored responses); in eval/ also accuracy/<kind> and
count/<kind> per kind of pair when the data has kinds (the embedded
default's corruptions); the best checkpoint is the one of the highest
held-out accuracy.

`init_from` is a run with an LM head (SFT): its trunk is restored, an untied
`lm_head` is dropped and the score head starts new (small, near 0); or a
reward-model run, whose head is restored too (`params_from_any_run`). The
run's config.json says `head: scalar`: `train.score` and the RL stage load it
with `ScoreModel` (`load_reward_model`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from configs import cli
from configs import reward as reward_config
from data_pipeline import preference_data
from model import layers
from model import transformer
from train import loop
from train import objectives
from train import paths
from train import run_dir
from train import stage as stage_lib
from train import state as state_lib


class ScoreModel(transformer.Transformer):
  """The transformer with the scalar head by default: its parameters hold `score_head`.

  The same trunk and parameter names as the LM (model/transformer.py), so an
  LM run initialises it; `head='lm'` or `'hidden'` still work when asked for.
  """

  def __call__(self, tokens_BL: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, deterministic: bool = True,
               decode: bool = False, head: str = 'scalar') -> jax.Array:
    return super().__call__(tokens_BL, segment_ids, positions, deterministic, decode, head)


def is_reward_run(config: ml_collections.ConfigDict) -> bool:
  return config.get('head') == 'scalar'


def load_reward_model(workdir: str, step: int | None = None):
  """(config, model, params, tokenizer, mesh) of a reward-model run (see run_dir.load_run)."""
  config = run_dir.load_config(paths.resolve_str(workdir))
  if not is_reward_run(config):
    raise cli.UserError(f'{workdir} is not a reward-model run (its config.json has no '
                        "head='scalar'); train one with python -m train.reward.")
  return run_dir.open_run(workdir, step, model_class=ScoreModel)


def params_from_any_run(built: stage_lib.Built) -> tuple[int, Any]:
  """(step, params) for a reward model from `built.init_from`, an LM or a reward-model run.

  From an LM run: its whole parameter tree is restored (every key checked, an
  untied `lm_head` included), `lm_head` is then dropped and `score_head`
  initialised new (seeded by config.seed). From a reward-model run: everything.
  """
  source = built.init_from
  target = built.abstract_state.params
  if is_reward_run(run_dir.load_config(source)):
    return stage_lib.params_from_run(source, target)
  lm = transformer.Transformer(built.model.config)
  source_abstract, _ = state_lib.abstract_state(built.config, lm, built.mesh)
  step, params = stage_lib.params_from_run(source, source_abstract.params)
  params = {name: value for name, value in params.items() if name in target}
  cfg = built.model.config
  head = layers.ScalarHead(cfg)
  shardings = built.state_shardings.params['score_head']

  def init_head(rng):
    dummy_BLD = jnp.zeros((1, 1, cfg.d_model), jnp.dtype(cfg.dtype))
    return nn.meta.unbox(head.init(rng, dummy_BLD)['params'])

  params['score_head'] = jax.jit(init_head, out_shardings=shardings)(
      jax.random.fold_in(jax.random.key(int(built.config.seed)), 1))
  missing = sorted(set(target) - set(params))
  if missing:
    raise cli.UserError(f'init_from={source}: its parameters lack {missing} of the reward model.')
  return step, params


def prepare_data(config: ml_collections.ConfigDict) -> None:
  """Builds the preference dataset in data.workdir (once) with the SFT model's tokenizer."""
  if paths.is_remote(config.data.workdir):
    raise cli.UserError(f'data.workdir={config.data.workdir}: preference data is built '
                        'locally; build it with a local data.workdir and copy it over.')
  preference_data.prepare(config.data.workdir, paths.resolve_str(config.data.tokenizer),
                          source=config.data.source, paths=config.data.paths,
                          seq_len=config.seq_len, validation=config.data.validation,
                          test=config.data.test, kinds=tuple(config.data.kinds.split(',')))


def _loss(config: ml_collections.ConfigDict, model: Any) -> objectives.LossFn:
  return objectives.reward_model(model, centering=float(config.reward_model.centering),
                                 use_margin=bool(config.reward_model.use_margin),
                                 dropout=float(config.model.dropout_rate) > 0.0)


def _eval_loss(config: ml_collections.ConfigDict, model: Any) -> objectives.LossFn:
  """The loss without dropout, and the accuracy per kind of pair (eval/accuracy/<kind>)."""
  return objectives.reward_model(model, centering=float(config.reward_model.centering),
                                 use_margin=bool(config.reward_model.use_margin),
                                 kinds=preference_data.kind_names(config.data.workdir))


STAGE = stage_lib.Stage(name='reward', validate=reward_config.validate,
                        prepare_data=prepare_data, loss=_loss, eval_loss=_eval_loss,
                        model=ScoreModel, init_params=params_from_any_run)


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.LoopResult:
  """Trains the reward model per `config` in `workdir`, resuming from its latest checkpoint."""
  return stage_lib.run(STAGE, config, workdir)


main = stage_lib.entry_point(train)


if __name__ == '__main__':
  stage_lib.run_command_line(main, 'Reward-model config file and preset, e.g. configs/reward.py:tiny.')
