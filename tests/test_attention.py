"""Tests for RoPE, the attention cores and the choice between them."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention
from model.config import ModelConfig
from model import rope
from model.rope import apply_rope
from model.transformer import Transformer


# One compile per shape instead of one per eager op.
_xla_attention = jax.jit(attention.xla_attention)
_apply_rope = jax.jit(apply_rope, static_argnums=2)


def _qkv(batch=2, length=16, heads=4, kv_heads=2, head_dim=8, seed=0):
  # numpy, not jax.random: compiling the random bits costs more than the tests.
  rng = np.random.default_rng(seed)
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return (draw(batch, length, heads, head_dim), draw(batch, length, kv_heads, head_dim),
          draw(batch, length, kv_heads, head_dim))


def _mha_reference(q_BTNH, k_BSNH, v_BSNH, mask_BTS):
  """Multi-head attention written out head by head, in numpy float64."""
  q, k, v, mask = (np.asarray(a, np.float64) for a in (q_BTNH, k_BSNH, v_BSNH, mask_BTS))
  out = np.zeros_like(q)
  for b in range(q.shape[0]):
    for n in range(q.shape[2]):
      logits = q[b, :, n] @ k[b, :, n].T / np.sqrt(q.shape[-1])
      logits = np.where(mask[b] > 0, logits, -1e30)
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      out[b, :, n] = probs @ v[b, :, n]
  return out


def test_rope_depends_only_on_position_difference():
  q, k, _ = _qkv(batch=1, length=1, heads=1, kv_heads=1, head_dim=16)

  def score(pos_q, pos_k):
    q_rot = _apply_rope(q, jnp.array([[pos_q]]), 10000.0)
    k_rot = _apply_rope(k, jnp.array([[pos_k]]), 10000.0)
    return float(jnp.sum(q_rot * k_rot))

  for delta in (0, 3, 17):
    scores = [score(p + delta, p) for p in (0, 5, 123, 1000)]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
  # ...and it does depend on the difference (so the test would see a no-op RoPE).
  assert abs(score(3, 0) - score(0, 0)) > 1e-3
  # A rotation keeps the norm.
  np.testing.assert_allclose(jnp.linalg.norm(_apply_rope(q, jnp.array([[7]]), 10000.0)),
                             jnp.linalg.norm(q), rtol=1e-5)


@pytest.mark.parametrize('scaling', [None, rope.Llama3Scaling(8.0, 1.0, 4.0, 64)])
def test_rope_table_equals_the_computed_rotation(scaling):
  # The CPU path gathers sin and cos from a table made at trace time; it must
  # give the values the computed path gives, at every position it covers, and
  # NaN (never a wrong rotation) outside it.
  head_dim, table_len = 16, 300
  positions = jnp.array([[0, 1, 7, 255, 299, 3], [5, 4, 3, 2, 1, 0]])
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 6, 3, head_dim)), jnp.float32)
  computed = jax.jit(lambda x, p: rope.apply_rope(x, p, 500000.0, scaling))(x, positions)
  table = jax.jit(lambda x, p: rope.apply_rope(x, p, 500000.0, scaling, table_len))(x, positions)
  # Against the rotation in float64 at the same float32 angles: the table (sin
  # and cos evaluated alone) is within 2e-7; XLA's sin and cos fused into the
  # rotation lose up to ~1.5e-5 at angles of a few hundred radians.
  inv_freq = np.asarray(rope.inverse_frequencies(head_dim, 500000.0, scaling))
  angles = (np.asarray(positions, np.float32)[..., None] * inv_freq)[:, :, None, :]
  sin, cos = np.sin(angles.astype(np.float64)), np.cos(angles.astype(np.float64))
  x1, x2 = np.split(np.asarray(x, np.float64), 2, axis=-1)
  exact = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  np.testing.assert_allclose(table, exact, rtol=0, atol=1e-6)
  np.testing.assert_allclose(computed, exact, rtol=0, atol=1e-4)
  # ...and it is a real rotation (not the identity, which would also pass the above at 0).
  assert float(jnp.max(jnp.abs(table[0, 2] - x[0, 2]))) > 0.1
  sin, cos = rope.sin_cos(jnp.array([[-1, 0, table_len, table_len - 1]]), head_dim, 10000.0,
                          table_len=table_len)
  assert np.isnan(np.asarray(sin)[0, [0, 2]]).all() and np.isnan(np.asarray(cos)[0, [0, 2]]).all()
  assert np.isfinite(np.asarray(sin)[0, [1, 3]]).all()
  # Beyond MAX_TABLE_ENTRIES the positions are computed, whatever table_len says.
  huge = rope.MAX_TABLE_ENTRIES  # entries = huge * head_dim / 2 > the limit
  sin, _ = rope.sin_cos(jnp.array([[huge + 5]]), head_dim, 10000.0, table_len=huge)
  assert np.isfinite(np.asarray(sin)).all()


def test_gqa_with_all_kv_heads_equals_multi_head_attention():
  q, k, v = _qkv(heads=4, kv_heads=4)
  segments = jnp.array([[1] * 10 + [2] * 6, [1] * 16])
  mask = attention.segment_causal_mask(segments)
  out = _xla_attention(q, k, v, mask)
  np.testing.assert_allclose(out, _mha_reference(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
  q, k, v = _qkv(heads=6, kv_heads=2)
  mask = attention.segment_causal_mask(jnp.ones((2, 16), jnp.int32))
  out = _xla_attention(q, k, v, mask)
  # Query head n uses kv head n // (N / K).
  k_rep, v_rep = jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2)
  np.testing.assert_allclose(out, _mha_reference(q, k_rep, v_rep, mask), rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_are_finite():
  q, k, v = _qkv()
  mask = jnp.zeros((2, 16, 16), jnp.bool_)
  out = _xla_attention(q, k, v, mask)
  assert np.isfinite(np.asarray(out)).all()
  grads = jax.jit(jax.grad(lambda q: attention.xla_attention(q, k, v, mask).sum()))(q)
  assert np.isfinite(np.asarray(grads)).all()


def test_jax_dot_product_attention_path_equals_reference():
  q, k, v = _qkv(heads=4, kv_heads=2)
  segments = jnp.array([[1] * 5 + [2] * 9 + [0] * 2, [0] * 3 + [1] * 13])
  ref = _xla_attention(q, k, v, attention.segment_causal_mask(segments))
  out = jax.jit(attention.dot_product_attention, static_argnums=4)(q, k, v, segments, 'xla')
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_splash_kernel_in_interpreter_equals_reference():
  q, k, v = _qkv(batch=2, length=128, heads=4, kv_heads=2, head_dim=64)
  segments = jnp.array([[1] * 50 + [2] * 70 + [0] * 8, [1] * 128])
  ref = _xla_attention(q, k, v, attention.segment_causal_mask(segments))
  out = jax.jit(functools.partial(attention.splash_attention, interpret=True))(
      q, k, v, segments)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('platform,length,dtype,expected', [
    ('cpu', 128, jnp.float32, 'block'),   # block-causal on XLA:CPU
    ('tpu', 256, jnp.bfloat16, 'splash'),
    ('tpu', 100, jnp.bfloat16, 'xla'),     # splash cannot take this length
    ('gpu', 64, jnp.bfloat16, 'cudnn'),
    ('gpu', 64, jnp.float32, 'xla'),       # cudnn needs half precision
])
def test_auto_selection(platform, length, dtype, expected):
  assert attention.select_impl('auto', platform, length, dtype) == expected


@pytest.mark.parametrize('impl,platform,match', [
    ('splash', 'cpu', 'needs TPU'),
    ('splash', 'gpu', 'needs TPU'),
    ('cudnn', 'cpu', 'needs GPU'),
    ('cudnn', 'tpu', 'needs GPU'),
    ('cudnn_packed', 'cpu', 'needs GPU'),
])
def test_explicit_kernel_on_wrong_platform_raises(impl, platform, match):
  with pytest.raises(ValueError, match=match):
    attention.select_impl(impl, platform, 128, jnp.bfloat16)


def test_cudnn_packed_needs_half_precision_and_jax_0_11():
  with pytest.raises(ValueError, match='needs dtype bfloat16'):
    attention.select_impl('cudnn_packed', 'gpu', 128, jnp.float32)
  major_minor = tuple(int(part) for part in jax.__version__.split('.')[:2])
  if major_minor < (0, 11):   # its cuDNN wrapper strides grouped-query keys wrongly
    with pytest.raises(ValueError, match=r'needs jax >= 0\.11'):
      attention.select_impl('cudnn_packed', 'gpu', 128, jnp.bfloat16)
  else:
    assert attention.select_impl('cudnn_packed', 'gpu', 128, jnp.bfloat16) == 'cudnn_packed'


def test_explicit_splash_on_cpu_model_raises_at_trace_time():
  cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=8, mlp_dim=32, max_len=128, attention_impl='splash')
  tokens = jnp.zeros((1, 128), jnp.int32)
  with pytest.raises(ValueError, match="attention_impl='splash' needs TPU"):
    jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)


def test_platform_comes_from_the_mesh_in_context():
  assert attention.context_mesh() is None
  assert attention.mesh_platform(None) == jax.default_backend()
  mesh = jax.make_mesh((1,), ('data',))
  with jax.set_mesh(mesh):
    assert attention.mesh_platform(attention.context_mesh()) == jax.default_backend()
  # Inside jit the mesh is abstract and reports the platform of its devices,
  # e.g. a TPU topology lowered on a CPU host.
  from jax._src.mesh import AbstractDevice  # pylint: disable=g-import-not-at-top
  tpu_mesh = jax.sharding.AbstractMesh((4,), ('data',),
                                       abstract_device=AbstractDevice('TPU v5p', 1, 'tpu'))
  assert attention.mesh_platform(tpu_mesh) == 'tpu'
  with jax.sharding.use_abstract_mesh(tpu_mesh):
    assert attention.context_mesh() == tpu_mesh


_SHARDED_SPLASH = textwrap.dedent('''
  import flax.linen as nn
  import jax, jax.numpy as jnp, numpy as np
  from model import attention
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in ((4, 128, 4, 64), (4, 128, 2, 64), (4, 128, 2, 64)))
  seg = jnp.array([[1] * 60 + [2] * 60 + [0] * 8] * 4)
  ref = attention.xla_attention(q, k, v, attention.segment_causal_mask(seg))
  rules = [('activation_batch', ('data', 'fsdp')), ('activation_heads', 'tensor')]
  mesh = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'))
  loss = lambda f: lambda q, k, v: (f(q, k, v) ** 2).sum()
  splash = lambda q, k, v: attention.splash_attention(
      q, k, v, seg, mesh=attention.context_mesh(), interpret=True)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    out = jax.jit(splash)(q, k, v)
    assert out.sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'), None, 'tensor', None)
    grads = jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.grad(loss(lambda q, k, v: attention.xla_attention(
      q, k, v, attention.segment_causal_mask(seg))), argnums=(0, 1, 2))(q, k, v)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-3, atol=1e-3)
  print('OK')
''')


def test_splash_under_a_sharded_mesh_matches_reference():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', _SHARDED_SPLASH], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and 'OK' in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------- block-causal attention

def _block_vs_reference(segments, block_size, heads=4, kv_heads=2):
  batch, length = segments.shape
  q, k, v = _qkv(batch=batch, length=length, heads=heads, kv_heads=kv_heads)
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * weights)
  block = lambda q, k, v: attention.block_causal_attention(q, k, v, segments, block_size)
  ref = lambda q, k, v: attention.xla_attention(q, k, v, attention.segment_causal_mask(segments))
  out, ref_out = jax.jit(block)(q, k, v), _xla_attention(
      q, k, v, attention.segment_causal_mask(segments))
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  # Independent of the xla core too: the float64 head-by-head reference.
  k_rep, v_rep = (jnp.repeat(x, heads // kv_heads, axis=2) for x in (k, v))
  np.testing.assert_allclose(out, _mha_reference(q, k_rep, v_rep,
                                                 attention.segment_causal_mask(segments)),
                             rtol=1e-4, atol=1e-4)
  grads = jax.jit(jax.grad(loss(block), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('length,block_size', [
    (32, 8),    # a multiple of the block
    (30, 8),    # not a multiple: the last block is shorter
    (16, 64),   # one block larger than the sequence
    (24, 1),    # one query per block
])
def test_block_causal_equals_reference_causal(length, block_size):
  _block_vs_reference(jnp.ones((2, length), jnp.int32), block_size)


@pytest.mark.parametrize('length,block_size', [(32, 8), (29, 8)])
def test_block_causal_equals_reference_packed(length, block_size):
  # Documents crossing block edges, a one-token document, and trailing padding.
  row0 = [1] * 7 + [2] * 10 + [3] + [4] * (length - 18 - 3) + [0] * 3
  row1 = [1] * 9 + [2] * (length - 9)
  _block_vs_reference(jnp.array([row0, row1], jnp.int32), block_size)


def test_block_impl_in_the_model_equals_xla():
  cfg = ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=32, max_len=40, attention_impl='xla')
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 40)), jnp.int32)
  segments = jnp.array([[1] * 25 + [2] * 15, [1] * 38 + [0] * 2], jnp.int32)
  params = jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens)
  apply = lambda impl: jax.jit(Transformer(
      dataclasses.replace(cfg, attention_impl=impl)).apply)(params, tokens, segments)
  np.testing.assert_allclose(apply('block'), apply('xla'), rtol=1e-5, atol=1e-5)


# ---------------------------------------------- cuDNN (run only where a GPU is)

_ON_GPU = pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN attention needs a GPU')


def test_segment_runs_lists_each_rows_documents():
  segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0],
                        [4, 4, 4, 4, 4, 4, 4, 4],
                        [0, 0, 5, 5, 6, 6, 6, 6],    # leading padding
                        [1, 2, 3, 4, 5, 6, 7, 8],    # more runs than max_segments
                        [0, 0, 5, 5, 0, 6, 6, 6]],   # padding in two runs: the mask joins them
                       jnp.int32)
  offsets, lengths, ok = jax.jit(attention.segment_runs, static_argnums=1)(segments, 4)
  np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, -1], [0, -1, -1, -1, -1],
                                          [0, 2, 4, -1, -1], [0, 1, 2, 3, -1],
                                          [0, 2, 4, 5, -1]])
  np.testing.assert_array_equal(lengths, [[3, 2, 1, 2], [8, -1, -1, -1], [2, 2, 4, -1],
                                          [1, 1, 1, 1], [2, 2, 1, 3]])
  np.testing.assert_array_equal(ok, [True, True, True, False, False])


# Row 0 of the test below holds five runs (padding included), so with two
# the packed layout cannot take the batch and the masked kernel runs.
# (impl, max_segments)
_CUDNN_CORES = [('cudnn', None), ('cudnn_packed', 8), ('cudnn_packed', 2)]


@_ON_GPU
@pytest.mark.parametrize('impl,max_segments', _CUDNN_CORES)
@pytest.mark.parametrize('length', [128, 200])   # 200: not a multiple of cuDNN's tiles
def test_cudnn_equals_reference_packed_forward_and_backward(length, impl, max_segments):
  """The fused kernel with the packing mask, against the float32 reference on the same inputs.

  Its error must be of the size bfloat16 rounding gives: no larger than twice
  that of the xla core run in bfloat16 on the same inputs (plus a small floor).
  """
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(batch=2, length=length, heads=8, kv_heads=2,
                                                  head_dim=64))
  row0 = [1] * 50 + [2] * 40 + [3] + [4] * (length - 91 - 9) + [0] * 9
  segments = jnp.array([row0, [1] * 77 + [2] * (length - 77)], jnp.int32)
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  mask = attention.segment_causal_mask(segments)
  cores = {
      'cudnn': (lambda q, k, v: attention.cudnn_attention(q, k, v, segments, max_segments))
               if impl == 'cudnn_packed' else
               (lambda q, k, v: attention.dot_product_attention(q, k, v, segments, 'cudnn')),
      'xla_bf16': lambda q, k, v: attention.xla_attention(q, k, v, mask),
      'ref_f32': lambda q, k, v: attention.xla_attention(
          *(x.astype(jnp.float32) for x in (q, k, v)), mask),
  }
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * weights)
  results = {}
  for name, core in cores.items():
    out = jax.jit(core)(q, k, v)
    grads = jax.jit(jax.grad(loss(core), argnums=(0, 1, 2)))(q, k, v)
    results[name] = [np.asarray(x, np.float32) for x in (out, *grads)]
  for i, what in enumerate(('out', 'dq', 'dk', 'dv')):
    ref = results['ref_f32'][i]
    err = np.abs(results['cudnn'][i] - ref).max()
    bf16_err = np.abs(results['xla_bf16'][i] - ref).max()
    scale = np.abs(ref).max()
    assert err <= 2 * bf16_err + 1e-3 * scale, (what, err, bf16_err, scale)


@_ON_GPU
@pytest.mark.parametrize('impl', ['cudnn', 'cudnn_packed'])
def test_cudnn_in_the_model_equals_xla_in_bfloat16(impl):
  cfg = ModelConfig(vocab_size=256, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=32, mlp_dim=256, max_len=128, dtype='bfloat16',
                    attention_impl='xla')
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 128)), jnp.int32)
  segments = jnp.array([[1] * 60 + [2] * 60 + [0] * 8, [1] * 128], jnp.int32)
  params = jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens)

  def loss(name):
    model = Transformer(dataclasses.replace(cfg, attention_impl=name))

    def f(params):
      logits = model.apply(params, tokens, segments).astype(jnp.float32)
      logp = jax.nn.log_softmax(logits[:, :-1])
      picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
      return -jnp.mean(picked)
    return jax.jit(jax.value_and_grad(f))(params)

  (cudnn_loss, cudnn_grads), (xla_loss, xla_grads) = loss(impl), loss('xla')
  np.testing.assert_allclose(cudnn_loss, xla_loss, rtol=1e-2)
  for g, r in zip(jax.tree.leaves(cudnn_grads), jax.tree.leaves(xla_grads)):
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    assert np.abs(g - r).max() <= 0.05 * np.abs(r).max() + 1e-6


def test_attention_benchmark_times_each_core_against_xla():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  command = [sys.executable, '-m', 'benchmarks.attention', '--batch=2', '--length=40',
             '--heads=4', '--kv_heads=2', '--head_dim=8', '--repeats=1']
  run = lambda *args: subprocess.run(command + list(args), cwd=root, capture_output=True,
                                     text=True, timeout=300, check=False)
  result = run('--impls=xla,block')
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(report['cores']) == {'xla', 'block'}
  assert report['cores']['xla']['max_abs_diff_from_xla'] == 0.0
  assert report['cores']['block']['max_abs_diff_from_xla'] < 1e-5
  assert max(report['cores']['block']['max_abs_grad_diff_from_xla'].values()) < 1e-4
  assert set(report['cores']['xla']['max_abs_grad_diff_from_xla']) == {'dq', 'dk', 'dv'}
  assert report['causal_flops'] == 3 * 2 * 2 * 4 * 40 * 40 * 8
  assert all(c['seconds'] > 0 for c in report['cores'].values())
  if jax.default_backend() != 'gpu':   # one line, no traceback
    result = run('--impls=cudnn', '--dtype=bfloat16')
    assert result.returncode == 2 and 'needs GPU' in result.stderr, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr


def test_packed_segments_of_the_attention_benchmark():
  # benchmarks.attention defines absl flags on import: read its helper in a subprocess.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ('from benchmarks import attention; s = attention.packed_segments(2, 40); '
          'print(s.shape, (s[:, :23] == 1).all(), (s[:, 23:] == 2).all())')
  result = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.stdout.split() == ['(2,', '40)', 'True', 'True'], result.stderr[-3000:]
