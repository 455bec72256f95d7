"""Can a model learn to copy from its context? Its loss on repeats over Adam steps.

  python -m benchmarks.copy_learning --config=configs/pretrain.py:tiny --steps=1000
  python -m benchmarks.copy_learning --config=configs/pretrain.py:tiny \\
      --config.data.copy_min_len=32 --config.data.copy_max_len=32 --steps=300

Trains `--config`'s model from its init on nothing but copy-task rows
(data_pipeline/copy_task.py: packed [BOS] x x [EOS] documents, x of
`data.copy_min_len..copy_max_len` ids, the loss on the repeat after its first
token), with Adam at a constant `--learning_rate` after `--warmup` linear
steps, and prints a JSON line every `--eval_every` steps: the mean loss on the
repeats of held-out rows, whose ids are drawn from the whole vocabulary. ln V
means no copying; near 0, copying. `--pool=K` trains on K ids only (the
held-out rows still use all of them).

The task is the one `--config.data.copy_fraction` mixes into pre-training, not
a model of it. With min_len == max_len every repeat starts the same distance
after its original, so a head that looks that far back solves it without
matching any content; with lengths that vary, the earlier occurrence must be
found by its content (an induction head), which is what copying a requested
name from a prompt needs. README, "Preferences", reports both on `tiny`: at
the default 3e-3 varying lengths stall near ln V; at `--learning_rate=1e-3`
they fall (6.80 after 800 steps on `tiny`, 0.24 after 2,000 on a 2-layer
model of its width at seq 128 and lengths 8-32).

No tokenizer: the model's random init does not know which ids are pieces, so
ids 1 and 2 stand for BOS and EOS and x is drawn from ids 3..V-1. One device,
float32 as configured.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Iterator

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax

from configs import cli
from data_pipeline import copy_task
from model import config as model_config_lib
from model import transformer
from train import console
from train import objectives

FLAGS = flags.FLAGS
BOS, EOS, FIRST_ID = 1, 2, 3


def _rows(rng: np.random.Generator, task: copy_task.CopyTask, batch: int, seq_len: int
          ) -> dict[str, jax.Array]:
  rows = [copy_task.row(rng, seq_len, task, BOS, EOS) for _ in range(batch)]
  return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def learning_curve(config: ml_collections.ConfigDict, *, steps: int, learning_rate: float,
                   warmup: int, pool: int, eval_every: int, eval_rows: int = 32,
                   seed: int = 0) -> Iterator[dict[str, Any]]:
  """Yields {'step', 'repeat_loss', 'seconds'} at step 0 and every `eval_every` steps."""
  cfg = model_config_lib.ModelConfig.from_config(config.model)
  model = transformer.Transformer(cfg)
  seq_len, batch = int(config.seq_len), int(config.batch_size)
  every_id = np.arange(FIRST_ID, cfg.vocab_size, dtype=np.int32)
  rng = np.random.default_rng(seed)
  ids = rng.permutation(every_id)[:pool] if pool else every_id
  lengths = dict(fraction=1.0, min_len=int(config.data.copy_min_len),
                 max_len=int(config.data.copy_max_len))
  train_task = copy_task.CopyTask(ids=ids, **lengths)
  held_out = _rows(np.random.default_rng(seed + 1), copy_task.CopyTask(ids=every_id, **lengths),
                   eval_rows, seq_len)
  loss_fn = objectives.next_token(model)
  tx = optax.adam(optax.warmup_constant_schedule(0.0, learning_rate, max(warmup, 1)))
  params = jax.jit(model.init)(jax.random.key(seed),
                               jnp.zeros((1, seq_len), jnp.int32))['params']
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    def mean_loss(p):
      total, aux = loss_fn(p, batch, None, None)
      return total / jnp.maximum(aux['count'], 1.0)
    grads = jax.grad(mean_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def evaluate(params):
    total, aux = loss_fn(params, held_out, None, None)
    return total / aux['count']

  start = time.perf_counter()
  for step in range(steps + 1):
    if step % eval_every == 0 or step == steps:
      yield {'step': step, 'repeat_loss': float(evaluate(params)),
             'seconds': round(time.perf_counter() - start, 1)}
    if step < steps:
      params, opt_state = train_step(params, opt_state, _rows(rng, train_task, batch, seq_len))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'Unexpected arguments: {argv[1:]}')
  console.quiet_libraries()
  config = FLAGS.config
  if FLAGS.steps < 1 or FLAGS.eval_every < 1:
    raise cli.UserError('--steps and --eval_every must be >= 1.')
  vocab = int(config.model.vocab_size)
  print(json.dumps({'vocab_size': vocab, 'uniform_loss': math.log(vocab),
                    'min_len': int(config.data.copy_min_len),
                    'max_len': int(config.data.copy_max_len), 'pool': FLAGS.pool or vocab,
                    'learning_rate': FLAGS.learning_rate}), flush=True)
  for record in learning_curve(config, steps=FLAGS.steps, learning_rate=FLAGS.learning_rate,
                               warmup=FLAGS.warmup, pool=FLAGS.pool,
                               eval_every=FLAGS.eval_every):
    print(json.dumps(record), flush=True)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Pre-training config, e.g. '
                                  'configs/pretrain.py:tiny.', lock_config=True)
  flags.DEFINE_integer('steps', 1000, 'Adam steps on copy rows.')
  flags.DEFINE_float('learning_rate', 3e-3, 'Constant learning rate after the warmup.')
  flags.DEFINE_integer('warmup', 50, 'Linear warmup steps.')
  flags.DEFINE_integer('pool', 0, 'Train on this many ids only (0: the whole vocabulary).')
  flags.DEFINE_integer('eval_every', 50, 'Steps between evaluations.')
  flags.mark_flags_as_required(['config'])
  cli.run(main)
