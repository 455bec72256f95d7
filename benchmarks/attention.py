"""Forward + backward time of the attention cores at one layer's shape.

  python -m benchmarks.attention --impls=xla,block          # bench_cpu's shape, float32
  python -m benchmarks.attention --impls=xla,cudnn,cudnn_causal,cudnn_packed --dtype=bfloat16 \\
      --batch=16 --length=2048 --heads=32 --kv_heads=8      # the 1b shape, on a GPU

Each row of the batch holds two documents (lengths T/2 + 3 and T/2 - 3), so
the packing mask matters. 'cudnn_causal' is the fused kernel with the causal
mask alone, which is right only for rows of one document: beside 'cudnn' it
prices the packing mask, which reaches cuDNN as a [B, 1, T, T] bias
(model/attention.py). Its error against 'xla' is large here by construction.
'cudnn_packed' is the model's 'cudnn_packed' core (`attention.cudnn_attention`,
at most 4 documents a row): cuDNN's packed layout, no bias.

Prints one JSON object: per core, the median seconds of `--repeats` jitted
forward + backward calls after a compiling one, the FLOP/s of that time with
attention's causal FLOPs (forward 2·B·N·T²·H, backward twice that), and the
largest differences of its output and of its dq, dk, dv from the 'xla'
core's.
"""

from __future__ import annotations

import json
import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import cli
from configs.cli import UserError
from model import attention
from train import console

_IMPLS = flags.DEFINE_list('impls', ['xla', 'block'], "Cores: 'xla', 'block', 'cudnn', "
                           "'cudnn_causal', 'cudnn_packed' (GPU).")
_BATCH = flags.DEFINE_integer('batch', 16, 'Rows.')
_LENGTH = flags.DEFINE_integer('length', 256, 'Tokens per row.')
_HEADS = flags.DEFINE_integer('heads', 6, 'Query heads.')
_KV_HEADS = flags.DEFINE_integer('kv_heads', 6, 'Key/value heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'Head width.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16', 'float16'],
                           'Dtype of q, k, v.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per core (median).')


def packed_segments(batch: int, length: int) -> np.ndarray:
  """Two documents per row, of lengths length // 2 + 3 and the rest."""
  first = min(length // 2 + 3, length)
  row = np.concatenate([np.ones(first, np.int32), np.full(length - first, 2, np.int32)])
  return np.broadcast_to(row, (batch, length)).copy()


def core(impl: str, segment_ids, dtype: str = 'float32'):
  """(q, k, v) -> output of the named core, with the packing mask of `segment_ids`."""
  if impl == 'xla':
    mask = attention.segment_causal_mask(segment_ids)
    return lambda q, k, v: attention.xla_attention(q, k, v, mask)
  if impl == 'block':
    return lambda q, k, v: attention.block_causal_attention(q, k, v, segment_ids)
  if impl in ('cudnn', 'cudnn_causal', 'cudnn_packed'):
    try:
      attention.select_impl(impl.replace('_causal', ''), jax.default_backend(),
                            segment_ids.shape[1], dtype)
    except ValueError as e:
      raise UserError(f'--impls={impl}: {e}') from None
    if impl == 'cudnn':
      return lambda q, k, v: attention.dot_product_attention(q, k, v, segment_ids, 'cudnn')
    if impl == 'cudnn_packed':
      return lambda q, k, v: attention.cudnn_attention(q, k, v, segment_ids, max_segments=4)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                        implementation='cudnn')
  raise UserError(f"--impls: unknown core {impl!r}; use 'xla', 'block', 'cudnn', "
                  "'cudnn_causal' or 'cudnn_packed'.")


def benchmark(impls, batch: int, length: int, heads: int, kv_heads: int, head_dim: int,
              dtype: str, repeats: int) -> dict:
  segment_ids = jnp.asarray(packed_segments(batch, length))
  names = ['xla'] + [impl for impl in impls if impl != 'xla']   # xla first: the reference
  cores = {impl: core(impl, segment_ids, dtype) for impl in names}
  rng = np.random.default_rng(0)
  draw = lambda n: jnp.asarray(rng.standard_normal((batch, length, n, head_dim)), dtype)
  q, k, v = draw(heads), draw(kv_heads), draw(kv_heads)
  weights = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  flops = 3 * 2 * batch * heads * length * length * head_dim   # causal half of 4·B·N·T²·H, x3

  reference = None
  results = {}
  for impl, f in cores.items():

    def loss(q, k, v, f=f):
      out = f(q, k, v)
      return jnp.sum(out.astype(jnp.float32) * weights), out
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    jax.block_until_ready(step(q, k, v))   # compile
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      (_, out), grads = jax.block_until_ready(step(q, k, v))
      times.append(time.perf_counter() - start)
    values = [np.asarray(x, np.float32) for x in (out, *grads)]
    if impl == 'xla':
      reference = values
    if impl in impls:
      seconds = statistics.median(times)
      diffs = [float(np.abs(a - b).max()) for a, b in zip(values, reference)]
      results[impl] = {'seconds': seconds, 'flops_per_sec': flops / seconds,
                       'max_abs_diff_from_xla': diffs[0],
                       'max_abs_grad_diff_from_xla': dict(zip(('dq', 'dk', 'dv'), diffs[1:]))}
  return {'shape': dict(batch=batch, length=length, heads=heads, kv_heads=kv_heads,
                        head_dim=head_dim, dtype=dtype),
          'device': jax.devices()[0].device_kind, 'causal_flops': flops, 'cores': results}


def main(argv):
  del argv
  console.quiet_libraries()
  print(json.dumps(benchmark(_IMPLS.value, _BATCH.value, _LENGTH.value, _HEADS.value,
                             _KV_HEADS.value, _HEAD_DIM.value, _DTYPE.value, _REPEATS.value)))


if __name__ == '__main__':
  cli.run(main)
