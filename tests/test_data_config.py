"""configs/data.py: every preset is valid, and each nonsense value names its key."""

from __future__ import annotations

import pytest

from configs import data as data_configs
from configs.cli import UserError


@pytest.mark.parametrize('preset', ['stdlib', 'files', 'tfds'])
def test_presets_are_valid(preset):
  assert data_configs.validate(data_configs.get_config(preset)).preset == preset


@pytest.mark.parametrize('override, named', [
    ('dedup.ngram=0', 'dedup.ngram=0'),
    ('dedup.ngram=-3', 'dedup.ngram=-3'),
    ('dedup.num_perm=0', 'dedup.num_perm=0'),
    ('dedup.threshold=0', 'dedup.threshold=0.0'),
    ('dedup.threshold=2', 'dedup.threshold=2.0'),
    ('dedup.threshold=-0.5', 'dedup.threshold=-0.5'),
    ('dedup.seed=-1', 'dedup.seed=-1'),
    ('clean.min_chars=-1', 'clean.min_chars=-1'),
    ('clean.max_line_chars=0', 'clean.max_line_chars=0'),
    ('clean.min_alnum_fraction=1.5', 'clean.min_alnum_fraction=1.5'),
    ('clean.max_repeated_line_fraction=-0.1', 'clean.max_repeated_line_fraction=-0.1'),
    ('clean.normalization=NFX', "clean.normalization='NFX'"),
    ('split.validation=1', 'split.validation=1.0'),
    ('split.test=-0.01', 'split.test=-0.01'),
    ('split.validation=0.6,split.test=0.5', 'split.validation=0.6 + split.test=0.5'),
    ('tokenizer.vocab_size=0', 'tokenizer.vocab_size=0'),
    ('tokenizer.vocab_size=265', 'tokenizer.vocab_size=265'),
    ('tokenizer.model_type=wordpiece', "tokenizer.model_type='wordpiece'"),
    ('tokenizer.input_sentence_size=-1', 'tokenizer.input_sentence_size=-1'),
    ('source.kind=web', "source.kind='web'"),
    ('source.text_suffixes=txt', "source.text_suffixes='txt'"),
])
def test_nonsense_values_are_a_user_error_naming_the_key(override, named):
  with pytest.raises(UserError, match=named.replace('+', r'\+')):
    data_configs.get_config(f'files,{override}')


@pytest.mark.parametrize('override', [
    'dedup.threshold=1', 'dedup.ngram=1', 'dedup.num_perm=1', 'split.validation=0,split.test=0',
    'clean.min_chars=0', 'tokenizer.vocab_size=266', 'tokenizer.input_sentence_size=0',
    'clean.normalization=', 'source.text_suffixes=.TXT',
])
def test_edge_values_that_make_sense_are_accepted(override):
  data_configs.get_config(f'files,{override}')
