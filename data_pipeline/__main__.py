"""Prepares a dataset.

  python -m data_pipeline --config=configs/data.py:stdlib --workdir=runs/data

A mistake in the input (a config value, a path, a file's contents) prints one
`error: ...` line and exits with status 2 (`--debug` shows the traceback).
A finished workdir is reused only if its config and inputs are unchanged;
`--rebuild` replaces it.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from configs import cli
from data_pipeline import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/data.py:stdlib', 'Data config file and preset.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/data', 'Where the dataset is written.')
_REBUILD = flags.DEFINE_bool(
    'rebuild', False, 'Rebuild a finished workdir whose config or inputs changed, '
    'instead of stopping with an error that names the changes.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'Unexpected arguments: {" ".join(argv[1:])} (flags take --name=value).')
  pipeline.run(_CONFIG.value, _WORKDIR.value, rebuild=_REBUILD.value)


if __name__ == '__main__':
  cli.run(main)
