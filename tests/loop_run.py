"""`python -m train` with test hooks, for the subprocess tests in test_loop.py.

Environment variables (all optional):
  STRATA_TEST_SLOW_AFTER=K   sleep STRATA_TEST_SLEEP seconds (default 0.3) after
                             every step past K, so a test can kill the run mid-way;
  STRATA_TEST_NAN_AT=K       multiply the params by NaN just before step K, so
                             step K's loss is NaN.
The CPU matmul peak is fixed at 1e11 FLOP/s instead of measured (seconds saved
per run; MFU is still computed). Everything else is exactly `python -m train`.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from train import mfu
from train import steps


def _hooked(make_train_step):
  slow_after = os.environ.get('STRATA_TEST_SLOW_AFTER')
  sleep = float(os.environ.get('STRATA_TEST_SLEEP', '0.3'))
  nan_at = os.environ.get('STRATA_TEST_NAN_AT')

  def make(*args, **kwargs):
    train_step = make_train_step(*args, **kwargs)

    def step(state, batch):
      number = int(state.step) + 1   # the step this call computes
      if nan_at is not None and number == int(nan_at):
        state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
      out = train_step(state, batch)
      if slow_after is not None and number > int(slow_after):
        time.sleep(sleep)
      return out

    return step

  return make


if __name__ == '__main__':
  steps.make_train_step = _hooked(steps.make_train_step)
  mfu.measure_cpu_matmul_flops = lambda *args, **kwargs: 1e11
  from configs import cli  # pylint: disable=g-import-not-at-top
  from train import __main__ as train_main  # pylint: disable=g-import-not-at-top
  cli.run(train_main.main)
