"""How every entry point reports a user's mistake: one line, exit status 2.

An error caused by input (a config value, a path, a file's contents, a flag)
is raised as `UserError` (a `ValueError`, so library callers can still catch
it as one) with a message that names the key, file or record. Entry points run
through `run(main)`, which prints such an error as `error: <message>` on
stderr and exits with status 2, without a traceback; flag-parsing errors
(a misspelt `--config.x`, a value of the wrong type, a missing config file)
are reported the same way. `--debug` (or `--verbosity=1`) shows the traceback.
Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence

from absl import app
from absl import flags

EXIT_USER_ERROR = 2


class UserError(ValueError):
  """Bad input from the user; the message names what is wrong and where."""


def _debug(argv: Sequence[str]) -> bool:
  for arg in argv[1:]:
    if arg in ('--debug', '--debug=true', '--debug=1'):
      return True
    if arg.startswith(('--verbosity=', '-v=')):
      try:
        return int(arg.split('=', 1)[1]) >= 1
      except ValueError:
        return False
  return False


def one_line(message: object) -> str:
  """The message of an exception as one line (the first non-empty line, then the rest joined)."""
  lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
  return ' '.join(lines) if lines else type(message).__name__


def fail(message: object) -> NoReturn:
  """Prints `error: <message>` on stderr and exits with status 2."""
  sys.stdout.flush()
  print(f'error: {one_line(message)}', file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with its errors (and config override errors) as one line."""
  try:
    rest = flags.FLAGS(argv)
    _check_config_flags(argv)
    return rest
  except flags.Error as e:
    if _debug(argv):
      raise
    fail(_flag_error_message(e))
  except OSError as e:   # a config file that cannot be loaded
    if _debug(argv):
      raise
    fail(_last_exception_line(str(e)))
  except (KeyError, AttributeError, ValueError, TypeError) as e:
    # ml_collections' config_flags applies `--config.a.b=v` while parsing: a
    # misspelt key or an unparsable value surfaces here.
    if _debug(argv):
      raise
    fail(_config_flag_message(argv, e))


def _check_config_flags(argv: Sequence[str]) -> None:
  """ml_collections defers a config file's load errors to the first use: use it now."""
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if type(flag).__name__ == '_ConfigFlag' and flag.value is not None:
      getattr(flag.value, 'keys')   # a config that failed to load raises here


def _last_exception_line(text: str) -> str:
  """`SomeError: message` of a traceback quoted inside a message, else the message."""
  lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
  if any(line.startswith('Traceback') for line in lines):
    for line in reversed(lines):
      if ': ' in line and line.split(': ', 1)[0].replace('.', '').isidentifier():
        return line.split(': ', 1)[1]
  if lines and 'Failed loading config file' in lines[0]:
    reasons = [line for line in lines if line.startswith('[Errno')]
    tried = [line for line in lines[1:] if not line.startswith(('Attempted', '[Errno'))]
    reason = reasons[0].split('] ', 1)[-1].split(':')[0] if reasons else ' '.join(lines[1:])
    return f'cannot load config file {", ".join(tried) or "?"}: {reason}'

  return ' '.join(lines)


def _flag_error_message(error: Exception) -> str:
  text = str(error)
  if 'Traceback' in text:   # the config file's own error, e.g. a bad `:preset,key=value`
    return _last_exception_line(text)
  return one_line(text)


def _config_flag_message(argv: Sequence[str], error: Exception) -> str:
  """A misspelt or unparsable `--config.a.b=v`, naming the keys that do exist."""
  text = one_line(error).strip('"\'')
  overrides = [a.split('=', 1)[0][2:] for a in argv[1:] if a.startswith('--config.')]
  if isinstance(error, (KeyError, AttributeError)):
    for dotted in overrides:
      valid = _missing_key_siblings(argv, dotted)
      if valid is not None:
        where, part, keys = valid
        return (f'unknown config key --{dotted}: {where} has no {part!r}; '
                f'valid keys: {keys}')
    return f'unknown config key in {" ".join(overrides) or "the flags"}: {text}'
  return f'bad config flag value ({" ".join(overrides) or "the flags"}): {text}'


def _load_config_arg(argv: Sequence[str], name: str):
  """The config that `--<name>=file.py:arg` gives (the flag's value may not be set yet)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  try:
    text = [a for a in argv if a.startswith(f'--{name}=')][-1].split('=', 1)[1]
    path, _, arg = text.partition(':')
    spec = importlib.util.spec_from_file_location(f'_strata_config_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None   # only used to list valid keys in a message


def _missing_key_siblings(argv: Sequence[str], dotted: str) -> tuple[str, str, list[str]] | None:
  """For 'config.a.b': (where, missing part, keys there) if the path does not exist."""
  name, *parts = dotted.split('.')
  node = _load_config_arg(argv, name)
  if node is None:
    return None
  for depth, part in enumerate(parts):
    keys = sorted(node.keys()) if hasattr(node, 'keys') else []
    if part not in keys:
      return '.'.join([name] + parts[:depth]), part, keys
    node = node[part]
  return None


def run(main: Callable[[list[str]], object]) -> None:
  """`absl.app.run(main)` with user errors reported as one line (module docstring)."""
  flags.DEFINE_bool('debug', False, 'Show the traceback of errors caused by input too.')

  def checked_main(argv: list[str]) -> object:
    try:
      return main(argv)
    except UserError as e:
      if flags.FLAGS.debug or flags.FLAGS.verbosity >= 1:
        raise
      fail(e)
    except KeyboardInterrupt:   # a second Ctrl-C: the user asked to abort, not a bug
      if flags.FLAGS.debug:
        raise
      print('\naborted (Ctrl-C).', file=sys.stderr, flush=True)
      sys.exit(130)

  app.run(checked_main, flags_parser=_parse_flags)
