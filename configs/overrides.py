"""Preset selection and `key=value` overrides for `get_config(arg)`.

Every config file exposes `get_config(arg)`, where `arg` is what follows the
colon on the command line: `configs/pretrain.py:tiny,seq_len=512,model.num_layers=2`.
The first item names a preset; the rest are dotted keys with values parsed
to the type of the value they replace. A misspelt key is an error that names
the keys that do exist.
"""

from __future__ import annotations

import ast
from typing import Callable, Mapping

import ml_collections

from configs.cli import UserError


class ConfigKeyError(UserError, KeyError):
  """A config key or preset that does not exist; the message names the valid ones."""

  def __str__(self) -> str:   # KeyError would quote the message
    return str(self.args[0]) if self.args else ''


def split_arg(arg: str | None, default_preset: str) -> tuple[str, list[tuple[str, str]]]:
  """Splits `'tiny,a.b=1,c=x'` into `('tiny', [('a.b', '1'), ('c', 'x')])`."""
  items = [item.strip() for item in _split_top_level(arg or '') if item.strip()]
  preset = default_preset
  if items and '=' not in items[0]:
    preset = items.pop(0)
  overrides = []
  for item in items:
    if '=' not in item:
      raise UserError(f'Config override {item!r} is not of the form key=value.')
    key, value = item.split('=', 1)
    overrides.append((key.strip(), value.strip()))
  return preset, overrides


def _split_top_level(text: str) -> list[str]:
  """Splits on commas that are not inside brackets, so `shape=(3, 4)` stays whole."""
  items, depth, start = [], 0, 0
  for i, char in enumerate(text):
    if char in '([{':
      depth += 1
    elif char in ')]}':
      depth -= 1
    elif char == ',' and depth == 0:
      items.append(text[start:i])
      start = i + 1
  items.append(text[start:])
  return items


def parse_value(text: str, current: object) -> object:
  """Parses `text` to the type of `current`, the value it replaces."""
  if isinstance(current, bool):
    lowered = text.lower()
    if lowered not in ('true', 'false', '1', '0'):
      raise ValueError(f'Expected a boolean, got {text!r}.')
    return lowered in ('true', '1')
  if isinstance(current, int):
    return int(float(text)) if 'e' in text.lower() else int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  if current is None and text.lower() == 'none':
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets the dotted `key` of `config` from `text`; unknown keys are an error."""
  node = config
  parts = key.split('.')
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = '.'.join(parts[:depth]) or 'the config'
      valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise ConfigKeyError(
          f'Unknown config key {key!r}: {where} has no {part!r}; valid keys: {valid}')
    if depth < len(parts) - 1:
      node = node[part]
  leaf = parts[-1]
  try:
    node[leaf] = parse_value(text, node[leaf])
  except (ValueError, TypeError) as e:
    raise UserError(f'Config key {key!r}: cannot use {text!r} '
                    f'(expected {type(node[leaf]).__name__}): {e}') from None


def build(arg: str | None, presets: Mapping[str, Callable[[], ml_collections.ConfigDict]],
          default_preset: str) -> ml_collections.ConfigDict:
  """Builds the named preset and applies the overrides in `arg`."""
  preset, overrides = split_arg(arg, default_preset)
  if preset not in presets:
    raise ConfigKeyError(f'Unknown preset {preset!r}; valid presets: {sorted(presets)}')
  config = presets[preset]()
  with config.unlocked():
    config.preset = preset
  for key, text in overrides:
    apply_override(config, key, text)
  return config

