"""Preset selection and key=value overrides shared by every config file."""

import ml_collections
import pytest

from configs import overrides


def _presets():
  def tiny():
    c = ml_collections.ConfigDict()
    c.seq_len = 128
    c.lr = 1e-3
    c.use_bias = False
    c.name = 'x'
    c.shape = (1, 2)
    c.model = ml_collections.ConfigDict({'num_layers': 2})
    return c
  return {'tiny': tiny}


def test_preset_and_typed_overrides():
  c = overrides.build('tiny,seq_len=512,lr=3e-4,use_bias=true,name=y,shape=(3, 4),model.num_layers=6',
                      _presets(), 'tiny')
  assert c.preset == 'tiny'
  assert c.seq_len == 512 and isinstance(c.seq_len, int)
  assert c.lr == pytest.approx(3e-4)
  assert c.use_bias is True
  assert c.name == 'y'
  assert tuple(c.shape) == (3, 4)
  assert c.model.num_layers == 6


def test_default_preset_when_only_overrides():
  assert overrides.build('seq_len=64', _presets(), 'tiny').seq_len == 64
  assert overrides.build(None, _presets(), 'tiny').seq_len == 128


def test_misspelt_key_names_the_key_and_valid_keys():
  with pytest.raises(KeyError, match=r"modle.*valid keys.*model"):
    overrides.build('tiny,modle.num_layers=3', _presets(), 'tiny')
  with pytest.raises(KeyError, match=r"num_layer.*num_layers"):
    overrides.build('tiny,model.num_layer=3', _presets(), 'tiny')


def test_unknown_preset_and_bad_values():
  with pytest.raises(KeyError, match=r"huge.*tiny"):
    overrides.build('huge', _presets(), 'tiny')
  with pytest.raises(ValueError):
    overrides.build('tiny,seq_len=abc', _presets(), 'tiny')
  with pytest.raises(ValueError, match='key=value'):
    overrides.build('tiny,seq_len', _presets(), 'tiny')
