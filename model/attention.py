"""Grouped-query self-attention with RoPE, packing masks and a KV cache.

Interchangeable implementations of the attention core, chosen by
`ModelConfig.attention_impl`:

- 'xla': plain einsums and a softmax; the reference, runs everywhere.
- 'block': block-causal einsums that skip the fully masked key blocks
  (`block_causal_attention`); exact, runs everywhere, written for XLA:CPU.
- 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')` (GPU, needs
  bfloat16/float16); packing goes in as a dense [B, 1, T, T] segment mask.
- 'cudnn_packed': the same kernel given each row's documents as offsets and
  lengths (cuDNN's packed layout, `cudnn_attention`), no mask: it skips the
  key blocks of other documents and reads no [B, T, T] bias. Needs jax >=
  0.11; a batch with a row of more than `CUDNN_MAX_SEGMENTS` documents runs
  the 'cudnn' kernel. Not yet what 'auto' picks (see below).
- 'splash': the Pallas TPU splash-attention kernel with a causal mask and
  `SegmentIds` for packing; grouped-query attention is native to the kernel.
  It runs per device inside `jax.shard_map`, batch sharded as
  'activation_batch' and heads as 'activation_heads' under the logical-axis
  rules in context; the sequence axis is kept whole.
- 'auto': splash on TPU, cudnn on GPU, block on CPU (and xla wherever the
  faster kernel cannot take the shapes/dtype, with a logged warning).

The platform is read from the mesh in context at trace time
(`jax.sharding.use_abstract_mesh(mesh.abstract_mesh)` as train/steps.py does,
`jax.set_mesh(mesh)`, or the deprecated `with mesh:`), so a train step traced
on a CPU host for a TPU topology (`jax.experimental.topologies`) picks the TPU
kernel; with no mesh in context it is `jax.default_backend()`. The same mesh
is what splash's `shard_map` uses, and the logical-axis rules in context
(`nn.logical_axis_rules`) say how its batch and heads are split. No mesh is
stored in the module or its config, so the model stays a pure function of its
inputs. Asking explicitly for 'splash' or 'cudnn' on a platform without it is
an error at trace time.

The segment mask reaches cuDNN as a [B, 1, T, T] bias. Checked on one H200
(jax 0.11.2, cuDNN 9.19, 2026-12-04; tests/test_attention.py, skipped off
GPU): forward and backward with packed segments and padding equal the
float32 reference within bfloat16 rounding, at lengths 128 and 200, and in
the model the loss and gradients equal those of 'xla' in bfloat16. At the 1b
preset's layer shape (batch 16, length 2048, 32 query and 8 kv heads of 64,
two documents a row) one forward + backward took 5.78 ms with the mask, 4.05
ms with the causal mask alone (wrong for packed rows) and 3.00 ms with the
packed layout, whose output and gradients differed from the xla core's
exactly as the mask's did (H200, jax 0.11.2, 2026-12-04,
`benchmarks/attention.py`). 'cudnn_packed' in the model is checked by
tests/test_attention.py's GPU tests, which have not yet run on a GPU in its
present form: until they have, 'auto' picks 'cudnn'.

Letters: B batch, T query length, S key length, D d_model, N query heads,
K key/value heads, G = N // K query heads per kv head, H head dim.
"""

from __future__ import annotations

import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig
from model.layers import matmul
from model.platform import context_mesh, current_platform, mesh_platform
from model import rope

# Large but finite, so a row with every key masked gives a finite (uniform)
# softmax instead of NaN; the splash kernel uses the same value.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
BTNH = ('activation_batch', 'activation_length', 'activation_heads', 'activation_kv')
BSKH = ('activation_batch', 'activation_length', 'activation_kv_heads', 'activation_kv')
CACHE_BKSH = ('activation_batch', 'activation_kv_heads', None, 'activation_kv')
CACHE_BKHS = ('activation_batch', 'activation_kv_heads', 'activation_kv', None)
SPLASH_BLOCK_SIZES = (512, 256, 128)  # tried largest first; must divide the length
# Query block of 'block' attention (measured on XLA:CPU, see block_causal_attention).
BLOCK_SIZE = 64


def splash_block_size(length: int) -> int | None:
  for block in SPLASH_BLOCK_SIZES:
    if length % block == 0:
      return block
  return None


def select_impl(requested: str, platform: str, length: int, dtype: jnp.dtype) -> str:
  """Resolves `attention_impl` to 'xla' | 'block' | 'cudnn' | 'cudnn_packed' | 'splash'."""
  dtype = jnp.dtype(dtype)
  if requested == 'auto':
    if platform == 'tpu':
      if splash_block_size(length) is not None:
        return 'splash'
      logging.warning('attention_impl=auto: splash needs a length divisible by 128, got '
                      '%d; using xla attention.', length)
      return 'xla'
    if platform == 'gpu':
      if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return 'cudnn'
      logging.warning('attention_impl=auto: cudnn needs bfloat16/float16, got %s; using '
                      'xla attention.', dtype)
      return 'xla'
    return 'block'
  if requested == 'splash':
    if platform != 'tpu':
      raise ValueError(f"attention_impl='splash' needs TPU devices, but attention runs on "
                       f"'{platform}'; use 'auto' or 'xla'.")
    if splash_block_size(length) is None:
      raise ValueError(f"attention_impl='splash' needs a sequence length divisible by 128, "
                       f'got {length}.')
  if requested in ('cudnn', 'cudnn_packed'):
    if platform != 'gpu':
      raise ValueError(f"attention_impl={requested!r} needs GPU devices, but attention runs on "
                       f"'{platform}'; use 'auto' or 'xla'.")
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      raise ValueError(f'attention_impl={requested!r} needs dtype bfloat16 or float16, got '
                       f'{dtype}.')
    if requested == 'cudnn_packed' and _jax_version() < (0, 11):
      raise ValueError(f"attention_impl='cudnn_packed' needs jax >= 0.11, this is "
                       f"{jax.__version__}; use 'cudnn'.")
  return requested


# ------------------------------------------------------------ the three cores

def segment_causal_mask(segment_ids_BT: jax.Array) -> jax.Array:
  """[B, T, T]: key s visible to query t iff s <= t and both are in one segment."""
  length = segment_ids_BT.shape[1]
  causal_TT = jnp.tril(jnp.ones((length, length), jnp.bool_))
  same_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return same_BTT & causal_TT


def xla_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                  mask_BTS: jax.Array) -> jax.Array:
  """Reference attention; the kv heads are shared by groups of G query heads."""
  batch, length, num_heads, head_dim = q_BTNH.shape
  num_kv_heads = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
  logits_BKGTS = jnp.einsum('BTKGH,BSKH->BKGTS', q_BTKGH, k_BSKH,
                            preferred_element_type=jnp.float32)
  logits_BKGTS = logits_BKGTS * (1.0 / math.sqrt(head_dim))
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, MASK_VALUE)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
  out_BTKGH = jnp.einsum('BKGTS,BSKH->BTKGH', probs_BKGTS, v_BSKH)
  return out_BTKGH.reshape(batch, length, num_heads, head_dim)


def cached_attention(q_BTNH: jax.Array, k_BKHS: jax.Array, v_BKSH: jax.Array,
                     mask_BTS: jax.Array) -> jax.Array:
  """`xla_attention` over the KV cache: keys [B, K, H, S], values [B, K, S, H].

  In these layouts both einsums are plain batched matmuls over (B, K) that
  read the cache as it lies. With keys and values [B, S, K, H] XLA:CPU
  transposed the whole cache at every decode step, and with keys [B, K, S, H]
  the q.k product alone took 5x the time of the p.v one (measured at batch 64,
  `tiny`); that was most of a decode step's time.
  """
  batch, length, num_heads, head_dim = q_BTNH.shape
  num_kv_heads = k_BKHS.shape[1]
  q_BKGTH = q_BTNH.reshape(batch, length, num_kv_heads, num_heads // num_kv_heads,
                           head_dim).transpose(0, 2, 3, 1, 4)
  q_BKGTH = q_BKGTH * jnp.asarray(1.0 / math.sqrt(head_dim), q_BKGTH.dtype)
  logits_BKGTS = jnp.einsum('BKGTH,BKHS->BKGTS', q_BKGTH, k_BKHS,
                            preferred_element_type=jnp.float32)
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, MASK_VALUE)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BKSH.dtype)
  out_BKGTH = jnp.einsum('BKGTS,BKSH->BKGTH', probs_BKGTS, v_BKSH)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_heads, head_dim)


def block_causal_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                           segment_ids_BT: jax.Array, block_size: int = BLOCK_SIZE) -> jax.Array:
  """Causal, segment-masked attention that never computes a fully masked block.

  The queries are cut into blocks of `block_size` (the last one shorter when
  it does not divide T); query block [t0, t1) attends only the key prefix
  [0, t1), so the blocks above the diagonal -- nearly half of the T x T
  scores, probabilities and their gradients -- are never formed. Within the
  prefix the causal and same-segment mask is applied exactly as in
  `xla_attention`, so packed rows give the same values and gradients; only
  the work on keys that the causal mask removes anyway is skipped. Each
  block's softmax is exact over its prefix (no online rescaling), which is
  what makes it cheap on XLA:CPU: a handful of plain batched matmuls that
  autodiff differentiates like the reference.
  """
  batch, length, num_heads, head_dim = q_BTNH.shape
  num_kv_heads = k_BSKH.shape[2]
  groups = num_heads // num_kv_heads
  # Scaling q (T x H numbers) is cheaper than scaling the T x S logits.
  q_BTNH = q_BTNH * jnp.asarray(1.0 / math.sqrt(head_dim), q_BTNH.dtype)
  q_BKGTH = q_BTNH.reshape(batch, length, num_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  k_BKSH, v_BKSH = jnp.swapaxes(k_BSKH, 1, 2), jnp.swapaxes(v_BSKH, 1, 2)
  positions_T = np.arange(length)
  outs = []
  for start in range(0, length, block_size):
    stop = min(start + block_size, length)
    logits_BKGtS = jnp.einsum('BKGtH,BKSH->BKGtS', q_BKGTH[:, :, :, start:stop],
                              k_BKSH[:, :, :stop], preferred_element_type=jnp.float32)
    causal_tS = positions_T[start:stop, None] >= positions_T[None, :stop]
    same_BtS = segment_ids_BT[:, start:stop, None] == segment_ids_BT[:, None, :stop]
    mask_BtS = same_BtS & causal_tS
    logits_BKGtS = jnp.where(mask_BtS[:, None, None], logits_BKGtS, MASK_VALUE)
    probs_BKGtS = jax.nn.softmax(logits_BKGtS, axis=-1).astype(v_BSKH.dtype)
    outs.append(jnp.einsum('BKGtS,BKSH->BKGtH', probs_BKGtS, v_BKSH[:, :, :stop]))
  out_BKGTH = jnp.concatenate(outs, axis=3)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(batch, length, num_heads, head_dim)


def dot_product_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                          segment_ids_BT: jax.Array, implementation: str = 'cudnn') -> jax.Array:
  """`jax.nn.dot_product_attention` with a causal + same-segment mask.

  `implementation='cudnn'` is the fused GPU kernel; 'xla' runs anywhere and is
  what the tests compare against `xla_attention`.
  """
  same_B1TS = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=same_B1TS, is_causal=True,
                                      implementation=implementation)


# Documents (runs of one segment id, padding included) per row that the
# packed layout takes; a batch with a row holding more runs the masked kernel
# instead (both are compiled, `lax.cond` picks).
CUDNN_MAX_SEGMENTS = 16


def segment_runs(segment_ids_BT: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array,
                                                                          jax.Array]:
  """Each row's runs of equal segment ids, as cuDNN's packed layout wants them.

  Returns (offsets [B, M + 1], lengths [B, M], ok [B]) with M =
  `max_segments`: the start and length of row b's m-th run, -1 past its last
  run (and in the last offset column). Padding (id 0) is a run like any
  other, so every token is in one. `ok[b]` says the runs are row b's whole
  mask: it has at most M of them and no id comes back after another (no id in
  two runs, which the mask would join), so attention within each run is
  exactly the causal, same-segment mask.
  """
  batch, length = segment_ids_BT.shape
  starts_BT = jnp.pad(segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1], ((0, 0), (1, 0)),
                      constant_values=True)
  run_BT = jnp.cumsum(starts_BT, axis=1, dtype=jnp.int32) - 1
  runs_B = run_BT[:, -1] + 1
  sorted_BT = jnp.sort(segment_ids_BT, axis=1)
  distinct_B = 1 + jnp.sum(sorted_BT[:, 1:] != sorted_BT[:, :-1], axis=1)
  rows_B1 = jnp.arange(batch)[:, None]
  # Runs past M scatter out of range and are dropped.
  lengths_BM = jnp.zeros((batch, max_segments), jnp.int32).at[rows_B1, run_BT].add(
      1, mode='drop')
  start_index_BT = jnp.where(starts_BT, run_BT, max_segments)
  positions_BT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  offsets_BM = jnp.zeros((batch, max_segments), jnp.int32).at[rows_B1, start_index_BT].set(
      positions_BT, mode='drop')
  listed_BM = jnp.arange(max_segments) < runs_B[:, None]
  lengths_BM = jnp.where(listed_BM, lengths_BM, -1)
  offsets_BM1 = jnp.pad(jnp.where(listed_BM, offsets_BM, -1), ((0, 0), (0, 1)),
                        constant_values=-1)
  return offsets_BM1, lengths_BM, (runs_B <= max_segments) & (runs_B == distinct_B)


def cudnn_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                    segment_ids_BT: jax.Array, max_segments: int = CUDNN_MAX_SEGMENTS
                    ) -> jax.Array:
  """Causal, segment-masked attention with cuDNN's packed layout (GPU, half precision).

  Each row's runs of one segment id go to the kernel as offsets and lengths
  (`segment_runs`), so it attends within each run, causally, and skips the
  rest. Where a row's runs are not its whole mask (more than `max_segments`,
  or an id in two runs) the batch runs `dot_product_attention`'s masked
  kernel instead. Calls jax's private cuDNN wrapper
  (`jax._src.cudnn.fused_attention_stablehlo`); before jax 0.11 it gave
  grouped-query keys the query heads' stride, hence the version check in
  `select_impl`.
  """
  with_mask = lambda q, k, v, segment_ids: dot_product_attention(q, k, v, segment_ids, 'cudnn')
  from jax._src.cudnn import fused_attention_stablehlo as sdpa  # pylint: disable=g-import-not-at-top
  offsets_BM1, lengths_BM, ok_B = segment_runs(segment_ids_BT, max_segments)

  def packed(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
    del segment_ids_BT
    return sdpa.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, q_seqlen=lengths_BM, kv_seqlen=lengths_BM,
        q_offsets=offsets_BM1, kv_offsets=offsets_BM1, scale=1.0 / math.sqrt(q_BTNH.shape[-1]),
        mask_type=sdpa.MaskType.PADDING_CAUSAL)

  # The fallback saves nothing for the backward pass but its inputs: a
  # conditional keeps the residuals of both branches.
  return jax.lax.cond(jnp.all(ok_B), packed, jax.checkpoint(with_mask),
                      q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)


def _jax_version() -> tuple[int, ...]:
  return tuple(int(part) for part in jax.__version__.split('.')[:2])


def splash_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                     segment_ids_BT: jax.Array, *, mesh=None, interpret: bool = False) -> jax.Array:
  """Causal, segment-masked attention with the Pallas TPU splash kernel.

  With a `mesh` the kernel runs per device under `jax.shard_map`: batch split
  as the logical rules split 'activation_batch', query and kv heads both as
  'activation_heads' (so each device holds whole GQA groups; the kv heads must
  divide evenly), the sequence whole. `interpret=True` runs the kernel in the
  Pallas interpreter (slow; lets tests check it on CPU).
  """
  # Imported here: loading the Pallas TPU ops is not needed off TPU.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  length, head_dim = q_BTNH.shape[1], q_BTNH.shape[3]
  block = splash_block_size(length)
  if block is None:
    raise ValueError(f'splash attention needs a sequence length divisible by 128, got {length}.')
  block_sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      use_fused_bwd_kernel=True)

  def attend_local(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT):
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * q_BTNH.shape[2])
    kernel = splash.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
    # The kernel takes [heads, length, head_dim] per example and does not scale.
    q_BNTH = jnp.swapaxes(q_BTNH * jnp.asarray(1.0 / math.sqrt(head_dim), q_BTNH.dtype), 1, 2)
    k_BKSH, v_BKSH = jnp.swapaxes(k_BSKH, 1, 2), jnp.swapaxes(v_BSKH, 1, 2)
    segments = splash.SegmentIds(q=segment_ids_BT, kv=segment_ids_BT)
    out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, segment_ids=segments)
    return jnp.swapaxes(out_BNTH, 1, 2)

  if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
    return attend_local(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  batch_axes = _mesh_axes('activation_batch', mesh)
  head_axes = _mesh_axes('activation_heads', mesh)
  head_shards = math.prod(mesh.shape[a] for a in _as_tuple(head_axes))
  if k_BSKH.shape[2] % head_shards:
    raise ValueError(f'splash attention: {k_BSKH.shape[2]} kv heads cannot be split over the '
                     f'{head_shards} devices that shard the heads ({head_axes}).')
  qkv_spec, segment_spec = P(batch_axes, None, head_axes, None), P(batch_axes, None)
  args = (q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  specs = (qkv_spec, qkv_spec, qkv_spec, segment_spec)
  if mesh.explicit_axes:
    # With explicit-sharding axes shard_map takes its inputs as they are typed.
    args = tuple(jax.sharding.reshard(x, spec) for x, spec in zip(args, specs))
  sharded = jax.shard_map(attend_local, mesh=mesh, in_specs=specs, out_specs=qkv_spec,
                          check_vma=False)
  return sharded(*args)


def _as_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


def _mesh_axes(logical_name: str, mesh) -> str | tuple[str, ...] | None:
  """The mesh axes the rules in context give a logical name (only those in `mesh`)."""
  axes = _as_tuple(nn.logical_to_mesh_axes((logical_name,))[0])
  axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def attention_core(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                   segment_ids_BT: jax.Array, requested: str) -> jax.Array:
  """Training/scoring attention (queries and keys are the same T tokens)."""
  mesh = context_mesh()
  impl = select_impl(requested, mesh_platform(mesh), q_BTNH.shape[1], q_BTNH.dtype)
  if impl == 'splash':
    return splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, mesh=mesh)
  if impl == 'cudnn':
    return dot_product_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, 'cudnn')
  if impl == 'cudnn_packed':
    return cudnn_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  if impl == 'block':
    return block_causal_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT)
  return xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_causal_mask(segment_ids_BT))


# ------------------------------------------------------------------ the module

class Attention(nn.Module):
  """Grouped-query self-attention block (projections, RoPE, core, output).

  With `decode=True` it keeps a KV cache in the 'cache' collection:
  `cached_key` [B, K, H, max_len] and `cached_value` [B, K, max_len, H]
  (compute dtype, keys already rotated; laid out so that both products of a
  decode step are plain matmuls that read the cache without a transpose),
  `cache_segment_ids` and `cache_positions` [B, max_len] (int32; a segment
  id of 0 marks an empty or padding slot) and `cache_index` [B], the
  next slot to write in each row. A call writes its T tokens at slots
  `index .. index + T - 1` of each row (writes past the end are dropped) and
  then advances the row's index to just after its last non-padding token. So
  left-padded prompts (padding in the cache, never attended) and right-padded
  prompts (padding written, then overwritten by the next tokens) both work,
  and a decode step whose token is padding (a finished row) leaves the row's
  index where it is. Key slot s is visible to query t iff slot s holds a
  non-padding token (segment id != 0) whose position is <= the query's
  position. When `positions` is None they default to `index + arange(T)`.
  """
  config: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_BTD: jax.Array, segment_ids_BT: jax.Array,
               positions_BT: jax.Array | None) -> jax.Array:
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    in_init = nn.initializers.normal(stddev=1.0 / math.sqrt(d))
    out_init = nn.initializers.normal(stddev=1.0 / math.sqrt(n * h * 2 * cfg.num_layers))
    param = self.param
    wq_DNH = param('wq', nn.with_logical_partitioning(in_init, ('embed', 'heads', 'kv')),
                   (d, n, h), param_dtype)
    wk_DKH = param('wk', nn.with_logical_partitioning(in_init, ('embed', 'kv_heads', 'kv')),
                   (d, k, h), param_dtype)
    wv_DKH = param('wv', nn.with_logical_partitioning(in_init, ('embed', 'kv_heads', 'kv')),
                   (d, k, h), param_dtype)
    wo_NHD = param('wo', nn.with_logical_partitioning(out_init, ('heads', 'kv', 'embed')),
                   (n, h, d), param_dtype)

    q_BTNH = matmul(x_BTD, jnp.asarray(wq_DNH, dtype))
    k_BTKH = matmul(x_BTD, jnp.asarray(wk_DKH, dtype))
    v_BTKH = matmul(x_BTD, jnp.asarray(wv_DKH, dtype))
    cache = self._cache_vars(x_BTD.shape[0]) if self.decode else None
    if self.decode and positions_BT is None:
      positions_BT = (cache['cache_index'].value[:, None]
                      + jnp.arange(x_BTD.shape[1], dtype=jnp.int32))
    # Training and scoring on CPU read sin and cos from a table over the
    # positions the model can see (model/rope.py `sin_cos`); both rotations
    # share them. Not while decoding: a step has one new token per row, few
    # angles to compute (the `tiny` sampling loop was not faster with the table).
    rope_from_table = current_platform() == 'cpu' and not self.decode
    table_len = max(cfg.max_len, x_BTD.shape[1]) if rope_from_table else None
    sin_BT1H, cos_BT1H = rope.sin_cos(positions_BT, h, cfg.rope_theta, rope.scaling_of(cfg),
                                      table_len)
    q_BTNH = rope.rotate(q_BTNH, sin_BT1H, cos_BT1H)
    k_BTKH = rope.rotate(k_BTKH, sin_BT1H, cos_BT1H)
    q_BTNH = checkpoint_name(nn.with_logical_constraint(q_BTNH, BTNH), 'query_proj')
    k_BTKH = checkpoint_name(nn.with_logical_constraint(k_BTKH, BSKH), 'key_proj')
    v_BTKH = checkpoint_name(nn.with_logical_constraint(v_BTKH, BSKH), 'value_proj')

    if self.decode:
      out_BTNH = self._cached_attention(cache, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT,
                                        positions_BT)
    else:
      out_BTNH = attention_core(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg.attention_impl)
    out_BTNH = checkpoint_name(nn.with_logical_constraint(out_BTNH, BTNH), 'attn_out')
    out_BTD = matmul(out_BTNH, jnp.asarray(wo_NHD, dtype), num_contract=2)
    return nn.with_logical_constraint(
        out_BTD, ('activation_batch', 'activation_length', 'activation_embed'))

  def _cache_vars(self, batch: int) -> dict[str, nn.Variable]:
    """The cache variables; created (zeros, length `max_len`) only by `init`."""
    cfg = self.config
    key_shape = (batch, cfg.num_kv_heads, cfg.head_dim, cfg.max_len)
    value_shape = (batch, cfg.num_kv_heads, cfg.max_len, cfg.head_dim)
    dtype = jnp.dtype(cfg.dtype)
    zeros = jnp.zeros
    return {
        'cached_key': self.variable('cache', 'cached_key', zeros, key_shape, dtype),
        'cached_value': self.variable('cache', 'cached_value', zeros, value_shape, dtype),
        'cache_segment_ids': self.variable('cache', 'cache_segment_ids', zeros,
                                           (batch, cfg.max_len), jnp.int32),
        'cache_positions': self.variable('cache', 'cache_positions', zeros,
                                         (batch, cfg.max_len), jnp.int32),
        'cache_index': self.variable('cache', 'cache_index', zeros, (batch,), jnp.int32),
    }

  def _cached_attention(self, cache, q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, positions_BT):
    batch, length = segment_ids_BT.shape
    index_B = cache['cache_index'].value
    slots_BT = index_B[:, None] + jnp.arange(length, dtype=jnp.int32)
    rows_B1 = jnp.arange(batch)[:, None]

    def write(name, new, constraint=None, slot_axis=1):
      # Advanced indices around slices put their (B, T) dims first: `new` is [B, T, ...].
      index = (rows_B1,) + (slice(None),) * (slot_axis - 1) + (slots_BT,)
      value = cache[name].value.at[index].set(new.astype(cache[name].value.dtype), mode='drop')
      if constraint is not None:
        value = nn.with_logical_constraint(value, constraint)
      cache[name].value = value
      return value

    k_BKHS = write('cached_key', k_BTKH, CACHE_BKHS, slot_axis=3)
    v_BKSH = write('cached_value', v_BTKH, CACHE_BKSH, slot_axis=2)
    segments_BS = write('cache_segment_ids', segment_ids_BT)
    positions_BS = write('cache_positions', positions_BT)
    # Advance to just after the last non-padding token written by this call.
    filled_BT = jnp.where(segment_ids_BT != 0, jnp.arange(1, length + 1, dtype=jnp.int32), 0)
    cache['cache_index'].value = index_B + jnp.max(filled_BT, axis=1)

    mask_BTS = (segments_BS[:, None, :] != 0) & (
        positions_BS[:, None, :] <= positions_BT[:, :, None])
    return cached_attention(q_BTNH, k_BKHS, v_BKSH, mask_BTS)
