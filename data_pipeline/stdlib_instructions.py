"""The embedded instruction set: write a stdlib function from its signature and docstring.

No download: the Python standard library's own functions, read with `ast`.
For each public function or method that has a docstring, the user asks for a
function with that signature and docstring (one of several phrasings, chosen
by a hash of the module and qualified name, so the choice is stable) and the
assistant answers with the function's exact source: the segment
`ast.get_source_segment` gives, widened to start at its first decorator, with
the indentation of its `def` line removed.

Which functions, and why the others are left out (each counted by reason):
  * (whole modules, counted under `modules`) modules under test/, tests/,
    idle_test/ or named test_*.py hold test cases, not functions anyone asks
    for, and are not parsed; nor are the few with syntax errors (Python 2
    test data);
  * nested_function: a function inside a function depends on its closure;
  * no_docstring: nothing to ask with;
  * dunder_name / private_name: `__init__`, `_helper` and the methods of
    `_Private` classes are not what a user requests by name (their bodies still
    teach through pre-training);
  * short_docstring: fewer than `min_docstring_words` words say too little;
  * then, as for any instruction data (`instructions.build_records`): duplicate
    (identical answers, a train copy preferred), control_token_in_content,
    too_long (rendered with the chat template, over `seq_len`).
Methods are kept: the request names the class.

Documents and splits are those of pre-training: modules come from
`sources.stdlib_documents` (ids `stdlib:json/decoder.py`) and every function
goes to the split of its module (`split.assign_split(module id, validation,
test)`). With the pre-training data's fractions (`configs/data.py:stdlib`,
2% / 4%, which the SFT and preference presets take from it) a validation
function's module is in pre-training's validation split and a test one's in
its test split, so no held-out function was in a pre-training train document.
Held-out fractions whose sum is larger than the pre-training data's would put
held-out functions in modules pre-training trained on: `check_held_out` refuses
them when the tokenizer's directory is that data's workdir (data_config.json).

Measured on CPython 3.11.7 with the `configs/data.py:stdlib` tokenizer (8192
pieces), about 5-7 s on a shared CPU: 1,757 modules, 1,027 of them tests,
16,539 definitions in the other 730. At seq_len 256 with 2% / 4%: 3,227
train / 18 validation / 127 test conversations (runs/sft_data).
"""

from __future__ import annotations

import ast
import collections
import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

from configs import data as data_config
from configs.cli import UserError
from data_pipeline import chat
from data_pipeline import instructions
from data_pipeline import sources

# {kind} is 'function' or 'method', {owner} '' or ' of the class `C`'.
PHRASINGS = (
    'Write a Python {kind} with the signature `{signature}`{owner}.{decorators} '
    'Its docstring:\n\n{doc}',
    'Implement the {kind} `{signature}`{owner} in Python.{decorators} It should do what '
    'this docstring says:\n\n{doc}',
    '{doc}\n\nWrite that as a Python {kind}{owner}: `{signature}`.{decorators}',
    'Please write the {kind} `{name}`{owner} in Python.{decorators}\n'
    'Signature: `{signature}`\nDocstring:\n{doc}',
)
_TEST_DIRS = ('test', 'tests', 'idle_test')


def is_test_module(relpath: str) -> bool:
  parts = relpath.split('/')
  return any(p in _TEST_DIRS for p in parts[:-1]) or parts[-1].startswith('test_')


def _phrasing(key: str) -> str:
  digest = hashlib.blake2b(key.encode('utf-8'), digest_size=8).digest()
  return PHRASINGS[int.from_bytes(digest, 'big') % len(PHRASINGS)]


def _defs(node: ast.AST, scope: tuple[tuple[str, str], ...] = ()) -> Iterator[
    tuple[ast.FunctionDef | ast.AsyncFunctionDef, tuple[tuple[str, str], ...]]]:
  """Every function definition under `node` with its enclosing (kind, name) scopes."""
  for child in ast.iter_child_nodes(node):
    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield child, scope
      yield from _defs(child, scope + (('function', child.name),))
    elif isinstance(child, ast.ClassDef):
      yield from _defs(child, scope + (('class', child.name),))
    elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
      # Definitions are statements: expressions never hold one, and not
      # descending into them makes the walk several times faster.
      yield from _defs(child, scope)


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  prefix = 'async def' if isinstance(node, ast.AsyncFunctionDef) else 'def'
  returns = f' -> {ast.unparse(node.returns)}' if node.returns else ''
  return f'{prefix} {node.name}({ast.unparse(node.args)}){returns}'


# Line ends as the Python tokenizer counts them (not str.splitlines, which
# also splits at form feeds and other separators).
_LINE = re.compile(r'[^\r\n]*(?:\r\n|\r|\n)?')


def source_lines(source: str) -> list[str]:
  return _LINE.findall(source)


def source_of(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  """The definition's exact text (decorators included, def indentation removed).

  `lines` are `source_lines(module source)`: the segment that
  `ast.get_source_segment` gives, from column 0 of the first decorator's line,
  without splitting the module once per function. (A `def` always starts
  its line: Python allows no other statement before it on the same line.)
  """
  first = min([d.lineno for d in node.decorator_list] + [node.lineno])
  segment = lines[first - 1:node.end_lineno]
  # Column offsets count UTF-8 bytes.
  segment[-1] = segment[-1].encode('utf-8')[:node.end_col_offset].decode('utf-8')
  head = segment[0]
  indent = head[:len(head) - len(head.lstrip())]
  # Not textwrap.dedent: a multi-line string at column 0 inside the function
  # would stop it from removing anything. Lines that do not start with the
  # indentation are inside such strings and stay as they are.
  out = []
  for line in segment:
    body = line.rstrip('\r\n')
    end = line[len(body):]
    if body.startswith(indent):
      body = body[len(indent):]
    elif not body.strip():
      body = ''
    out.append(body + end)
  return ''.join(out)


def _request(node: ast.FunctionDef | ast.AsyncFunctionDef, scope, doc: str, key: str) -> str:
  classes = [name for kind, name in scope if kind == 'class']
  kind = 'method' if classes else 'function'
  owner = f' of the class `{".".join(classes)}`' if classes else ''
  decorators = ''
  if node.decorator_list:
    names = ', '.join(f'`@{ast.unparse(d)}`' for d in node.decorator_list)
    decorators = f' Decorators: {names}.'
  return _phrasing(key).format(kind=kind, owner=owner, signature=signature(node), name=node.name,
                               doc=doc, decorators=decorators)


def _exclusion(node, scope, min_docstring_words: int) -> str | None:
  if any(kind == 'function' for kind, _ in scope):
    return 'nested_function'
  doc = ast.get_docstring(node)
  if not doc or not doc.strip():
    return 'no_docstring'
  if node.name.startswith('__') and node.name.endswith('__'):
    return 'dunder_name'
  if node.name.startswith('_') or any(name.startswith('_') for _, name in scope):
    return 'private_name'
  if len(doc.split()) < min_docstring_words:
    return 'short_docstring'
  return None


def _module_candidates(doc: sources.Document, report: instructions.Report,
                       modules: collections.Counter, min_docstring_words: int,
                       ) -> Iterator[instructions.Candidate]:
  relpath = doc.id.removeprefix('stdlib:')
  if is_test_module(relpath):
    modules['test_module'] += 1  # Not even parsed: half the stdlib, and no candidates.
    return
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # Invalid escapes in old modules are not our concern.
      tree = ast.parse(doc.text, filename=relpath)
  except (SyntaxError, ValueError, RecursionError):
    modules['syntax_error'] += 1  # lib2to3's Python 2 test data and deliberate bad syntax.
    return
  modules['parsed'] += 1
  seen: collections.Counter = collections.Counter()
  lines = source_lines(doc.text)
  for node, scope in _defs(tree):
    report.candidates += 1
    qualname = '.'.join([name for _, name in scope] + [node.name])
    where = f'{doc.id}:{node.lineno} {qualname}'
    reason = _exclusion(node, scope, min_docstring_words)
    if reason:
      report.skip(reason, where)
      continue
    seen[qualname] += 1  # Redefinitions (if/else branches) stay apart.
    example_id = f'{doc.id}:{qualname}' + (f'#{seen[qualname]}' if seen[qualname] > 1 else '')
    answer = source_of(lines, node)
    request = _request(node, scope, ast.get_docstring(node), example_id)
    yield instructions.Candidate(
        example_id, doc.id, where,
        [{'role': chat.USER, 'content': request}, {'role': chat.ASSISTANT, 'content': answer}],
        {'function_name': qualname, 'module': relpath})


def check_held_out(tokenizer_path: str, validation: float, test: float) -> None:
  """Refuses held-out fractions that reach into pre-training's train split.

  A module is held out of pre-training when its hash falls below the sum of
  the pre-training data's fractions, and held out here below the sum of ours;
  ours must not be larger, or some held-out functions come from modules the
  pre-trained model trained on. Checked when the tokenizer sits in a stdlib
  pre-training data workdir (its data_config.json says so); otherwise there is
  nothing to compare with and nothing is checked.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(tokenizer_path)),
                      data_config.WORKDIR_CONFIG)
  try:
    with open(path, encoding='utf-8') as f:
      pretraining = json.load(f)
    if pretraining['source']['kind'] != 'stdlib':
      return
    held_out = float(pretraining['split']['validation']) + float(pretraining['split']['test'])
  except (OSError, ValueError, KeyError, TypeError):
    return
  if validation + test > held_out + 1e-9:
    raise UserError(
        f'data.validation={validation} + data.test={test} hold out more modules than the '
        f'pre-training data did ({held_out:g} in {path}): some held-out functions would come '
        'from modules pre-training trained on. Use its fractions '
        f'(validation={pretraining["split"]["validation"]}, test={pretraining["split"]["test"]}).')


def build_stdlib_instructions(tokenizer: chat.ChatTokenizer, seq_len: int, *,
                              validation: float = data_config.STDLIB_VALIDATION,
                              test: float = data_config.STDLIB_TEST,
                              root: str | None = None, min_docstring_words: int = 3,
                              normalization: str = 'NFC', scrub_pii: bool = True,
                              ) -> tuple[dict[str, list[instructions.Record]], dict[str, Any]]:
  """The stdlib instruction set per split, and its report (see `instructions.Report`).

  `root` is a stdlib directory (default: this Python's); the fractions should
  be those of the pre-training data config so the splits agree.
  """
  report = instructions.Report('stdlib', seq_len, validation, test)
  modules: collections.Counter = collections.Counter()
  skipped_files: collections.Counter = collections.Counter()
  candidates = []
  for doc in sources.stdlib_documents(skipped_files, root):
    if doc.source != 'stdlib':
      modules['pydoc_topics_ignored'] += 1  # Prose, no functions.
      continue
    modules['read'] += 1
    candidates.extend(_module_candidates(doc, report, modules, min_docstring_words))
  records = instructions.build_records(
      candidates, tokenizer, seq_len, report, normalization=normalization,
      scrub_pii=scrub_pii, dedup_text=lambda messages: messages[-1]['content'])
  kept_modules = {name: len({r['module'] for r in split_records})
                  for name, split_records in records.items()}
  report.details['modules'] = {**dict(sorted(modules.items())),
                               'files_skipped': dict(sorted(skipped_files.items())),
                               'with_examples': kept_modules}
  report.details['phrasings'] = len(PHRASINGS)
  return records, report.to_dict()
