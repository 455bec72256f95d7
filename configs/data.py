"""Data preparation: raw text -> cleaned, deduplicated, split, tokenized shards.

Presets (`--config=configs/data.py:<preset>[,key=value,...]`):

  stdlib  The embedded corpus: every .py file of this Python's standard library
          (site-packages excluded) plus each topic of pydoc_data's reference
          prose. No download. BPE tokenizer with 8192 pieces.

            python -m data_pipeline --config=configs/data.py:stdlib --workdir=runs/data

          Hardware: 2 CPU cores, no accelerator. Wall time: about 65 s with
          the cores shared with other work (about 22 s of CPU time), half a
          GB of memory. Expect (CPython 3.11.7): 1,836 documents / 31.2 MB
          read, 32 files skipped (28 empty, 4 not UTF-8), 23 dropped by the
          quality filters (21 too short, 1 long line, 1 repeated lines), ~2,300
          PII placeholders (mostly e-mails and IP addresses in tests), 19 exact
          and 21 near duplicates removed (copied test fixtures; the
          encodings/cp*.py tables), leaving 1,773 documents, split 2% / 4%
          by document id: train 1,669 (9.0M tokens), validation 34 (132k),
          test 70 (379k).
          `runs/data/data_report.json` has every count.

  files   Local text files (one document per file; the suffixes in
          `source.text_suffixes`, by default .txt .text .md .rst), .jsonl
          (one per line, field `source.text_field`, optional `source.id_field`)
          and .parquet (column `source.text_field`) files; suffixes match in
          any case. Any other file found is skipped and counted with its
          reason in data_report.json. HTML markup is stripped.

            python -m data_pipeline --config=configs/data.py:files \\
              --config.source.paths='corpus/*.jsonl,notes/' --workdir=runs/mydata

  tfds    A prepared TFDS dataset (array_record or parquet file format) by name.

            python -m data_pipeline --config=configs/data.py:tfds \\
              --config.source.tfds_name=my_dataset --config.source.tfds_data_dir=~/tfds \\
              --config.source.text_field=text --workdir=runs/mydata

The workdir then holds tokenizer.model, data_report.json, tfds/ (the
`strata_corpus` dataset) and DONE, which records a fingerprint of the inputs.
Running again on it reuses it if the config and the inputs are unchanged; if
either changed, the run stops and names what changed (`--rebuild` rebuilds).

Every value is checked (`validate`) when the config is built and again when
the pipeline starts (flag overrides come after `get_config`), before anything
is written; a value out of range is an error that names its key.
"""

from __future__ import annotations

import ml_collections

from configs import overrides
from configs import validation as v
from configs.cli import UserError

SOURCE_KINDS = ('stdlib', 'files', 'tfds')
MODEL_TYPES = ('bpe', 'unigram')
NORMALIZATIONS = ('', 'NFC', 'NFD', 'NFKC', 'NFKD')
# Ids the tokenizer reserves before learning a piece: pad/unk/bos/eos, the 4
# chat control tokens, the newline piece and 256 byte-fallback pieces
# (data_pipeline/tokenizer.py). Duplicated here so configs import no SentencePiece.
TOKENIZER_RESERVED_IDS = 4 + 4 + 1 + 256


def base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.source = ml_collections.ConfigDict()
  config.source.kind = 'stdlib'  # 'stdlib' | 'files' | 'tfds'
  config.source.paths = ''  # files: comma-separated files, directories, globs.
  config.source.text_field = 'text'  # jsonl field / parquet column / tfds feature.
  config.source.id_field = ''  # Optional record id (else the line / row / index).
  config.source.tfds_name = ''
  config.source.tfds_split = 'train'
  config.source.tfds_data_dir = ''  # '' = TFDS's default (~/tensorflow_datasets).
  # files: suffixes (any case) read as one plain-text document per file.
  config.source.text_suffixes = '.txt,.text,.md,.rst'

  config.clean = ml_collections.ConfigDict()
  config.clean.normalization = 'NFC'  # unicodedata form, '' to keep text as is.
  config.clean.strip_html = True  # Only documents that look like HTML are touched.
  config.clean.scrub_pii = True
  config.clean.min_chars = 32
  config.clean.max_line_chars = 1000
  config.clean.min_alnum_fraction = 0.25  # Of the non-whitespace characters.
  config.clean.max_repeated_line_fraction = 0.3

  config.dedup = ml_collections.ConfigDict()
  config.dedup.ngram = 5  # Words per shingle.
  config.dedup.num_perm = 128
  config.dedup.threshold = 0.8  # Jaccard similarity that counts as a duplicate.
  config.dedup.seed = 0

  config.split = ml_collections.ConfigDict()
  config.split.validation = 0.01
  config.split.test = 0.01

  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.vocab_size = 8192
  config.tokenizer.model_type = 'bpe'  # 'bpe' | 'unigram'
  config.tokenizer.input_sentence_size = 2_000_000  # Lines sampled for training; 0 = all.
  return config


def _one_of(choices: tuple[str, ...]):
  return lambda value: value in choices


RULES: tuple[v.Rule, ...] = (
    ('source.kind', _one_of(SOURCE_KINDS), f'one of {list(SOURCE_KINDS)}'),
    ('clean.normalization', _one_of(NORMALIZATIONS), f'one of {list(NORMALIZATIONS)}'),
    ('clean.min_chars', v.is_int(0), 'an int >= 0'),
    ('clean.max_line_chars', v.is_int(1), 'an int >= 1'),
    ('clean.min_alnum_fraction', v.is_number(0.0, 1.0), 'a number in [0, 1]'),
    ('clean.max_repeated_line_fraction', v.is_number(0.0, 1.0), 'a number in [0, 1]'),
    # ngram 0 makes every document one empty shingle: all "near duplicates".
    ('dedup.ngram', v.is_int(1), 'an int >= 1'),
    ('dedup.num_perm', v.is_int(1), 'an int >= 1'),
    # Jaccard 0 would call any two documents duplicates; above 1 none ever is.
    ('dedup.threshold', v.is_number(0.0, 1.0, low_open=True), 'a number in (0, 1]'),
    ('dedup.seed', v.is_int(0), 'an int >= 0 (numpy seeds are non-negative)'),
    ('split.validation', v.is_number(0.0, 1.0, high_open=True), 'a number in [0, 1)'),
    ('split.test', v.is_number(0.0, 1.0, high_open=True), 'a number in [0, 1)'),
    ('tokenizer.vocab_size', v.is_int(1), 'an int >= 1'),
    ('tokenizer.model_type', _one_of(MODEL_TYPES), f'one of {list(MODEL_TYPES)}'),
    ('tokenizer.input_sentence_size', v.is_int(0), 'an int >= 0'),
)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every value's range and choice; raises UserError naming the key."""
  v.check(config, RULES)
  for suffix in str(config.source.text_suffixes).split(','):
    if suffix.strip() and not suffix.strip().startswith('.'):
      raise UserError(f'Config key source.text_suffixes={config.source.text_suffixes!r}: '
                      f'{suffix.strip()!r} does not start with a dot.')
  if config.split.validation + config.split.test >= 1.0:
    raise UserError(f'Config keys split.validation={config.split.validation!r} + split.test='
                    f'{config.split.test!r} must be < 1 to leave documents for train.')
  if config.tokenizer.vocab_size <= TOKENIZER_RESERVED_IDS:
    raise UserError(
        f'Config key tokenizer.vocab_size={config.tokenizer.vocab_size} leaves no room for '
        f'learned pieces: {TOKENIZER_RESERVED_IDS} ids are reserved (specials, chat control '
        f'tokens, newline, 256 bytes); use at least {TOKENIZER_RESERVED_IDS + 1}.')
  return config


# Held-out modules are also the held-out instruction, preference and RL
# prompts of the post-training stages (split by the same module id, their
# presets take these fractions), so they must be enough to measure: ~2% + 4%
# of ~1,800 documents.
STDLIB_VALIDATION = 0.02
STDLIB_TEST = 0.04

# The file the pipeline writes this config to in its workdir, beside
# tokenizer.model; the post-training data builders read its split fractions.
WORKDIR_CONFIG = 'data_config.json'


def stdlib() -> ml_collections.ConfigDict:
  config = base()
  config.split.validation = STDLIB_VALIDATION
  config.split.test = STDLIB_TEST
  config.clean.strip_html = False  # Code: `<` and `>` are operators, not tags.
  # Code repeats lines (`pass`, `else:`, `)`) far more than prose does.
  config.clean.max_repeated_line_fraction = 0.7
  return config


def files() -> ml_collections.ConfigDict:
  config = base()
  config.source.kind = 'files'
  return config


def tfds() -> ml_collections.ConfigDict:
  config = base()
  config.source.kind = 'tfds'
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return validate(
      overrides.build(arg, {'stdlib': stdlib, 'files': files, 'tfds': tfds}, 'stdlib'))
