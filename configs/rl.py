"""RL configs: GRPO with a verifiable reward, PPO against a reward model.

Presets (`configs/rl.py:<preset>[,key=value,...]`):

  grpo_tiny  GRPO on the embedded stdlib instructions: 24 iterations of 6
             prompts x 8 samples (temperature 0.7, up to 96 new tokens), the
             verifiable reward `parses_and_names` (1 if the completion parses
             and defines the requested function, 0.5 if it only parses; never
             executed), k3 KL to the starting model with
             beta 0.04, one on-policy update per iteration.
               python -m train.rl --config=configs/rl.py:grpo_tiny --workdir=runs/grpo \\
                   --config.init_from=runs/sft
               python -m train.evaluate --workdir=runs/grpo --split=test --functional
             Hardware: 2 CPU cores. Wall time and result: README,
             "Reinforcement learning" (measured figures and commands). From
             the SFT of `runs/tiny` it names 2 of 127 held-out functions
             (+1.6 points); from that of the longer `tiny_2k` trunk
             parse_and_name_rate 0.543 -> 0.756 (+21; README, "A longer
             pre-training").
  ppo_tiny   PPO against a reward-model run: a value model (trunk + scalar
             head) initialised from the reward model, per-token rewards = the
             reward model's score at the final token minus beta * KL, GAE
             (gamma 1, lambda 0.95), whitened advantages, clipped policy and
             value losses; 16 iterations of 24 prompts (temperature 0.7), 2
             epochs of 2 minibatches per rollout batch.
               python -m train.rl --config=configs/rl.py:ppo_tiny --workdir=runs/ppo \\
                   --config.init_from=runs/sft --config.reward.model=runs/rm
             Hardware: 2 CPU cores. README, "Reinforcement learning"; from
             `tiny_2k` it raises the RM score while parse_and_name_rate
             falls (reward hacking; README, "A longer pre-training").
  grpo_1b    GRPO on the 1b shape (bf16, full remat, FSDP) for a TPU slice,
             prompts from `data.workdir` (an SFT data workdir's
             prompts_train.jsonl), 64 prompts x 8 samples, 512 new tokens.
             Sized for a v5p-32; not measured here.

Keys beyond the SFT config's (configs/sft.py, whose model/optimizer/mesh keys
mean the same):

  algorithm           'grpo' | 'ppo'.
  num_train_steps     RL iterations (one rollout batch + its updates each).
  rollout.*           prompts_per_iteration, group_size (completions per
                      prompt; GRPO's G), max_new_tokens, max_prompt_len
                      (longer prompts are skipped and counted), temperature,
                      top_k, top_p, split (the prompts_<split>.jsonl read),
                      truncation: 'mask' (a completion cut by max_new_tokens
                      is left out of the loss) or 'penalty' (kept, its reward
                      lowered by truncation_penalty).
  reward.*            function (a registered name, train/rewards.py) or model
                      (a reward-model run directory; wins when set),
                      parse_credit (the code rewards' partial credit).
  rl.*                epochs, minibatches (passes and splits of each rollout
                      batch), clip_eps, clip_eps_high (DAPO's higher upper
                      clip; = clip_eps by default), beta (KL weight; 0 skips
                      the reference model entirely), kl_estimator ('k1' |
                      'k3'; the GRPO loss always uses k3).
  grpo.*              normalize ('std' | 'mean', Dr. GRPO), aggregation
                      ('token' | 'sequence' | 'constant'; train/losses.py).
  ppo.*               gamma, lam, value_clip, vf_coef, entropy_coef,
                      value_init ('reward' | 'policy'), whiten_advantages.
"""

from __future__ import annotations

import ml_collections

from configs import overrides
from configs import sft
from configs import validation as v
from configs.cli import UserError


def _rl(config: ml_collections.ConfigDict, algorithm: str) -> ml_collections.ConfigDict:
  config.algorithm = algorithm
  config.num_train_steps = 60
  config.num_epochs = None
  config.eval_every = 0           # held-out evaluation: python -m train.evaluate --functional
  config.checkpoint_every = 10
  config.log_every = 1
  config.rollout = ml_collections.ConfigDict(dict(
      prompts_per_iteration=8, group_size=8, max_new_tokens=96, max_prompt_len=96,
      temperature=1.0, top_k=0, top_p=1.0, split='train', truncation='penalty',
      truncation_penalty=0.0))
  config.reward = ml_collections.ConfigDict(dict(
      function='parses_and_names', model='', parse_credit=0.5))
  config.rl = ml_collections.ConfigDict(dict(
      epochs=1, minibatches=1, clip_eps=0.2,
      clip_eps_high=ml_collections.FieldReference(None, field_type=float),
      beta=0.04, kl_estimator='k3'))
  config.grpo = ml_collections.ConfigDict(dict(normalize='std', aggregation='token'))
  config.ppo = ml_collections.ConfigDict(dict(
      gamma=1.0, lam=0.95, value_clip=0.2, vf_coef=0.1, entropy_coef=0.0, value_init='reward',
      whiten_advantages=True))
  config.optimizer.warmup_steps = 0
  config.optimizer.schedule = 'constant'
  config.optimizer.weight_decay = 0.0
  return config


def grpo_tiny() -> ml_collections.ConfigDict:
  config = _rl(sft.tiny(), 'grpo')
  config.num_train_steps = 24
  config.checkpoint_every = 4
  # 0.7: at temperature 1 the SFT model's samples parse so rarely (reward mean
  # 0.01-0.05, 88% of groups all-equal) that most groups carry no gradient.
  config.rollout.temperature = 0.7
  config.rollout.prompts_per_iteration = 6
  config.optimizer.learning_rate = 2e-4
  return config


def ppo_tiny() -> ml_collections.ConfigDict:
  config = _rl(sft.tiny(), 'ppo')
  config.num_train_steps = 16
  config.checkpoint_every = 4
  config.reward.function = ''
  config.rollout.temperature = 0.7
  config.rollout.group_size = 1
  config.rollout.prompts_per_iteration = 24
  config.rollout.truncation = 'mask'
  config.rl.epochs = 2
  config.rl.minibatches = 2
  config.rl.kl_estimator = 'k1'
  config.optimizer.learning_rate = 1e-4
  return config


def grpo_1b() -> ml_collections.ConfigDict:
  config = _rl(sft.one_b(), 'grpo')
  # RL reads the prompts_<split>.jsonl of an SFT data workdir built by train.sft
  # (local), not the JSONL sources the SFT preset names.
  config.data.source = 'stdlib'
  config.rollout.update(dict(prompts_per_iteration=64, max_new_tokens=512, max_prompt_len=512))
  config.num_train_steps = 500
  config.checkpoint_every = 50
  config.optimizer.learning_rate = 1e-6
  return config


PRESETS = {'grpo_tiny': grpo_tiny, 'ppo_tiny': ppo_tiny, 'grpo_1b': grpo_1b}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return overrides.build(arg, PRESETS, default_preset='grpo_tiny')


RULES: tuple[v.Rule, ...] = (
    ('algorithm', lambda a: a in ('grpo', 'ppo'), "'grpo' or 'ppo'"),
    ('num_train_steps', v.is_int(1), 'an int >= 1 (RL iterations)'),
    ('rollout.prompts_per_iteration', v.is_int(1), 'an int >= 1'),
    ('rollout.group_size', v.is_int(1), 'an int >= 1'),
    ('rollout.max_new_tokens', v.is_int(1), 'an int >= 1'),
    ('rollout.max_prompt_len', v.is_int(1), 'an int >= 1'),
    ('rollout.temperature', v.is_number(0.0, low_open=True), 'a number > 0'),
    ('rollout.top_k', v.is_int(0), 'an int >= 0'),
    ('rollout.top_p', v.is_number(0.0, 1.0, low_open=True), 'a number in (0, 1]'),
    ('rollout.split', lambda s: s in ('train', 'validation', 'test'),
     "'train', 'validation' or 'test'"),
    ('rollout.truncation', lambda s: s in ('mask', 'penalty'), "'mask' or 'penalty'"),
    ('rollout.truncation_penalty', v.is_number(0.0), 'a number >= 0'),
    ('reward.parse_credit', v.is_number(0.0, 1.0), 'a number in [0, 1]'),
    ('rl.epochs', v.is_int(1), 'an int >= 1'),
    ('rl.minibatches', v.is_int(1), 'an int >= 1'),
    ('rl.clip_eps', v.is_number(0.0, 1.0, low_open=True), 'a number in (0, 1]'),
    ('rl.clip_eps_high', v.optional(v.is_number(0.0, low_open=True)), 'None or a number > 0'),
    ('rl.beta', v.is_number(0.0), 'a number >= 0 (0: no reference model)'),
    ('rl.kl_estimator', lambda s: s in ('k1', 'k3'), "'k1' or 'k3'"),
    ('grpo.normalize', lambda s: s in ('std', 'mean'), "'std' or 'mean'"),
    ('grpo.aggregation', lambda s: s in ('token', 'sequence', 'constant'),
     "'token', 'sequence' or 'constant'"),
    ('ppo.gamma', v.is_number(0.0, 1.0), 'a number in [0, 1]'),
    ('ppo.lam', v.is_number(0.0, 1.0), 'a number in [0, 1]'),
    ('ppo.value_clip', v.is_number(0.0, low_open=True), 'a number > 0'),
    ('ppo.vf_coef', v.is_number(0.0), 'a number >= 0'),
    ('ppo.entropy_coef', v.is_number(0.0), 'a number >= 0'),
    ('ppo.value_init', lambda s: s in ('reward', 'policy'), "'reward' or 'policy'"),
)


def validate(config: ml_collections.ConfigDict) -> None:
  if 'algorithm' not in config or 'rollout' not in config:
    raise UserError(f'This is not an RL config (preset {config.get("preset", "?")!r}): '
                    '`python -m train.rl` takes --config=configs/rl.py:PRESET.')
  v.check(config, RULES)
  if not config.reward.model and not config.reward.function:
    raise UserError('Neither reward.model nor reward.function is set: give a reward-model run '
                    '(--config.reward.model=runs/rm) or a reward function '
                    '(--config.reward.function=parses_and_names).')
  if config.algorithm == 'ppo' and config.ppo.value_init == 'reward' and not config.reward.model:
    raise UserError('config key ppo.value_init=reward needs reward.model (a reward-model run); '
                    'set --config.ppo.value_init=policy to start the value model from the policy.')
  rows = config.rollout.prompts_per_iteration * config.rollout.group_size
  if rows % config.rl.minibatches:
    raise UserError(f'config key rl.minibatches={config.rl.minibatches} does not divide the '
                    f'{rows} rollouts of an iteration (prompts_per_iteration x group_size).')
  if config.algorithm == 'grpo' and config.rollout.group_size < 2:
    raise UserError('config key rollout.group_size must be >= 2 for GRPO (the advantage is '
                    'relative to the other completions of the same prompt).')
  need = config.rollout.max_prompt_len + config.rollout.max_new_tokens
  if need > config.model.max_len:
    raise UserError(f'rollout.max_prompt_len + rollout.max_new_tokens = {need} exceeds '
                    f'model.max_len={config.model.max_len}.')
  sft.validate(config)
