"""DPO configs: the SFT policy optimised on preference pairs against itself, frozen.

Presets (`configs/dpo.py:<preset>[,key=value,...]`):

  tiny  DPO (sigmoid, beta 0.1) of an SFT run on the embedded stdlib
        preference pairs (the real function chosen over a corruption), 150
        steps of 16 packed rows (~4k of the ~16k train pairs), seq 256,
        learning rate 1e-4.
          python -m train.dpo --config=configs/dpo.py:tiny --workdir=runs/dpo \\
              --config.init_from=runs/sft
        Hardware: 2 CPU cores, 6.5 min (quiet machine, 2026-12-05, ~2.35
        s/step; 10.5 min before the CPU step work of README, "Performance"). The
        reference is init_from's parameters, frozen (a second copy: 5M
        parameters here). Measured (seed 0, from runs/sft, `make sft`'s
        run): held-out implicit-reward accuracy 0.876 on the 627 test pairs
        (target 0.85), test response loss 3.73, parse_rate 0.31,
        parse_and_name_rate 0.008 (SFT: 3.59, 0.64, 0; from the older SFT
        from scratch at 1e-3: 0.871; from the SFT of the longer `tiny_2k`
        trunk 0.978, README, "A longer pre-training"). README,
        "Preferences": held-out implicit-reward accuracy
        (eval/rewards_accuracy, or `python -m train.score --workdir=runs/dpo
        --pairs=runs/pref_data/pairs_test.jsonl`) and parse_and_name_rate
        (`python -m train.evaluate --workdir=runs/dpo --split=test --functional
        --data_dir=runs/sft_data`).
  1b, 7b  the pre-training presets' shapes on TPU on the user's JSONL pairs
        (`--config.data.source=files --config.data.paths=gs://bucket/prefs/*.jsonl`),
        learning rate 5e-7 (the usual DPO rate at this size); with
        `lora.rank > 0` the reference is the base without adapters, no copy.

`dpo.loss_type`: 'sigmoid' (DPO; `dpo.label_smoothing` > 0 is cDPO, the
assumed fraction of flipped labels) or 'ipo' (squared loss on per-token
averaged log-ratios, target 1/(2 beta)). `dpo.beta` scales the implicit
reward beta * log(pi / pi_ref). `dpo.precompute_reference=True` runs the
reference once over every split before training and stores its per-token
log-probs beside the pairs (`<workdir>/reference_data`), so no reference
weights are held or run during training (single process; the reference is
`init_from`'s params, with LoRA the base, as without it). Data keys are configs/reward.py's; every
other key is the pre-training config's. The best checkpoint is the one with
the highest held-out implicit-reward accuracy.
"""

from __future__ import annotations

import ml_collections

from configs import overrides
from configs import pretrain
from configs import reward
from configs import validation as v
from configs.cli import UserError


def _dpo(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = reward.preference_base(base)
  config.dpo = ml_collections.ConfigDict(dict(beta=0.1, label_smoothing=0.0,
                                              loss_type='sigmoid', precompute_reference=False))
  config.best_metric = 'rewards_accuracy'
  config.best_mode = 'max'
  return config


def tiny() -> ml_collections.ConfigDict:
  config = _dpo(pretrain.tiny())
  config.num_train_steps = 150
  config.optimizer.learning_rate = 1e-4
  config.optimizer.warmup_steps = 10
  config.optimizer.weight_decay = 0.0
  config.eval_every = 50
  config.checkpoint_every = 50
  config.log_every = 10
  return config


def one_b() -> ml_collections.ConfigDict:
  return reward.tpu(_dpo(pretrain.one_b()), 5e-7)


def seven_b() -> ml_collections.ConfigDict:
  return reward.tpu(_dpo(pretrain.seven_b()), 5e-7)


PRESETS = {'tiny': tiny, '1b': one_b, '7b': seven_b}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return overrides.build(arg, PRESETS, default_preset='tiny')


RULES: tuple[v.Rule, ...] = reward.DATA_RULES + (
    ('dpo.beta', v.is_number(0.0, low_open=True), 'a number > 0'),
    ('dpo.label_smoothing', v.is_number(0.0, 0.5, high_open=True), 'a number in [0, 0.5)'),
    ('dpo.loss_type', lambda s: s in ('sigmoid', 'ipo'), "'sigmoid' or 'ipo'"),
    ('dpo.precompute_reference', lambda b: isinstance(b, bool), 'True or False'),
)


def validate(config: ml_collections.ConfigDict) -> None:
  reward.validate_preference(config, RULES, 'dpo', 'dpo')
  if not config.init_from:
    raise UserError('config key init_from is empty: DPO starts from a policy (an SFT run, '
                    'e.g. --config.init_from=runs/sft), which is also its reference.')
  if config.dpo.loss_type == 'ipo' and config.dpo.label_smoothing:
    raise UserError('config key dpo.label_smoothing applies to the sigmoid loss only; set it '
                    'to 0 with dpo.loss_type=ipo.')
