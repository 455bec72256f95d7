"""`python -m train --config=configs/pretrain.py:tiny --workdir=runs/tiny [--config.a.b=v]`.

A second invocation on the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from configs import cli

from train import console
from train import distributed
from train import loop
from train import pretrain

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Pre-training config file and preset, e.g. configs/pretrain.py:tiny.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics, config).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  console.quiet_libraries()  # Orbax logs every file it writes at INFO; keep progress visible
  distributed.initialize_from_flags()
  try:
    result = pretrain.train(_CONFIG.value, _WORKDIR.value)
  except loop.NonFiniteLossError:
    # The loop already printed the step and value; no traceback needed.
    sys.exit(1)
  print(f'Training finished: {pretrain.summary(result)}', flush=True)


if __name__ == '__main__':
  cli.run(main)
