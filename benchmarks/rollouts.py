"""Rollout throughput and the share of an RL iteration spent generating.

  python -m benchmarks.rollouts --config=configs/rl.py:grpo_tiny \\
      --config.init_from=runs/sft_scratch --iterations=4

Runs `--iterations` real RL iterations (train/rl.py: sample, score, reference
log-probs, advantages, the update) in a temporary workdir and prints one JSON
object: the medians, over the iterations after the first (which compiles),
of generated tokens per second (the tokens of all completions, stop tokens
included, over the time of the sampling call), the seconds of an iteration
and of its generation, and `generation_share` = generation / iteration. The
sampling is `model/decode.py`'s KV-cache decoder with the policy's params in
place; stopping early at `<|end|>` counts only the tokens really generated.
"""

from __future__ import annotations

import json
import statistics
import tempfile

from absl import flags
from ml_collections import config_flags

from configs import cli
from train import console
from train import metrics as metrics_lib
from train import rl

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'Unexpected arguments: {argv[1:]}')
  console.quiet_libraries()
  config = FLAGS.config
  if FLAGS.iterations < 2:
    raise cli.UserError('--iterations must be >= 2 (the first one compiles and is not counted).')
  with config.unlocked():
    config.num_train_steps = FLAGS.iterations
    config.checkpoint_every = 0
  with tempfile.TemporaryDirectory() as workdir:
    rl.train(config, workdir)
    records = [r for r in metrics_lib.read_metrics(workdir) if 'perf/generation_seconds' in r]
  timed = records[1:]

  def median(key):
    return statistics.median(r[key] for r in timed)

  print(json.dumps({
      'algorithm': config.algorithm,
      'rows_per_iteration': config.rollout.prompts_per_iteration * config.rollout.group_size,
      'max_new_tokens': config.rollout.max_new_tokens,
      'iterations_timed': len(timed),
      'generated_tokens_per_sec': median('perf/generated_tokens_per_sec'),
      'generation_seconds': median('perf/generation_seconds'),
      'iteration_seconds': median('perf/iteration_seconds'),
      'generation_share': median('perf/generation_share'),
      'mean_response_length': median('rl/response_length'),
  }, indent=2))


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'RL config, e.g. configs/rl.py:grpo_tiny.',
                                  lock_config=True)
  flags.DEFINE_integer('iterations', 4, 'RL iterations to run (the first is not timed).')
  flags.mark_flags_as_required(['config'])
  cli.run(main)
