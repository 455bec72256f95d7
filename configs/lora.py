"""The `lora` config section every fine-tuning stage shares (train/lora.py).

  lora.rank     0 = off (full fine-tuning); > 0 trains rank-`rank` adapters
                A @ B on the `targets`, the base params frozen. Needs init_from.
  lora.alpha    the adapters' scale is alpha / rank.
  lora.dropout  dropout of the adapters' input features, in [0, 1).
  lora.targets  a regular expression searched in each parameter's '/'-joined
                path ('layers/attn/wq', 'layers_3/mlp/wo', 'embed/embedding');
                default: the attention and MLP projections.

A stage config calls `add_lora(config)` and its `validate` calls
`validate(config)`:

  python -m train.sft --config=configs/sft.py:tiny --workdir=runs/sft_lora \\
      --config.init_from=runs/tiny --config.lora.rank=8
"""

from __future__ import annotations

import re

import ml_collections

from configs import validation as v
from configs.cli import UserError

DEFAULT_TARGETS = r'(attn/(wq|wk|wv|wo)|mlp/(wi_gate|wi_up|wo))$'


def add_lora(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the `lora` section, off (rank 0)."""
  config.lora = ml_collections.ConfigDict(dict(
      rank=0, alpha=16.0, dropout=0.0, targets=DEFAULT_TARGETS))
  return config


def _is_regex(value) -> bool:
  if not isinstance(value, str) or not value:
    return False
  try:
    re.compile(value)
  except re.error:
    return False
  return True


RULES: tuple[v.Rule, ...] = (
    ('lora.rank', v.is_int(0), 'an int >= 0 (0 = off)'),
    ('lora.alpha', v.is_number(0.0, low_open=True), 'a number > 0'),
    ('lora.dropout', v.is_number(0.0, 1.0, high_open=True), 'a number in [0, 1)'),
    ('lora.targets', _is_regex, 'a regular expression over parameter paths'),
)


def validate(config: ml_collections.ConfigDict) -> None:
  """The section's ranges; LoRA on needs `init_from` (the base it adapts)."""
  if 'lora' not in config:
    return
  v.check(config, RULES)
  if config.lora.rank and not config.get('init_from'):
    raise UserError(f'config key lora.rank={config.lora.rank} needs init_from: LoRA adapts '
                    'the params of another run (e.g. --config.init_from=runs/tiny).')
