"""Workdir paths that may be local folders or Cloud Storage URLs (`gs://bucket/run`).

On a Cloud TPU pod every host writes to the same `gs://` workdir, so run and
data workdirs are `etils.epath.Path`s: epath sends `gs://` through gcsfs (or
`tf.io.gfile` when TensorFlow is installed) and local paths through `os`.
A local path is made absolute (so config.json names the same folder from any
directory); a URL is kept as written, since `os.path.abspath('gs://b/r')`
would turn it into the local folder `./gs:/b/r`.
"""

from __future__ import annotations

import os

from etils import epath

# Schemes epath routes to a remote backend; everything else is a local path.
REMOTE_SCHEMES = ('gs://', 's3://', 'az://', 'hf://')


def is_remote(path: str | os.PathLike[str]) -> bool:
  """True for a `gs://`-style URL, False for a local path."""
  return os.fspath(path).startswith(REMOTE_SCHEMES)


def resolve(path: str | os.PathLike[str]) -> epath.Path:
  """`path` as an epath.Path: absolute if local, untouched if a URL."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.abspath(text))


def resolve_str(path: str | os.PathLike[str]) -> str:
  """`resolve` as a string (`gs://...` keeps its scheme), for configs and Orbax."""
  return os.fspath(resolve(path))


def write_text_atomic(path: epath.Path, text: str) -> None:
  """Replaces the file at `path` whole, so a reader never sees half of it.

  Locally through a temporary file and a rename; a Cloud Storage object
  already appears whole or not at all, so it is written directly.
  """
  if is_remote(path):
    path.write_text(text)
    return
  tmp = path.parent / (path.name + '.tmp')
  tmp.write_text(text)
  tmp.replace(path)
