"""A Hugging Face checkpoint's safetensors files, read slice by slice, written tensor by tensor.

`CheckpointFiles` indexes a model directory (`model.safetensors`, or the
shards that `model.safetensors.index.json` names) and reads any slice of any
tensor through safetensors' numpy API (bfloat16 as `ml_dtypes.bfloat16`).
`SafetensorsWriter` writes one file a tensor at a time, so an export never
holds more than one tensor on the host. train/convert.py maps the tensors.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

from etils import epath
import ml_dtypes
import numpy as np

from configs.cli import UserError, one_line

WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# safetensors dtype codes <-> numpy dtypes and their names.
FILE_DTYPES = {'F32': np.dtype(np.float32), 'BF16': np.dtype(ml_dtypes.bfloat16),
               'F16': np.dtype(np.float16)}
DTYPE_NAMES = {'F32': 'float32', 'BF16': 'bfloat16', 'F16': 'float16'}
DTYPES = {name: FILE_DTYPES[code] for code, name in DTYPE_NAMES.items()}
# Tensors some checkpoints carry that hold nothing a model needs (recomputed RoPE tables).
IGNORED_SUFFIXES = ('.rotary_emb.inv_freq',)


class CheckpointFiles:
  """The tensors of a Hugging Face checkpoint directory: where each is, its shape and dtype.

  Each read opens the file for that read only: a memory map kept open would
  keep every page read so far resident, a second copy of the checkpoint in
  the process's memory.
  """

  def __init__(self, hf_dir: str):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    self._safe_open = safe_open
    directory = epath.Path(hf_dir)
    index = directory / INDEX_FILE
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())['weight_map']
      except (ValueError, KeyError, TypeError) as e:
        raise UserError(f'{index}: not a safetensors index with a "weight_map" ({e}).') from None
      files = sorted(set(weight_map.values()))
      where = str(index)
    elif (directory / WEIGHTS_FILE).exists():
      files, where = [WEIGHTS_FILE], str(directory / WEIGHTS_FILE)
    else:
      others = sorted(p.name for p in directory.glob('*.bin')) if directory.is_dir() else []
      hint = (f' (it has {", ".join(others)}: PyTorch pickles are not read; save the model '
              'with safe_serialization=True)' if others else '')
      raise UserError(f'--hf_dir={hf_dir}: no {WEIGHTS_FILE} or {INDEX_FILE}{hint}.')
    self.where = where
    self.info: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for name in files:
      path = os.fspath(directory / name)
      if not os.path.isfile(path):
        raise UserError(f'{where} names the file {name}, which is not in {hf_dir}.')
      try:
        with safe_open(path, framework='numpy') as f:
          for key in f.keys():
            piece = f.get_slice(key)
            self.info[key] = (path, tuple(piece.get_shape()), piece.get_dtype())
      except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f'{path}: not a readable safetensors file ({one_line(e)}).') from None

  def check(self, expected: dict[str, tuple[int, ...]], ignored: set[str]) -> None:
    """Every expected tensor is there with its shape and a float dtype; nothing else is."""
    for name, shape in expected.items():
      if name not in self.info:
        raise UserError(f'{self.where}: the tensor {name} is missing.')
      path, found, dtype = self.info[name]
      if found != tuple(shape):
        raise UserError(f'{path}: the tensor {name} has shape {list(found)}, but config.json '
                        f'gives {list(shape)}.')
      if dtype not in FILE_DTYPES:
        raise UserError(f'{path}: the tensor {name} is {dtype}; only '
                        f'{", ".join(FILE_DTYPES)} are read.')
    extra = sorted(n for n in self.info if n not in expected and n not in ignored
                   and not n.endswith(IGNORED_SUFFIXES))
    if extra:
      more = f' and {len(extra) - 3} more' if len(extra) > 3 else ''
      raise UserError(f'{self.where}: the tensor(s) {", ".join(extra[:3])}{more} have no place '
                      'in a Llama without biases; is config.json this checkpoint\'s?')

  def dtype_name(self, name: str) -> str:
    """'float32' | 'bfloat16' | 'float16' of a tensor."""
    return DTYPE_NAMES[self.info[name][2]]

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """`tensor[index]` as numpy; the file is mapped only during the read."""
    with self._safe_open(self.info[name][0], framework='numpy') as f:
      return np.asarray(f.get_slice(name)[index])


class SafetensorsWriter:
  """Writes a safetensors file one tensor at a time, in the order of `entries`.

  The format: an 8-byte little-endian header length, a JSON header (name ->
  dtype, shape, [begin, end) byte offsets into the data) padded with spaces to
  a multiple of 8, then the tensors' bytes back to back. The header depends
  only on names, shapes and dtypes, so it is written first and each tensor's
  bytes follow as it is produced.
  """

  def __init__(self, path: str, entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
               metadata: dict[str, str] | None = None):
    codes = {v: k for k, v in FILE_DTYPES.items()}
    header: dict[str, Any] = {'__metadata__': metadata or {'format': 'pt'}}
    offset = 0
    self._expected = []
    for name, shape, dtype in entries:
      size = math.prod(shape) * np.dtype(dtype).itemsize
      header[name] = {'dtype': codes[np.dtype(dtype)], 'shape': list(shape),
                      'data_offsets': [offset, offset + size]}
      self._expected.append((name, tuple(shape), np.dtype(dtype)))
      offset += size
    text = json.dumps(header, separators=(',', ':')).encode()
    text += b' ' * (-len(text) % 8)
    self._file = open(path, 'wb')
    self._file.write(len(text).to_bytes(8, 'little') + text)
    self._next = 0

  def write(self, name: str, array: np.ndarray) -> None:
    want = self._expected[self._next]
    if (name, tuple(array.shape), array.dtype) != want:
      raise ValueError(f'safetensors writer: got {name} {array.shape} {array.dtype}, '
                       f'expected {want}')
    # The array's own bytes, without the copy `tobytes` would make.
    self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    self._next += 1

  def close(self) -> None:
    self._file.close()
    if self._next != len(self._expected):
      raise ValueError(f'safetensors writer: {len(self._expected) - self._next} tensors '
                       'were not written')
