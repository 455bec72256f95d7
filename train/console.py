"""What an entry point's console shows: results, progress and warnings.

Orbax, TFDS and Grain log through absl at INFO: opening one checkpoint prints
about forty lines (CheckpointManager options, handler registries, "Closing
_NonBlockingMetadataStore", read throughput) and every TFDS dataset opened
prints two more. Every entry point calls `quiet_libraries()` first thing in
its `main`, which keeps WARNING and above. `--verbosity=0` (absl's own flag)
brings the INFO logs back, `--verbosity=1` adds DEBUG (and tracebacks of user
errors, see `configs.cli`).

Logs go to stderr; results (a benchmark's JSON, a sample, an eval line) go to
stdout, so a program can read stdout whatever the verbosity.
"""

from __future__ import annotations

import logging as py_logging

from absl import flags
from absl import logging


class _ReadOnlyCheckpointNotes(py_logging.Filter):
  """Drops Orbax's warnings that a checkpoint was opened read-only.

  generate/evaluate open the run's checkpoints read-only on purpose, and Orbax
  warns about it again and again ("read_only=True, setting save_interval_steps=0",
  "Given directory is read only"); nothing for a user to act on.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.ERROR or 'orbax' not in record.pathname:
      return True
    message = record.getMessage()
    return 'read_only=True' not in message and 'is read only' not in message


_READ_ONLY_NOTES = _ReadOnlyCheckpointNotes()


def requested_verbosity() -> int | None:
  """The `--verbosity` the user gave on the command line, or None."""
  if flags.FLAGS.is_parsed() and flags.FLAGS['verbosity'].present:
    return flags.FLAGS.verbosity
  return None


def quiet_libraries(verbosity: int | None = None) -> None:
  """Keeps library logs at WARNING unless the user asked for more (module docstring).

  verbosity: absl's scale (0 INFO, 1 DEBUG, -1 WARNING); None means the
  command line's `--verbosity` if given, else the quiet default.
  """
  if verbosity is None:
    verbosity = requested_verbosity()
  handler = logging.get_absl_handler()
  if verbosity is not None:
    # The user chose: show what they asked for, Orbax's notes included.
    logging.set_verbosity(verbosity)
    handler.removeFilter(_READ_ONLY_NOTES)
    return
  # All of them log through absl's logger, so its level is the one switch.
  logging.set_verbosity(logging.WARNING)
  handler.addFilter(_READ_ONLY_NOTES)   # a no-op when already added
