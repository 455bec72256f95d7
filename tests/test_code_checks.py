"""code_checks: parsing and the requested name, by hand-written cases (nothing is executed)."""

from __future__ import annotations

import pytest

from train import code_checks


@pytest.mark.parametrize('completion, name, parses, defines', [
    ('def parse(line):\n    return line.split()\n', 'parse', True, True),
    ('async def fetch(url):\n    return await get(url)\n', 'fetch', True, True),
    ('@cache\ndef parse(x):\n    return x\n', 'parse', True, True),
    ('def parse_line(line):\n    return line\n', 'parse', True, False),      # another name
    ('class A:\n    def parse(self):\n        pass\n', 'parse', True, False),  # not top level
    ('x = 1\n', 'parse', True, False),
    ('def parse(line):\n    return line.split(\n', 'parse', False, False),  # syntax error
    ('def parse(line)\n    return line\n', 'parse', False, False),
    ('', 'parse', True, False),
    ('def f():\n    return "\\d"\n', 'f', True, True),   # a warning, not an error
    ('def parse(x):\n    import os; os.remove("/")\n', 'parse', True, True),  # never run
    # A method is asked for as `def tell(self)` of its class and answered by its own def.
    ('def tell(self):\n    return self._pos\n', 'DecompressReader.tell', True, True),
    ('def seek(self):\n    return 0\n', 'DecompressReader.tell', True, False),
    ('def DecompressReader(self):\n    pass\n', 'DecompressReader.tell', True, False),
])
def test_check_completion(completion, name, parses, defines):
  check = code_checks.check_completion(completion, name)
  assert (check.parses, check.defines_name) == (parses, defines)
