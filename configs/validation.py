"""Range checks for config values, each failure naming the key.

A config file lists its rules as `(dotted key, predicate, what is expected)`;
`check(config, rules)` raises `UserError` for the first value that breaks one,
e.g. `config key dedup.ngram=0: expected an int >= 1`. The stage runs it
before it writes anything, so a nonsense value never reaches a run.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from configs.cli import UserError

Rule = tuple[str, Callable[[Any], bool], str]


def get(config: Any, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def is_int(low: int | None = None, high: int | None = None) -> Callable[[Any], bool]:
  def ok(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
      return False
    return (low is None or value >= low) and (high is None or value <= high)
  return ok


def is_number(low: float | None = None, high: float | None = None, *,
              low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
  def ok(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
      return False
    if low is not None and (value <= low if low_open else value < low):
      return False
    return high is None or (value < high if high_open else value <= high)
  return ok


def optional(predicate: Callable[[Any], bool]) -> Callable[[Any], bool]:
  return lambda value: value is None or predicate(value)


def check(config: Any, rules: Sequence[Rule]) -> None:
  """Raises UserError naming the first key whose value breaks its rule."""
  for key, predicate, expected in rules:
    try:
      value = get(config, key)
    except (KeyError, AttributeError):
      raise UserError(f'config key {key} is missing.') from None
    if not predicate(value):
      raise UserError(f'config key {key}={value!r}: expected {expected}.')
