"""configs/pretrain.py: presets, their shapes, and errors for misspelt keys."""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags
import pytest

from configs import pretrain
from model.config import ModelConfig, num_params

CONFIG_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           'configs', 'pretrain.py')


@pytest.mark.parametrize('preset', sorted(pretrain.PRESETS))
def test_presets_build_consistent_configs(preset):
  config = pretrain.get_config(preset)
  model = ModelConfig.from_config(config.model)
  assert config.preset == preset
  assert model.max_len == config.seq_len
  assert config.batch_size % config.optimizer.grad_accum_steps == 0
  for key in ('data', 'seq_len', 'batch_size', 'num_train_steps', 'num_epochs', 'eval_every',
              'eval_steps', 'checkpoint_every', 'keep_checkpoints', 'patience', 'log_every',
              'seed', 'optimizer', 'loss', 'mesh'):
    assert key in config, key


@pytest.mark.parametrize('preset,low,high', [
    ('tiny', 4.5e6, 5.5e6), ('small', 20e6, 30e6), ('1b', 1.0e9, 1.2e9), ('7b', 6.7e9, 6.8e9)])
def test_preset_sizes(preset, low, high):
  assert low < num_params(ModelConfig.from_config(pretrain.get_config(preset).model)) < high


def test_seven_b_is_the_llama2_shape():
  model = pretrain.get_config('7b').model
  assert (model.num_layers, model.d_model, model.num_heads, model.mlp_dim, model.vocab_size) == \
      (32, 4096, 32, 11008, 32000)
  assert pretrain.get_config('7b').seq_len == 4096


def test_overrides_apply_with_types():
  config = pretrain.get_config('tiny,model.num_layers=2,optimizer.learning_rate=1e-4,num_epochs=3')
  assert config.model.num_layers == 2
  assert config.optimizer.learning_rate == 1e-4
  assert config.num_epochs == 3


def test_misspelt_key_in_arg_names_it():
  with pytest.raises(KeyError, match='modle'):
    pretrain.get_config('tiny,modle.num_layers=2')
  with pytest.raises(KeyError, match='learning_rat'):
    pretrain.get_config('tiny,optimizer.learning_rat=1e-3')


def _parse_command_line(*overrides: str):
  argv = ['prog', f'--config={CONFIG_FILE}:tiny', *overrides]
  flag_values = flags.FlagValues()
  # sys_argv: the override flags (--config.a.b) are registered from this list.
  config_flags.DEFINE_config_file('config', None, 'pretrain config', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_misspelt_key_on_the_command_line_names_it():
  assert _parse_command_line('--config.optimizer.learning_rate=1e-4').optimizer.learning_rate \
      == 1e-4
  with pytest.raises(Exception, match='learning_rat'):
    _parse_command_line('--config.optimizer.learning_rat=1e-4')
  with pytest.raises(Exception, match='modle'):
    _parse_command_line('--config.modle.num_layers=2')


@pytest.mark.parametrize('preset', ['tiny', '1b', '7b'])
def test_sft_presets_build_and_validate(preset):
  from configs import sft  # pylint: disable=g-import-not-at-top
  from configs.cli import UserError  # pylint: disable=g-import-not-at-top
  config = sft.get_config(preset)
  assert config.chat and config.init_from == '' and config.num_epochs == 3
  if config.data.source == 'files':   # the TPU presets take the user's JSONL
    with pytest.raises(UserError, match='data.paths'):
      sft.validate(config)
    config.data.paths = 'data/sft/*.jsonl'
  sft.validate(config)
  config.data.source = 'web'
  with pytest.raises(UserError, match='data.source'):
    sft.validate(config)
