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
          encodings/cp*.py tables), leaving 1,773 documents: train 1,739
          (9.4M tokens), validation 20 (81k), test 14 (50k).
          `runs/data/data_report.json` has every count.

  files   Local .txt (one document per file), .jsonl (one per line, field
          `source.text_field`, optional `source.id_field`) and .parquet
          (column `source.text_field`) files. HTML markup is stripped.

            python -m data_pipeline --config=configs/data.py:files \\
              --config.source.paths='corpus/*.jsonl,notes/' --workdir=runs/mydata

  tfds    A prepared TFDS dataset (array_record or parquet file format) by name.

            python -m data_pipeline --config=configs/data.py:tfds \\
              --config.source.tfds_name=my_dataset --config.source.tfds_data_dir=~/tfds \\
              --config.source.text_field=text --workdir=runs/mydata

The workdir then holds tokenizer.model, data_report.json, tfds/ (the
`strata_corpus` dataset) and DONE; running again on it reuses it.
"""

from __future__ import annotations

import ml_collections

from configs import overrides


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
  config.tokenizer.input_sentence_size = 2_000_000  # Lines sampled for training.
  return config


def stdlib() -> ml_collections.ConfigDict:
  config = base()
  # Held-out modules are also the held-out instruction, preference and RL
  # prompts of the post-training stages (split by the same module id), so they
  # must be enough to measure: ~2% + 4% of ~1,800 documents.
  config.split.validation = 0.02
  config.split.test = 0.04
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
  return overrides.build(arg, {'stdlib': stdlib, 'files': files, 'tfds': tfds}, 'stdlib')
