"""DPO: the policy learns from preference pairs directly, against a frozen reference.

  python -m train.dpo --config=configs/dpo.py:tiny --workdir=runs/dpo \\
      --config.init_from=runs/sft_scratch

The shared stage runner (train/stage.py) with the preference data of the
reward model (data_pipeline/preference_data.py). The policy starts from
`init_from` (an SFT run); the reference is the same weights, restored once
more and passed to every step as the frozen tree {'reference': params}
(never donated, never trained). With LoRA (`lora.rank > 0`) no copy is
loaded: the LoRA runner's frozen['base'] (the weights without adapters) is
the reference (`objectives.reference_params`).

Each pair's chosen and rejected rows are two forward passes of the policy
and two of the reference; log-probs are summed over each response's tokens
(its answer and `<|end|>`, never the prompt) and the loss is
train/losses.py `dpo`: sigmoid DPO with beta (cDPO with label smoothing), or
IPO. Metrics (train/ and eval/), as TRL names them: rewards_chosen,
rewards_rejected, rewards_margin, rewards_accuracy (the implicit reward
beta * log(pi / pi_ref) of chosen above rejected's), logps_chosen,
logps_rejected. The best checkpoint has the highest held-out
rewards_accuracy. The run is an ordinary LM run: generate and evaluate
(`--functional`) read it as they read an SFT run.
"""

from __future__ import annotations

from typing import Any

from absl import flags
import ml_collections
from ml_collections import config_flags

from configs import cli
from configs import dpo as dpo_config
from train import loop
from train import objectives
from train import reward
from train import stage as stage_lib


def reference(built: stage_lib.Built) -> tuple[dict[str, Any], dict[str, Any]]:
  """The frozen trees: {'reference': init_from's params}, or {} under LoRA (the base serves)."""
  if built.lora is not None:
    return {}, {}
  _, params = stage_lib.params_from_run(built.init_from, built.abstract_params)
  return {'reference': params}, {'reference': built.param_shardings}


def _loss(config: ml_collections.ConfigDict, model: Any, dropout: bool) -> objectives.LossFn:
  return objectives.dpo(model, beta=float(config.dpo.beta),
                        label_smoothing=float(config.dpo.label_smoothing),
                        loss_type=config.dpo.loss_type, dropout=dropout)


STAGE = stage_lib.Stage(
    name='dpo', validate=dpo_config.validate, prepare_data=reward.prepare_data,
    loss=lambda config, model: _loss(config, model, float(config.model.dropout_rate) > 0.0),
    eval_loss=lambda config, model: _loss(config, model, False), frozen=reference)


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.LoopResult:
  """Trains the policy with DPO per `config` in `workdir`, resuming from its latest checkpoint."""
  return stage_lib.run(STAGE, config, workdir)


main = stage_lib.entry_point(train)


if __name__ == '__main__':
  config_flags.DEFINE_config_file(
      'config', None, 'DPO config file and preset, e.g. configs/dpo.py:tiny.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, config).')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)
