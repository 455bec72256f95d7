"""Compiles the real train step for a TPU slice that is not here, and says if it fits.

    pip install -e '.[tpu]'    # brings libtpu; compiling needs no TPU attached
    python -m benchmarks.compile --config=configs/pretrain.py:7b --topology=v5p:4x4x4
    python -m benchmarks.compile --config=configs/pretrain.py:1b,batch_size=64 --topology=v5p:2x2x1
    python -m benchmarks.compile --config=configs/sft.py:7b,lora.rank=16 --topology=v5p:2x2x1

`jax.experimental.topologies` describes the chips of a TPU topology; the mesh,
the train state and the batch are built over them as `jax.ShapeDtypeStruct`s
with shardings (nothing is allocated), and the train step, with the splash
attention kernel, is lowered and compiled by libtpu on this CPU host. XLA's
memory analysis of the compiled step gives the bytes each chip needs; they are
compared with the chip's HBM. Prints one JSON object.

A config with `lora.rank` > 0 (a fine-tuning stage's) compiles the LoRA step:
the state holds the adapters, the base params are the step's frozen argument
(train/lora.py). An SFT config's batch carries its `loss_mask`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from typing import Any, Sequence

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from configs import cli
from train import console

GiB = 1024**3

# HBM per JAX device (a chip; a TensorCore on v2/v3, which show each core as a device).
HBM_BYTES = {
    'v2': 8 * GiB,
    'v3': 16 * GiB,
    'v4': 32 * GiB,
    'v5e': 16 * GiB,
    'v5litepod': 16 * GiB,
    'v5p': 95 * GiB,
    'v6e': 32 * GiB,
}

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Pre-training config and preset, e.g. configs/pretrain.py:7b.',
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    'topology', 'v5p:2x2x1', 'GENERATION:SHAPE of one slice, e.g. v4:2x2x1, v5p:4x4x4, v5e:4x4.')
_NUM_SLICES = flags.DEFINE_integer(
    'num_slices', 1, 'Slices joined over DCN; the mesh puts `data` across them.')
_CHIP_CONFIG = flags.DEFINE_string(
    'chip_config_name', '', "libtpu chip config; '' = 'megacore' on v4/v5p (one device per "
    "chip, as on a real VM), else 'default'.")
_CHIPS_PER_HOST = flags.DEFINE_list(
    'chips_per_host_bounds', [], 'e.g. 1,1,1 for slices smaller than a host (v5e:1x1).')
_ATTENTION = flags.DEFINE_string(
    'attention_impl', 'splash', "Overrides model.attention_impl ('' keeps the config's).")
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the JSON to this file.')
flags.mark_flags_as_required(['config'])


def generation(topology: str) -> str:
  """'v5p:4x4x4' -> 'v5p'."""
  name = topology.split(':', 1)[0].lower()
  if not name.startswith('v'):
    raise ValueError(f'--topology {topology!r}: expected GENERATION:SHAPE, e.g. v5p:4x4x4.')
  return name


def hbm_bytes(topology: str) -> int | None:
  return HBM_BYTES.get(generation(topology))


def topology_devices(topology: str, num_slices: int = 1, chip_config_name: str = '',
                     chips_per_host_bounds: Sequence[int] = ()) -> list[jax.Device]:
  """Compile-only devices of a TPU topology (needs libtpu, not a TPU)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if not chip_config_name:
    # v4 and v5p chips have two TensorCores that JAX drives as one device.
    chip_config_name = 'megacore' if generation(topology) in ('v4', 'v5p') else 'default'
  kwargs = {}
  if chips_per_host_bounds:
    kwargs['chips_per_host_bounds'] = tuple(int(x) for x in chips_per_host_bounds)
  try:
    desc = topologies.get_topology_desc(
        platform='tpu', topology_name=topology, chip_config_name=chip_config_name,
        num_slices=num_slices, **kwargs)
  except RuntimeError as e:
    if 'TPU support not installed' in str(e) or 'libtpu' in str(e).lower():
      raise RuntimeError(
          "libtpu is not installed: pip install -e '.[tpu]' (or 'jax[tpu]') to compile for "
          'TPU topologies.') from e
    raise
  return list(desc.devices)


def abstract_batch(config: Any, batch_sharding: jax.sharding.Sharding) -> dict[str, Any]:
  shape = (int(config.batch_size), int(config.seq_len))
  fields = ('tokens', 'segment_ids', 'positions') + (('loss_mask',) if config.get('chat') else ())
  return {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding)
          for name in fields}


def compile_train_step(config: Any, devices: Sequence[jax.Device]) -> dict[str, Any]:
  """Lowers and compiles the train step over `devices`; returns sizes and timings."""
  from model import config as model_config_lib  # pylint: disable=g-import-not-at-top
  from model import transformer  # pylint: disable=g-import-not-at-top
  from train import lora as lora_lib  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import state as state_lib  # pylint: disable=g-import-not-at-top
  from train import steps as steps_lib  # pylint: disable=g-import-not-at-top

  mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
  rules = mesh_lib.logical_rules(config.mesh)
  model_cfg = model_config_lib.ModelConfig.from_config(config.model)
  model = transformer.Transformer(model_cfg)

  start = time.perf_counter()
  # The parameters do not depend on the attention kernel; initialising with
  # 'xla' keeps the (traced, never run) init off the TPU-only splash path,
  # which on this CPU host would see the CPU backend.
  init_model = transformer.Transformer(dataclasses.replace(model_cfg, attention_impl='xla'))
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  lora_cfg = lora_lib.LoraConfig.from_config(config)
  if lora_cfg is None:
    abstract_state, state_shardings = state_lib.abstract_state(config, init_model, mesh)
    model_params = abstract_state.params
    step = steps_lib.make_train_step(config, model, mesh, state_shardings, batch_sharding)
  else:
    lora = lora_lib.setup(config, init_model, mesh, lora_cfg)
    abstract_state, state_shardings = lora.abstract_state, lora.state_shardings
    model_params = lora.base_abstract
    step = steps_lib.make_train_step(
        config, model, mesh, state_shardings, batch_sharding,
        loss_fn=lora_lib.wrap_loss(steps_lib.default_loss(config, model), lora.spec),
        frozen={'base': lora.base_abstract}, frozen_shardings={'base': lora.base_shardings})
  lowered = step.lower(abstract_state, abstract_batch(config, batch_sharding))
  lower_seconds = time.perf_counter() - start
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(model_params))
  data_parallel = mesh.shape['data'] * mesh.shape['fsdp']
  report = {
      'num_devices': len(devices),
      'mesh': dict(mesh.shape),
      'num_params': int(num_params),
      'trainable_params': state_lib.trainable_params(abstract_state),
      'optimizer_bytes': state_lib.optimizer_bytes(abstract_state),
      'lora_rank': 0 if lora_cfg is None else lora_cfg.rank,
      'global_batch': int(config.batch_size),
      'batch_per_chip': config.batch_size / len(devices),
      'batch_per_data_shard': config.batch_size / data_parallel,
      'seq_len': int(config.seq_len),
      'remat_policy': model_cfg.remat_policy,
      'attention_impl': model_cfg.attention_impl,
      'dtype': model_cfg.dtype,
      'grad_accum_steps': int(config.optimizer.grad_accum_steps),
      'lower_seconds': round(lower_seconds, 2),
  }
  start, start_cpu = time.perf_counter(), time.process_time()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program whose buffers exceed HBM; that is an
    # answer ("does not fit"), not a failure of this tool.
    message = str(e).strip().splitlines()[0]
    if 'RESOURCE_EXHAUSTED' not in message:
      raise
    required = re.search(r'required for [^(]*\(([0-9.]+)G\)', message)
    report.update(fits=False, compile_error=message[:500],
                  required_gib=float(required.group(1)) if required else None,
                  compile_seconds=round(time.perf_counter() - start, 2),
                  compile_cpu_seconds=round(time.process_time() - start_cpu, 2))
    return report
  compile_seconds = time.perf_counter() - start
  # CPU time too: wall time on a shared or small host says little.
  compile_cpu_seconds = time.process_time() - start_cpu

  mem = compiled.memory_analysis()
  # Pallas kernels (splash attention) appear as TPU custom calls in the executable.
  tpu_custom_calls = compiled.as_text().count('custom_call_target="tpu_custom_call"')
  sizes = {
      'argument': int(mem.argument_size_in_bytes),
      'output': int(mem.output_size_in_bytes),
      # Donated state: outputs reuse the argument buffers, counted once.
      'alias': int(mem.alias_size_in_bytes),
      'temp': int(mem.temp_size_in_bytes),
      'generated_code': int(mem.generated_code_size_in_bytes),
  }
  sizes['total'] = (sizes['argument'] + sizes['output'] - sizes['alias'] + sizes['temp']
                    + sizes['generated_code'])
  report.update({
      'tpu_custom_calls': tpu_custom_calls,
      'bytes_per_chip': sizes,
      'gib_per_chip': {k: round(v / GiB, 3) for k, v in sizes.items()},
      'compile_seconds': round(compile_seconds, 2),
      'compile_cpu_seconds': round(compile_cpu_seconds, 2),
  })
  return report


def run(config: Any, topology: str, *, num_slices: int = 1, chip_config_name: str = '',
        chips_per_host_bounds: Sequence[int] = (),
        attention_impl: str = 'splash') -> dict[str, Any]:
  """The report for `config` compiled for `num_slices` slices of `topology`."""
  config = config.copy_and_resolve_references() if hasattr(config, 'copy_and_resolve_references') \
      else config
  with config.unlocked():
    if attention_impl:
      config.model.attention_impl = attention_impl
    config.mesh.num_slices = num_slices
  devices = topology_devices(topology, num_slices, chip_config_name, chips_per_host_bounds)
  report = {'preset': config.get('preset'), 'topology': topology, 'num_slices': num_slices,
            'device_kind': devices[0].device_kind}
  report.update(compile_train_step(config, devices))
  hbm = hbm_bytes(topology)
  report['hbm_per_chip_gib'] = None if hbm is None else round(hbm / GiB, 1)
  if 'fits' not in report:
    report['fits'] = None if hbm is None else report['bytes_per_chip']['total'] <= hbm
  return report


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  console.quiet_libraries()  # library INFO logs would bury the report
  # The host's own backend stays CPU: libtpu is used for compiling only.
  jax.config.update('jax_platforms', 'cpu')
  report = run(_CONFIG.value, _TOPOLOGY.value, num_slices=_NUM_SLICES.value,
               chip_config_name=_CHIP_CONFIG.value,
               chips_per_host_bounds=_CHIPS_PER_HOST.value, attention_impl=_ATTENTION.value)
  text = json.dumps(report, indent=2)
  print(text, flush=True)
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      f.write(text + '\n')
  if report['fits'] is False:
    needed = report['gib_per_chip']['total'] if 'gib_per_chip' in report else \
        f"{report.get('required_gib')} (temporaries alone)"
    print(f"does not fit: {needed} GiB per chip > {report['hbm_per_chip_gib']} GiB HBM",
          file=sys.stderr)


if __name__ == '__main__':
  cli.run(main)
