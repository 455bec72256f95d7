"""Scaling-law sweeps: a grid of pre-training runs, the fitted law and a checked prediction.

Presets (`configs/scaling.py:<preset>[,key=value,...]`):

  cpu   4 model sizes (N = 0.11M, 0.22M, 0.40M, 0.91M non-embedding
        parameters; d_model 96-160, 1-3 layers, head dim 32) x 3 token
        budgets (0.25M, 0.5M, 1M tokens = 122, 244, 488 steps of 16 x 128
        tokens) on the stdlib corpus; the largest point (0.91M x 1M) is held
        out of the fit and predicted before it runs.
          python -m train.scaling --config=configs/scaling.py:cpu --workdir=runs/scaling
        Hardware: 2 CPU cores, float32. Wall time: about 30-35 minutes,
        estimated from step rates measured at light load (5.8k tokens/s for
        d_model 96 / 1 layer, 1.8k for 224 / 3 layers); the whole sweep has not
        yet run on free cores (README, "Scaling laws": the first point measured
        validation loss 5.994). Result: runs/scaling/scaling.json (every point,
        the fit with 95% intervals, the frontier, the held-out prediction and
        its error) and runs/scaling/plots/.
  tpu   a sweep for a pod slice (e.g. v5p-32 or v4-64, bf16): 6 sizes from
        20M to 640M non-embedding parameters x 4 budgets (1B-8B tokens of
        256 x 2048) on a prepared corpus, with the 640M x 8B point held out.
        Run the points as separate jobs into one GCS workdir (README,
        "Scaling laws on Cloud TPU"), e.g. per point
          python -m launch.tpu_vm run --name=slice-1 --zone=ZONE --run_name=n20m-d1g \
              --module=train.scaling --workdir=gs://BUCKET/scaling --data=gs://BUCKET/data \
              -- --config=configs/scaling.py:tpu --point=N20M_D1G
        then `python -m train.scaling --config=configs/scaling.py:tpu
        --workdir=gs://BUCKET/scaling --fit_only` anywhere. Not measured in this
        repository (no pod was at hand); the sizes follow the FLOPs, not a run.

Keys:
  pretrain: the pre-training config every point starts from (configs/pretrain.py's
    keys); a point sets its model shape, num_train_steps, warm-up and evaluation.
  grid.kind: 'grid' (grid.params x grid.tokens) or 'isoflop' (grid.compute budgets,
    each with grid.isoflop_points sizes over a factor grid.isoflop_span).
  shape: the rule that turns a target N into a model (train/scaling_plan.py).
  warmup_fraction: warm-up steps as a fraction of each point's steps.
  holdout: hold the largest-compute point out of the fit and predict it first.
  fit: huber_delta, bootstrap (resamples for the confidence intervals), seed,
    init_stride (every k-th start of the grid of initialisations; 1: all).
"""

from __future__ import annotations

import ml_collections

from configs import overrides
from configs import pretrain as pretrain_configs
from configs import validation as v


def _base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.grid = ml_collections.ConfigDict(dict(
      kind='grid', params=(1e5, 2e5, 4e5, 8e5), tokens=(2.5e5, 5e5, 1e6),
      compute=(1e12, 3e12, 1e13), isoflop_points=5, isoflop_span=8.0))
  config.shape = ml_collections.ConfigDict(dict(
      aspect_ratio=64.0, head_dim=32, mlp_ratio=8.0 / 3.0, multiple=32))
  config.warmup_fraction = 0.05
  config.holdout = True
  config.fit = ml_collections.ConfigDict(dict(huber_delta=1e-3, bootstrap=200, seed=0,
                                                     init_stride=1))
  return config


def cpu() -> ml_collections.ConfigDict:
  config = _base()
  base = pretrain_configs.tiny()   # tied embeddings, unrolled layers, float32
  base.seq_len = 128
  base.model.max_len = 128
  base.batch_size = 16
  base.eval_steps = 32             # 65k validation tokens, the same batches for every point
  base.keep_checkpoints = 1
  base.optimizer.learning_rate = 3e-3
  config.pretrain = base
  return config


def tpu() -> ml_collections.ConfigDict:
  config = _base()
  base = pretrain_configs.one_b()  # bf16, splash attention, FSDP over the slice
  base.model.tie_embeddings = True
  base.model.scale_embeddings = False
  base.model.embed_init_std = 0.02
  base.model.remat_policy = 'none'
  base.eval_steps = 50
  base.keep_checkpoints = 1
  base.optimizer.learning_rate = 1e-3
  config.pretrain = base
  config.grid.params = (2e7, 4e7, 8e7, 1.6e8, 3.2e8, 6.4e8)
  config.grid.tokens = (1e9, 2e9, 4e9, 8e9)
  config.shape.aspect_ratio = 128.0
  config.shape.head_dim = 128
  config.shape.multiple = 256
  config.fit.bootstrap = 500
  return config


PRESETS = {'cpu': cpu, 'tpu': tpu}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return overrides.build(arg, PRESETS, default_preset='cpu')


def _positive_numbers(value) -> bool:
  return (isinstance(value, (tuple, list)) and len(value) > 0
          and all(v.is_number(0.0, low_open=True)(x) for x in value))


RULES: tuple[v.Rule, ...] = (
    ('grid.kind', lambda k: k in ('grid', 'isoflop'), "'grid' or 'isoflop'"),
    ('grid.params', _positive_numbers, 'a non-empty tuple of numbers > 0'),
    ('grid.tokens', _positive_numbers, 'a non-empty tuple of numbers > 0'),
    ('grid.compute', _positive_numbers, 'a non-empty tuple of numbers > 0'),
    ('grid.isoflop_points', v.is_int(1), 'an int >= 1'),
    ('grid.isoflop_span', v.is_number(1.0, low_open=True), 'a number > 1'),
    ('shape.aspect_ratio', v.is_number(0.0, low_open=True), 'a number > 0'),
    ('shape.head_dim', lambda x: v.is_int(2)(x) and x % 2 == 0, 'an even int >= 2'),
    ('shape.mlp_ratio', v.is_number(0.0, low_open=True), 'a number > 0'),
    ('shape.multiple', v.is_int(1), 'an int >= 1'),
    ('warmup_fraction', v.is_number(0.0, 1.0, high_open=True), 'a number in [0, 1)'),
    ('holdout', lambda x: isinstance(x, bool), 'True or False'),
    ('fit.huber_delta', v.is_number(0.0, low_open=True), 'a number > 0'),
    ('fit.bootstrap', v.is_int(0), 'an int >= 0 (0: no intervals)'),
    ('fit.seed', v.is_int(), 'an int'),
    ('fit.init_stride', v.is_int(1), 'an int >= 1 (1: every initialisation of the grid)'),
)


def validate(config: ml_collections.ConfigDict) -> None:
  v.check(config, RULES)
