"""Peak host memory of `train.convert import` (and `export`) on a random checkpoint.

  python -m benchmarks.convert_memory --preset=1b --hf_dtype=bfloat16 --param_dtype=float32

Writes a random Hugging Face Llama checkpoint of a pre-training preset's shape
(`config.json` and one `model.safetensors`, generated tensor by tensor with
numpy; no PyTorch), then runs `python -m train.convert import` on it in a
child process and reads that process's peak resident set size from the
kernel (`os.wait4`'s rusage `ru_maxrss`), and the same for `export` of the
imported run. For scale it also measures the same import of a `tiny`-shaped
checkpoint: what a conversion costs before any parameter (Python, JAX, Orbax).

Prints one JSON object: parameter count, file and parameter bytes, and per
command the peak RSS, the wall time, and the peak above the tiny baseline in
units of the run's parameter bytes (1.0 = the parameters held once).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import cli
from configs import pretrain
from model import config as model_config_lib
from model import transformer
from train import convert
from train import hf_files

_PRESET = flags.DEFINE_string('preset', '1b', 'configs/pretrain.py preset giving the shape.')
_HF_DTYPE = flags.DEFINE_enum('hf_dtype', 'bfloat16', ['float32', 'bfloat16', 'float16'],
                              'dtype of the generated checkpoint file.')
_PARAM_DTYPE = flags.DEFINE_enum('param_dtype', 'float32', ['float32', 'bfloat16', 'float16'],
                                 'the imported run\'s param_dtype.')
_DIR = flags.DEFINE_string('dir', None, 'Scratch directory (default: a new temporary one, '
                           'deleted at the end).')
_EXPORT = flags.DEFINE_bool('export', True, 'Also measure export of the imported run.')

GIB = 2**30


def write_random_checkpoint(cfg: model_config_lib.ModelConfig, hf_dir: str, dtype: str,
                            seed: int = 0) -> int:
  """A random LlamaForCausalLM directory of `cfg`'s shape; returns the file's bytes."""
  os.makedirs(hf_dir, exist_ok=True)
  file_dtype = hf_files.DTYPES[dtype]
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = jax.eval_shape(transformer.Transformer(cfg).init, jax.random.key(0), tokens)
  entries = convert.hf_entries(cfg, nn.meta.unbox(shapes['params']), file_dtype)
  rng = np.random.default_rng(seed)
  path = os.path.join(hf_dir, hf_files.WEIGHTS_FILE)
  writer = hf_files.SafetensorsWriter(path, entries)
  for name, shape, _ in entries:
    value = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    if name.endswith('norm.weight'):
      value += 1.0
    writer.write(name, value.astype(file_dtype))
    del value
  writer.close()
  hf = convert.hf_config_from_model(cfg, {'bos_token_id': 1, 'eos_token_id': 2}, dtype)
  with open(os.path.join(hf_dir, convert.HF_CONFIG_FILE), 'w') as f:
    json.dump(hf, f, indent=2)
  return os.path.getsize(path)


def measure(argv: list[str]) -> dict[str, float]:
  """Runs `python -m train.convert ARGV` as a child; its peak RSS (GiB) and wall time."""
  start = time.perf_counter()
  process = subprocess.Popen([sys.executable, '-m', 'train.convert', *argv],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, JAX_PLATFORMS='cpu'))
  output = process.stdout.read()
  _, status, usage = os.wait4(process.pid, 0)
  process.returncode = os.waitstatus_to_exitcode(status)
  if process.returncode:
    raise RuntimeError(f'train.convert {argv[0]} failed ({process.returncode}):\n{output}')
  # Linux reports ru_maxrss in KiB.
  return {'peak_rss_gib': usage.ru_maxrss * 1024 / GIB,
          'wall_s': time.perf_counter() - start}


def model_config(preset: str) -> model_config_lib.ModelConfig:
  config = pretrain.get_config(preset)
  # The shape of a Hugging Face Llama: no input multiplier.
  config.model.scale_embeddings = False
  return model_config_lib.ModelConfig.from_config(config.model)


def main(argv: list[str]) -> None:
  del argv
  root = _DIR.value or tempfile.mkdtemp(prefix='strata_convert_bench_')
  os.makedirs(root, exist_ok=True)
  try:
    results: dict[str, object] = {'preset': _PRESET.value, 'hf_dtype': _HF_DTYPE.value,
                                  'param_dtype': _PARAM_DTYPE.value}
    cfg = model_config(_PRESET.value)
    num_params = model_config_lib.num_params(cfg)
    param_bytes = num_params * np.dtype(_PARAM_DTYPE.value).itemsize
    results.update(num_params=num_params, param_gib=param_bytes / GIB)

    def import_run(cfg, name):
      hf_dir, workdir = os.path.join(root, f'{name}_hf'), os.path.join(root, f'{name}_run')
      start = time.perf_counter()
      file_bytes = write_random_checkpoint(cfg, hf_dir, _HF_DTYPE.value)
      written_s = time.perf_counter() - start
      result = measure(['import', f'--hf_dir={hf_dir}', f'--workdir={workdir}',
                        f'--param_dtype={_PARAM_DTYPE.value}'])
      shutil.rmtree(hf_dir)
      return workdir, dict(result, file_gib=file_bytes / GIB, generate_s=written_s)

    tiny_run, baseline = import_run(model_config('tiny'), 'tiny')
    shutil.rmtree(tiny_run)
    results['baseline_tiny_import'] = baseline
    workdir, imported = import_run(cfg, _PRESET.value)
    above = imported['peak_rss_gib'] - baseline['peak_rss_gib']
    imported['above_baseline_in_param_bytes'] = above * GIB / param_bytes
    results['import'] = imported
    if _EXPORT.value:
      out = os.path.join(root, f'{_PRESET.value}_exported')
      exported = measure(['export', f'--workdir={workdir}', f'--hf_dir={out}'])
      above = exported['peak_rss_gib'] - baseline['peak_rss_gib']
      exported['above_baseline_in_param_bytes'] = above * GIB / param_bytes
      results['export'] = exported
    print(json.dumps(results, indent=2), flush=True)
  finally:
    if not _DIR.value:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  cli.run(main)
