"""The step-0 loss of every shipped preset's real init is ~ln(vocab_size).

A model that knows nothing should be uniformly unsure: on random tokens its
loss is ln V. `tiny` once started at 14.3 nats (ln V = 9.0) because its tied
logits favoured the input token; the tests that used a numpy stand-in init or
an untied head did not see it. Here every preset is built through the real
path (`create_sharded_state` with the preset's config, the eval step's loss);
`1b` and `7b` are checked for structure with `jax.eval_shape` at full size and
for the number on a stand-in with their settings and tiny dimensions.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from configs import pretrain
from model.config import ModelConfig
from model.transformer import Transformer
from train import mesh as mesh_lib
from train import state as state_lib
from train import steps

TOLERANCE = 0.3  # nats
BATCH, LENGTH = 2, 64

# Tiny dimensions for the large presets' stand-ins; the head ratios (GQA) are
# kept, every other setting (tying, scaling, dtypes, remat, scan) is the preset's.
STAND_IN_DIMS = {
    '1b': 'model.d_model=64,model.num_layers=2,model.num_heads=8,model.num_kv_heads=2,'
          'model.head_dim=8,model.mlp_dim=128',
    '7b': 'model.d_model=64,model.num_layers=2,model.num_heads=4,model.num_kv_heads=4,'
          'model.head_dim=16,model.mlp_dim=128',
}
DIMENSIONS = ('d_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
              'max_len')


def _step0_loss(config) -> float:
  """Mean NLL of the real initial state on random tokens, through the eval step."""
  model = Transformer(ModelConfig.from_config(config.model))
  mesh = mesh_lib.make_mesh(config.mesh)
  state, shardings = state_lib.create_sharded_state(config, model, mesh,
                                                    jax.random.key(config.seed))
  batch_sharding = mesh_lib.batch_sharding(mesh, mesh_lib.logical_rules(config.mesh))
  eval_step = steps.make_eval_step(config, model, mesh, shardings.params, batch_sharding)
  rng = np.random.default_rng(0)
  batch = {'tokens': rng.integers(0, config.model.vocab_size, (BATCH, LENGTH)).astype(np.int32),
           'segment_ids': np.ones((BATCH, LENGTH), np.int32),
           'positions': np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH))}
  return steps.evaluate_batches(eval_step, state.params, [batch])['loss']


def test_every_preset_is_covered():
  assert set(pretrain.PRESETS) == {'tiny', 'tiny_2k', 'small', 'bench_cpu'} | set(STAND_IN_DIMS)


@pytest.mark.parametrize('preset', ['tiny', 'tiny_2k', 'small', 'bench_cpu'])
def test_step0_loss_of_preset_is_ln_vocab(preset):
  config = pretrain.get_config(preset)
  loss = _step0_loss(config)
  assert abs(loss - math.log(config.model.vocab_size)) < TOLERANCE, (preset, loss)


@pytest.mark.parametrize('preset', sorted(STAND_IN_DIMS))
def test_step0_loss_of_large_preset_stand_in_is_ln_vocab(preset):
  config = pretrain.get_config(preset)
  stand_in = pretrain.get_config(f'{preset},{STAND_IN_DIMS[preset]},seq_len=64,model.max_len=64')
  full_cfg = ModelConfig.from_config(config.model)
  stand_in_cfg = ModelConfig.from_config(stand_in.model)
  # The stand-in differs from the preset in its dimensions only ...
  assert dataclasses.replace(stand_in_cfg, **{k: getattr(full_cfg, k) for k in DIMENSIONS}) \
      == full_cfg
  assert stand_in_cfg.num_heads // stand_in_cfg.num_kv_heads == \
      full_cfg.num_heads // full_cfg.num_kv_heads
  # ... and the full preset's real init (traced, nothing allocated) has the
  # stand-in's parameter tree: the same tying, the same modules.
  mesh = mesh_lib.make_mesh(config.mesh)
  full_state, _ = state_lib.abstract_state(config, Transformer(full_cfg), mesh)
  stand_in_state, _ = state_lib.abstract_state(stand_in, Transformer(stand_in_cfg), mesh)
  full_params, stand_in_params = full_state.params, stand_in_state.params
  assert jax.tree.structure(full_params) == jax.tree.structure(stand_in_params)
  loss = _step0_loss(stand_in)
  assert abs(loss - math.log(config.model.vocab_size)) < TOLERANCE, (preset, loss)


def test_the_old_tied_init_starts_far_above_ln_vocab():
  """The check above can fail: `tiny` as it was (unit-RMS input rows, unscaled tied logits)."""
  config = pretrain.get_config('tiny,model.scale_embeddings=True,model.embed_init_std=0.0,'
                               'model.num_layers=1')
  assert _step0_loss(config) - math.log(config.model.vocab_size) > 3.0
  # ... and the T5X-style logit scale, the other standard fix, starts at ln V too.
  scaled = pretrain.get_config('tiny,model.scale_embeddings=True,model.embed_init_std=0.0,'
                               'model.scale_tied_logits=True,model.num_layers=1')
  assert abs(_step0_loss(scaled) - math.log(config.model.vocab_size)) < TOLERANCE
