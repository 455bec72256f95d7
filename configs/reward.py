"""Reward-model configs: a scalar head on the SFT model, Bradley-Terry on preference pairs.

Presets (`configs/reward.py:<preset>[,key=value,...]`):

  tiny  the SFT model's trunk plus a new score head, trained on the embedded
        stdlib preference pairs (the real function chosen over one of five
        corruptions of it), 150 steps of 16 packed rows (~4k of the ~16k train
        pairs; ~1.7 pairs per 256-token row), seq 256.
          python -m train.reward --config=configs/reward.py:tiny --workdir=runs/rm \\
              --config.init_from=runs/sft
        Hardware: 2 CPU cores. The model shape comes from `init_from` (a run
        with an LM head: its trunk is restored and an untied `lm_head`
        dropped; a reward-model run: its head too). Wall time: see README,
        "Preferences" (each step is two forward/backward passes, chosen and
        rejected); 3.4 min on quiet cores (2026-12-05, the data build
        included; 66 min measured on cores shared with other jobs). Expect
        (measured, seed 0, from runs/sft, `make sft`'s run): held-out test
        accuracy 0.817 (target 0.9); per kind syntax 0.99, truncated 1.00,
        shuffled 1.00, wrong_body 0.63, renamed 0.45 (from the older SFT
        from scratch at 1e-3: 0.84-0.86, wrong_body 0.69-0.74, renamed
        0.50-0.54), from
        `python -m train.score --workdir=runs/rm
        --pairs=runs/pref_data/pairs_test.jsonl` (README, "Preferences"),
        or eval/accuracy/<kind> in metrics.jsonl (validation pairs). From
        the SFT of the longer `tiny_2k` trunk: 0.823, and 0.871 with
        `num_train_steps=450`; renamed stays ~0.5 (README, "A longer
        pre-training").
  tiny_renamed  `tiny` on the `renamed` pairs only (a ~3.2k-pair set of its
        own in runs/pref_data_renamed): the first of two phases. Trained on
        all five kinds at once, the reward model never learns to compare the
        answer's function name with the request (`renamed` ~0.5 at 150 or
        450 steps, at 3e-4 or 1e-3), even from a trunk that reads the
        request: the other kinds are fit first, from the answer alone, and
        the `renamed` fifth of the pairs does not then move the model to the
        comparison. On the `renamed` pairs alone it learns it in 150 steps,
        and a second phase on all kinds keeps it:
          python -m train.reward --config=configs/reward.py:tiny_renamed \
              --workdir=runs/rm_renamed --config.init_from=runs/sft
          python -m train.reward --config=configs/reward.py:tiny --workdir=runs/rm \
              --config.init_from=runs/rm_renamed
        (`make posttrain` does both). Measured from the SFT of the longer
        `tiny_2k` trunk (2026-12-05, cores shared, 6.2 min per phase): test
        accuracy 0.936, renamed 0.98, wrong_body 0.69, the other kinds 1.00;
        one phase: 0.823, renamed 0.49 (README, "A longer pre-training").
        From the demo's runs/sft: 0.864, renamed 0.68 (one phase 0.817).
  1b, 7b  the pre-training presets' shapes on TPU (bf16, full remat, FSDP)
        on the user's JSONL pairs (`--config.data.source=files
        --config.data.paths=gs://bucket/prefs/*.jsonl`), one epoch, learning
        rate 1e-5 / 5e-6; sized for a v5p-32.

Data (`data.*`): `source` 'stdlib' (the embedded default; `kinds` is the
comma-separated subset of corruptions to use, e.g.
`--config.data.kinds=syntax,renamed`) or 'files' (JSONL pairs or rankings,
data_pipeline/preferences.py; bad records are skipped and counted in
`<data.workdir>/preference_report.json`). Pairs are rendered with the chat
template using `data.tokenizer`, the SFT model's tokenizer, and built once
into `data.workdir`; `validation`/`test` are the held-out fractions by module
id, the SFT data's.

`reward_model.centering` adds `centering * mean((r_c + r_r)^2)` (keeps the
scores near 0; 0 = off); `reward_model.use_margin` subtracts the data's
per-pair margins inside the Bradley-Terry sigmoid. The best checkpoint is
the one with the highest held-out pairwise accuracy. Every other key is the
pre-training config's (configs/pretrain.py).
"""

from __future__ import annotations

import ml_collections

from configs import data as data_config
from configs import overrides
from configs import pretrain
from configs import sft
from configs import validation as v
from configs.cli import UserError

KINDS = 'syntax,truncated,renamed,wrong_body,shuffled'


def preference_base(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What reward modelling and DPO share: preference data, init_from, one epoch."""
  config = base
  config.init_from = ''
  config.chat = True
  config.data = ml_collections.ConfigDict(dict(
      workdir='runs/pref_data', preset='preferences', source='stdlib', paths='',
      tokenizer='runs/data/tokenizer.model', kinds=KINDS,
      validation=data_config.STDLIB_VALIDATION, test=data_config.STDLIB_TEST))
  config.num_train_steps = 0
  config.num_epochs = 1
  config.patience = 0
  config.eval_steps = -1
  return config


def _reward(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = preference_base(base)
  config.head = 'scalar'   # what train.score and the RL stage read the run with
  config.reward_model = ml_collections.ConfigDict(dict(centering=0.0, use_margin=True))
  config.best_metric = 'accuracy'
  config.best_mode = 'max'
  return config


def tiny() -> ml_collections.ConfigDict:
  config = _reward(pretrain.tiny())
  config.num_train_steps = 150
  config.optimizer.learning_rate = 3e-4
  config.optimizer.warmup_steps = 20
  config.optimizer.weight_decay = 0.0
  config.eval_every = 50
  config.checkpoint_every = 50
  config.log_every = 10
  return config


def tpu(config: ml_collections.ConfigDict, learning_rate: float) -> ml_collections.ConfigDict:
  """The large presets (reward and DPO): the user's JSONL pairs, a small learning rate."""
  return sft.tpu(config, learning_rate, warmup_steps=50)


def one_b() -> ml_collections.ConfigDict:
  return tpu(_reward(pretrain.one_b()), 1e-5)


def seven_b() -> ml_collections.ConfigDict:
  return tpu(_reward(pretrain.seven_b()), 5e-6)


def tiny_renamed() -> ml_collections.ConfigDict:
  """`tiny` on the `renamed` pairs only: the first phase of the reward model
  `make posttrain` trains (module docstring)."""
  config = tiny()
  config.data.kinds = 'renamed'
  config.data.workdir = 'runs/pref_data_renamed'
  return config


PRESETS = {'tiny': tiny, 'tiny_renamed': tiny_renamed, '1b': one_b, '7b': seven_b}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return overrides.build(arg, PRESETS, default_preset='tiny')


DATA_RULES: tuple[v.Rule, ...] = sft.DATA_RULES + (
    ('data.kinds', lambda s: isinstance(s, str) and bool(s) and all(
        k in KINDS.split(',') for k in s.split(',')), f'a comma-separated subset of {KINDS}'),
)
RULES: tuple[v.Rule, ...] = DATA_RULES + (
    ('reward_model.centering', v.is_number(0.0), 'a number >= 0'),
    ('reward_model.use_margin', lambda x: isinstance(x, bool), 'true or false'),
)


def validate_preference(config: ml_collections.ConfigDict, rules, section: str,
                        command: str) -> None:
  if section not in config or 'kinds' not in config.get('data', {}):
    raise UserError(f'This is not a {command} config (preset {config.get("preset", "?")!r}): '
                    f'`python -m train.{command}` takes --config=configs/{command}.py:PRESET.')
  v.check(config, rules)
  if config.data.source == 'files' and not config.data.paths:
    raise UserError('config key data.paths is empty but data.source=files: give the JSONL '
                    'files, e.g. --config.data.paths=data/prefs/*.jsonl.')
  pretrain.validate(config)


def validate(config: ml_collections.ConfigDict) -> None:
  validate_preference(config, RULES, 'reward_model', 'reward')
