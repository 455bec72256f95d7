"""Prefill and decode throughput of the KV-cache sampler, and its speed-up over recomputing.

  python -m benchmarks.decode --workdir=runs/tiny                   # a trained run
  python -m benchmarks.decode --config=configs/pretrain.py:tiny     # random parameters

Prints one JSON object. For batch 1 and batch 16 (`--batch_sizes`):
  prefill tokens/s = batch x prompt_len / (time of generate with 1 new token), and
  decode tokens/s  = batch x (N - 1) / (time with N new tokens - time with 1),
so the prefill is not counted in the decode rate. Then, at batch 1 and
`--speedup_new_tokens=256` new tokens, the time of `model.decode.generate`
against `generate_uncached` (the full forward pass recomputed at every step,
the same jitted loop otherwise). No EOS, so every run produces every token.
Times are medians over `--repeats` runs after a compiling warm-up.

The KV cache is sized to prompt + new tokens; where that exceeds the model's
`max_len` (tiny: 256) the benchmark raises `max_len`, which changes no
parameter (RoPE takes any position) -- the speed is what is measured here.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from configs import cli
from model import decode
from model.config import ModelConfig, num_params
from model.transformer import Transformer
from train import console
from train import mesh as mesh_lib
from train import state as state_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Pre-training config (random parameters), e.g. configs/pretrain.py:tiny.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained run (its latest checkpoint).')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '16'], 'Batch sizes to measure.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 128, 'Prompt tokens per row.')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 128, 'New tokens per row for the decode rate.')
_SPEEDUP_NEW = flags.DEFINE_integer('speedup_new_tokens', 256,
                                    'New tokens for the cached vs uncached comparison.')
_SPEEDUP_PROMPT = flags.DEFINE_integer('speedup_prompt_len', 16,
                                       'Prompt tokens for the cached vs uncached comparison.')
_SPEEDUP_BATCH = flags.DEFINE_integer('speedup_batch', 1, 'Batch for the comparison.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed runs per measurement (median).')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'Sampling temperature.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'Sampling top-k.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'Sampling top-p.')
_OUTPUT = flags.DEFINE_string('output', None, 'Also write the JSON to this file.')


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _load() -> tuple[Any, Transformer, Any, jax.sharding.Mesh, str]:
  if _WORKDIR.value:
    from train import run_dir  # pylint: disable=g-import-not-at-top
    config, model, params, _, mesh = run_dir.load_run(_WORKDIR.value)
    return config, model, params, mesh, f'{_WORKDIR.value} step {config.checkpoint_step}'
  if _CONFIG.value is None:
    raise app.UsageError('Give --workdir (a trained run) or --config (random parameters).')
  config = _CONFIG.value
  model = Transformer(ModelConfig.from_config(config.model))
  mesh = mesh_lib.make_mesh(config.mesh)
  shardings = state_lib.param_shardings(config, model, mesh)
  init = jax.jit(lambda rng: nn.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))['params']),
                 out_shardings=shardings)
  return config, model, init(jax.random.key(0)), mesh, f'random parameters ({config.preset})'


def run() -> dict[str, Any]:
  config, model, params, mesh, source = _load()
  rules = mesh_lib.logical_rules(config.mesh)
  vocab = model.config.vocab_size
  longest = max(_PROMPT_LEN.value + _NEW_TOKENS.value,
                _SPEEDUP_PROMPT.value + _SPEEDUP_NEW.value)
  if longest > model.config.max_len:
    model = Transformer(dataclasses.replace(model.config, max_len=longest))

  def generator(fn, batch: int, prompt_len: int, new_tokens: int) -> Callable[[], Any]:
    prompts = jax.random.randint(jax.random.key(batch), (batch, prompt_len), 4, vocab, jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    return lambda: fn(model, params, prompts, lengths, max_new_tokens=new_tokens,
                      rng=jax.random.key(0), temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                      top_p=_TOP_P.value, eos_id=None, mesh=mesh, rules=rules).tokens

  result = {
      'source': source,
      'num_params': num_params(model.config),
      'device': str(jax.devices()[0].device_kind),
      'num_devices': jax.device_count(),
      'sampling': {'temperature': _TEMPERATURE.value, 'top_k': _TOP_K.value,
                   'top_p': _TOP_P.value},
  }
  prompt_len, new_tokens, repeats = _PROMPT_LEN.value, _NEW_TOKENS.value, _REPEATS.value
  for batch in [int(b) for b in _BATCH_SIZES.value]:
    prefill = _median_seconds(generator(decode.generate, batch, prompt_len, 1), repeats)
    full = _median_seconds(generator(decode.generate, batch, prompt_len, new_tokens), repeats)
    decode_seconds = max(full - prefill, 1e-9)
    result[f'batch_{batch}'] = {
        'prompt_len': prompt_len,
        'new_tokens': new_tokens,
        'prefill_seconds': prefill,
        'prefill_tokens_per_sec': batch * prompt_len / prefill,
        'decode_seconds': decode_seconds,
        'decode_tokens_per_sec': batch * (new_tokens - 1) / decode_seconds,
        'ms_per_decode_step': 1e3 * decode_seconds / (new_tokens - 1),
    }

  batch, prompt_len, new_tokens = (_SPEEDUP_BATCH.value, _SPEEDUP_PROMPT.value,
                                   _SPEEDUP_NEW.value)
  cached = _median_seconds(generator(decode.generate, batch, prompt_len, new_tokens), repeats)
  uncached = _median_seconds(generator(decode.generate_uncached, batch, prompt_len, new_tokens),
                             repeats)
  result['cached_vs_uncached'] = {
      'batch': batch,
      'prompt_len': prompt_len,
      'new_tokens': new_tokens,
      'cached_seconds': cached,
      'uncached_seconds': uncached,
      'speedup': uncached / cached,
  }
  return result


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  console.quiet_libraries()  # library INFO logs would bury the report
  result = run()
  text = json.dumps(result, indent=2)
  print(text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  cli.run(main)
