"""Supervised fine-tuning: next-token loss on the assistant turns of conversations.

  python -m train.sft --config=configs/sft.py:tiny --workdir=runs/sft --config.init_from=runs/tiny

The shared stage runner (train/stage.py) with SFT's data: conversations
rendered by the chat template into `tokens` + `loss_mask` (data_pipeline/
sft_data.py, built once into `data.workdir` with the pre-trained model's
tokenizer) and packed like pre-training documents, never cut, attention and
loss never crossing examples. The loss is the next-token objective restricted
to the masked-in targets (the assistant's answer and its `<|end|>`), so
`eval/loss` is the held-out response loss. `init_from` starts from a run's
parameters (its model shape, restored onto this mesh; optimizer fresh);
empty trains from scratch.
"""

from __future__ import annotations


import ml_collections

from configs import cli
from configs import sft as sft_config
from data_pipeline import sft_data
from train import loop
from train import paths
from train import stage as stage_lib


def prepare_data(config: ml_collections.ConfigDict) -> None:
  """Builds the SFT dataset in data.workdir (once) with the pre-trained model's tokenizer."""
  if paths.is_remote(config.data.workdir):
    raise cli.UserError(f'data.workdir={config.data.workdir}: SFT data is built locally; build '
                        'it with a local data.workdir and copy it over.')
  sft_data.prepare(config.data.workdir, paths.resolve_str(config.data.tokenizer),
                   source=config.data.source, paths=config.data.paths,
                   seq_len=config.seq_len, validation=config.data.validation,
                   test=config.data.test)


STAGE = stage_lib.Stage(name='sft', validate=sft_config.validate, prepare_data=prepare_data)


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.LoopResult:
  """Fine-tunes per `config` in `workdir`, resuming from its latest checkpoint."""
  return stage_lib.run(STAGE, config, workdir)


main = stage_lib.entry_point(train)


if __name__ == '__main__':
  stage_lib.run_command_line(main, 'SFT config file and preset, e.g. configs/sft.py:tiny.')
