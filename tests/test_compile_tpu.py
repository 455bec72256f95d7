"""Ahead-of-time compilation for a TPU slice on this CPU host, and the 7b parameter count.

The compile tests need libtpu. They run `python -m benchmarks.compile` in a
subprocess, with JAX_PLATFORMS=cpu so libtpu only describes the topology, and
find libtpu in one of three places: a folder named by `STRATA_LIBTPU_PATH`
(`make test` installs the wheel there with `pip install --target`, so the venv
the demo uses stays without it), a Python named by `STRATA_TPU_PYTHON` (a venv
with `pip install -e '.[tpu]'`), or the test's own environment. With none of
them they are skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LLaMA-2 7B: 32 x (4 * 4096^2 attention + 3 * 4096 * 11008 MLP + 2 * 4096 norms)
# + 2 * 32000 * 4096 (embedding and head) + 4096 (final norm).
LLAMA2_7B_PARAMS = 6_738_415_616


def _tpu_command() -> tuple[str, dict[str, str]]:
  """The Python that has libtpu and the environment to run it in; skips without one."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  libtpu_path = os.environ.get('STRATA_LIBTPU_PATH')
  if libtpu_path and os.path.isdir(os.path.join(libtpu_path, 'libtpu')):
    env['PYTHONPATH'] = os.pathsep.join([REPO, libtpu_path])
    return sys.executable, env
  if os.environ.get('STRATA_TPU_PYTHON'):
    return os.environ['STRATA_TPU_PYTHON'], env
  if importlib.util.find_spec('libtpu') is not None:
    return sys.executable, env
  pytest.skip("libtpu is not installed (pip install -e '.[tpu]', or set STRATA_LIBTPU_PATH / "
              'STRATA_TPU_PYTHON): cannot compile for a TPU topology on CPU.')


def test_7b_abstract_state_has_the_llama2_parameter_count():
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from configs import pretrain  # pylint: disable=g-import-not-at-top
  from model import config as model_config_lib  # pylint: disable=g-import-not-at-top
  from model import transformer  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import state as state_lib  # pylint: disable=g-import-not-at-top

  config = pretrain.get_config('7b,model.attention_impl=xla')
  with config.unlocked():
    config.mesh.update(dict(data=1, fsdp=1, tensor=1))
  mesh = mesh_lib.make_mesh(config.mesh, devices=jax.devices()[:1])
  model_cfg = model_config_lib.ModelConfig.from_config(config.model)
  abstract, _ = state_lib.abstract_state(config, transformer.Transformer(model_cfg), mesh)
  counted = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  assert counted == LLAMA2_7B_PARAMS == model_config_lib.num_params(model_cfg)
  # Adam moments mirror every parameter (the optimizer state is 2x the params).
  moments = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.opt_state)
                if x.ndim > 0)
  assert moments == 2 * LLAMA2_7B_PARAMS


def test_small_train_step_compiles_for_v5p_2x2x1_with_splash(tmp_path):
  python, env = _tpu_command()
  out = tmp_path / 'compile.json'
  proc = subprocess.run(
      # Layers scanned, as TPU runs have them (the CPU preset unrolls them): one compiled
      # block instead of eight takes the compile from ~3 minutes to ~1. Two layers, seq 256
      # and a 2,048 vocabulary take it from 65 to 49 s of CPU (same kernels, same checks).
      [python, '-m', 'benchmarks.compile',
       '--config=configs/pretrain.py:small,model.scan_layers=True,model.num_layers=2,'
       'model.vocab_size=2048,seq_len=256,model.max_len=256',
       '--topology=v5p:2x2x1', f'--output={out}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  report = json.loads(out.read_text())
  assert report['num_devices'] == 4 and report['device_kind'].startswith('TPU v5')
  assert report['attention_impl'] == 'splash'
  assert report['tpu_custom_calls'] > 0  # the splash kernels are in the executable
  sizes = report['bytes_per_chip']
  # The fp32 state (params + 2 Adam moments = 3 x 6.9M x 4 bytes, replicated) is an argument.
  assert sizes['argument'] >= 3 * report['num_params'] * 4
  assert sizes['temp'] > 0 and sizes['total'] > sizes['argument']
  assert report['hbm_per_chip_gib'] == 95.0 and report['fits'] is True


def test_a_config_that_does_not_fit_reports_fits_false(tmp_path):
  python, env = _tpu_command()
  out = tmp_path / 'compile.json'
  # 1024 rows of 512 tokens on one 16 GiB v5e chip: the logits alone need more.
  proc = subprocess.run(
      [python, '-m', 'benchmarks.compile',
       '--config=configs/pretrain.py:tiny,batch_size=1024,seq_len=512,model.max_len=512',
       '--topology=v5e:1x1', '--chips_per_host_bounds=1,1,1', f'--output={out}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-5000:]
  report = json.loads(out.read_text())
  assert report['fits'] is False and report['hbm_per_chip_gib'] == 16.0
  assert report['required_gib'] > 16.0
  assert 'does not fit' in proc.stderr


def test_multislice_mesh_puts_data_across_slices():
  python, env = _tpu_command()
  code = '\n'.join([
      'import json, ml_collections',
      'from benchmarks import compile as compile_lib',
      'from train import mesh as mesh_lib',
      "devices = compile_lib.topology_devices('v5e:2x2', num_slices=2)",
      "cfg = ml_collections.ConfigDict(dict(data=2, fsdp=-1, tensor=1, num_slices=2))",
      'mesh = mesh_lib.make_mesh(cfg, devices=devices)',
      "print('RESULT', json.dumps({'shape': dict(mesh.shape), 'slices': "
      "[sorted({d.slice_index for d in row.flat}) for row in mesh.devices]}))",
  ])
  proc = subprocess.run([python, '-c', code], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-5000:]
  [line] = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  result = json.loads(line[len('RESULT '):])
  assert result['shape'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  # Each index of `data` is one whole slice: only the data all-reduce crosses DCN.
  assert result['slices'] == [[0], [1]]
