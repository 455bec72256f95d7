"""What generated code is checked for: does it parse, does it define the requested name.

Generated code is never executed: it is read with `ast` only. Used by
`train.evaluate --functional` (the `parse_and_name_rate` of held-out
instructions) and, later, as the verifiable reward of RL.
"""

from __future__ import annotations

import ast
import dataclasses
import warnings


@dataclasses.dataclass(frozen=True)
class CodeCheck:
  parses: bool          # `ast.parse` accepts the completion
  defines_name: bool    # ... and it defines a function of the requested name at top level


def check_completion(completion: str, function_name: str | None) -> CodeCheck:
  """Parses `completion` (never runs it) and looks for `def <function_name>` at top level."""
  try:
    with warnings.catch_warnings():   # e.g. invalid escape sequences in generated strings
      warnings.simplefilter('ignore')
      tree = ast.parse(completion)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return CodeCheck(parses=False, defines_name=False)
  names = {node.name for node in tree.body
           if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
  return CodeCheck(parses=True, defines_name=bool(function_name) and function_name in names)
