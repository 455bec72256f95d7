"""Prepares a dataset: `python -m data_pipeline --config=configs/data.py:stdlib --workdir=runs/data`."""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

from data_pipeline import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/data.py:stdlib', 'Data config file and preset.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/data', 'Where the dataset is written.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
