"""Supervised fine-tuning configs: instruction following, loss on assistant turns only.

Presets (`configs/sft.py:<preset>[,key=value,...]`):

  tiny  fine-tunes the `tiny` pre-training run on the embedded stdlib
        instructions (for each documented function: "write `name(args)` that
        <docstring>" -> its source), 3 epochs, seq 256, batch 16, packed.
          python -m train.sft --config=configs/sft.py:tiny --workdir=runs/sft \\
              --config.init_from=runs/tiny
        Hardware: 2 CPU cores. The model shape comes from `init_from` (empty:
        from scratch, the `tiny` shape). Wall time: 456 steps, ~8 min on quiet
        cores (`make sft` 8 min 08 s, 2026-12-05), about twice that shared.
        Learning rate 2e-3. Expect (measured, seed 0, 2026-12-05): held-out
        (test) response loss 3.588 from runs/tiny (pre-trained at 1e-3) and
        3.668 from scratch; validation 3.98 / 4.11; parse_rate 0.65 / 0.76,
        parse_and_name_rate 0.00 / 0.08 (README, "Fine-tuning").
  1b, 7b  the pre-training presets' shapes on TPU (bf16, full remat, FSDP),
        fine-tuning a run of the same shape (`--config.init_from=gs://.../1b`)
        on JSONL instructions: `--config.data.source=files
        --config.data.paths=gs://bucket/sft/*.jsonl`. Expect the response loss
        to fall within the first few hundred steps; sized for a v5p-32.

Data (`data.*`): `source` 'stdlib' (the embedded default) or 'files' (JSONL in
the formats of data_pipeline/instructions.py: messages, prompt/completion,
instruction/input/output; bad records are skipped and counted in
`<data.workdir>/sft_report.json`). The examples are rendered with the chat
template (data_pipeline/chat.py) using `data.tokenizer`, the pre-trained
model's tokenizer, and built once into `data.workdir`. `validation`/`test`
are the held-out fractions by module id, by default the pre-training data's
(configs/data.py:stdlib, 0.02 / 0.04), so a validation or test function's
module is in pre-training's validation or test split too; fractions that
hold out more than the pre-training data did are refused
(`stdlib_instructions.check_held_out`).

LoRA (`lora.*`, configs/lora.py): `--config.lora.rank=8` trains low-rank
adapters on the attention and MLP projections of the `init_from` run, its
params frozen (README, "LoRA").

`init_shrink`, `init_perturb` (1 and 0: off): shrink and perturb the
`init_from` weights before fine-tuning, every matrix becoming
`init_shrink * W + init_perturb * std(W) * noise` (norm scales untouched).
From a `tiny` pre-training at 0.5 and 0.1 the held-out response loss fell
4.01 -> 3.86 (README, "Fine-tuning"). Full fine-tuning only.

Every other key is the pre-training config's (configs/pretrain.py), with the
same meaning and checks; `init_from` names a run directory whose parameters
start the fine-tuning (optimizer state fresh).
"""

from __future__ import annotations

import ml_collections

from configs import data as data_config
from configs import lora
from configs import overrides
from configs import pretrain
from configs import validation as v
from configs.cli import UserError


def _sft(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config = base
  config.init_from = ''
  config.chat = True   # generate and evaluate render prompts with the chat template
  # Shrink and perturb init_from's weights (Ash & Adams 2020; see the docstring).
  config.init_shrink = 1.0
  config.init_perturb = 0.0
  config.data = ml_collections.ConfigDict(dict(
      workdir='runs/sft_data', preset='sft', source='stdlib', paths='',
      tokenizer='runs/data/tokenizer.model', validation=data_config.STDLIB_VALIDATION,
      test=data_config.STDLIB_TEST))
  config.num_train_steps = 0
  config.num_epochs = 3
  config.patience = 0
  return lora.add_lora(config)


def tiny() -> ml_collections.ConfigDict:
  config = _sft(pretrain.tiny())
  # 2e-3: from runs/tiny, test response loss 3.59 against 3.70 at 1e-3 and 3.85
  # at 5e-4 (README, "Fine-tuning").
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 20
  config.eval_every = 100
  config.eval_steps = -1           # the whole validation split
  config.checkpoint_every = 100
  config.log_every = 10
  return config


def tpu(config: ml_collections.ConfigDict, learning_rate: float,
        warmup_steps: int = 100) -> ml_collections.ConfigDict:
  """The large post-training presets (SFT, reward, DPO): the user's JSONL files, a small
  constant-ish learning rate, batch 64."""
  config.data.source = 'files'
  config.optimizer.learning_rate = learning_rate
  config.optimizer.warmup_steps = warmup_steps
  config.optimizer.weight_decay = 0.0
  config.batch_size = 64
  config.eval_every = 200
  config.checkpoint_every = 500
  return config


def one_b() -> ml_collections.ConfigDict:
  return tpu(_sft(pretrain.one_b()), 2e-5)


def seven_b() -> ml_collections.ConfigDict:
  return tpu(_sft(pretrain.seven_b()), 1e-5)


PRESETS = {'tiny': tiny, '1b': one_b, '7b': seven_b}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return overrides.build(arg, PRESETS, default_preset='tiny')


# The data keys every post-training stage shares (the reward and DPO configs add theirs).
DATA_RULES: tuple[v.Rule, ...] = (
    ('data.source', lambda s: s in ('stdlib', 'files'), "'stdlib' or 'files'"),
    ('data.validation', v.is_number(0.0, 0.5), 'a number in [0, 0.5]'),
    ('data.test', v.is_number(0.0, 0.5), 'a number in [0, 0.5]'),
)
RULES: tuple[v.Rule, ...] = DATA_RULES + (
    ('init_shrink', v.is_number(0.0, 1.0), 'a number in [0, 1]'),
    ('init_perturb', v.is_number(0.0, 1.0), 'a number in [0, 1]'),
)


def validate(config: ml_collections.ConfigDict) -> None:
  if 'init_from' not in config or 'source' not in config.get('data', {}):
    raise UserError(f'This is not an SFT config (preset {config.get("preset", "?")!r}): '
                    '`python -m train.sft` takes --config=configs/sft.py:PRESET.')
  v.check(config, RULES)
  if config.data.source == 'files' and not config.data.paths:
    raise UserError('config key data.paths is empty but data.source=files: give the JSONL '
                    'files, e.g. --config.data.paths=data/sft/*.jsonl.')
  reshapes_init = config.init_shrink != 1.0 or config.init_perturb
  if reshapes_init and config.lora.rank:
    raise UserError('config keys init_shrink/init_perturb change the init_from weights, which '
                    'LoRA (lora.rank > 0) keeps frozen: use them with full fine-tuning.')
  if reshapes_init and not config.init_from:
    raise UserError('config keys init_shrink/init_perturb change the init_from weights, but '
                    'init_from is empty.')
  lora.validate(config)
  pretrain.validate(config)
