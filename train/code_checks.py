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


def requested_def(function_name: str) -> str:
  """The name the answer must `def`: a method `Class.name` is answered by `def name(self, ...)`.

  The instructions ask for "the method `def tell(self)` of the class
  `DecompressReader`" and the reference answer is the method's own source.
  """
  return function_name.rsplit('.', 1)[-1]


def check_completion(completion: str, function_name: str | None) -> CodeCheck:
  """Parses `completion` (never runs it) and looks for the requested `def` at top level.

  `function_name` is a function's name or a method's `Class.name` (see
  `requested_def`).
  """
  try:
    with warnings.catch_warnings():   # e.g. invalid escape sequences in generated strings
      warnings.simplefilter('ignore')
      tree = ast.parse(completion)
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return CodeCheck(parses=False, defines_name=False)
  names = {node.name for node in tree.body
           if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
  return CodeCheck(parses=True,
                   defines_name=bool(function_name) and requested_def(function_name) in names)
