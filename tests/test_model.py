"""Tests for the transformer: masking, layouts, remat, the KV cache, counts."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from model import attention
from model import layers
from model.config import ModelConfig, flops_per_token, num_params
from model.transformer import Transformer, init_cache
from train import losses

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, max_len=64)
CFG1 = dataclasses.replace(CFG, num_layers=1)  # where depth does not matter: faster compiles


@functools.lru_cache(maxsize=None)
def _init(cfg: ModelConfig, length: int = 12, batch: int = 2):
  """Random parameters in the model's tree structure.

  Drawn with numpy rather than `Transformer.init`: compiling the init's
  random-number generation costs seconds per config, and the tests only need
  generic values (norm scales away from 1 so the norms are exercised too).
  """
  tokens = jnp.zeros((batch, length), jnp.int32)
  shapes = jax.eval_shape(lambda: nn.unbox(Transformer(cfg).init(jax.random.key(0), tokens)))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)
    fan_in = cfg.vocab_size if 'embedding' in name else cfg.d_model
    return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes['params'])


@functools.lru_cache(maxsize=None)
def _forward(cfg: ModelConfig):
  """A jitted uncached forward pass (one compile per config and shape)."""
  return jax.jit(lambda params, tokens, segment_ids, positions: Transformer(cfg).apply(
      {'params': params}, tokens, segment_ids=segment_ids, positions=positions))


def _apply(cfg: ModelConfig, params, tokens):
  """Forward pass with the default (single segment, arange) positions."""
  batch, length = tokens.shape
  return _forward(cfg)(params, tokens, jnp.ones((batch, length), jnp.int32),
                       jnp.broadcast_to(jnp.arange(length), (batch, length)))


def _tokens(seed: int, shape: tuple[int, ...]) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(1, CFG.vocab_size, shape), jnp.int32)


def test_causality():
  params = _init(CFG)
  tokens = _tokens(1, (2, 12))
  changed = tokens.at[:, 7:].set(_tokens(2, (2, 5)))
  forward = _forward(CFG)
  seg = jnp.ones((2, 12), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  logits = forward(params, tokens, seg, pos)
  logits_changed = forward(params, changed, seg, pos)
  np.testing.assert_allclose(logits[:, :7], logits_changed[:, :7], rtol=1e-5, atol=1e-5)
  assert np.abs(logits[:, 7:] - logits_changed[:, 7:]).max() > 1e-3


def test_segment_isolation_in_a_packed_row():
  params = _init(CFG)
  doc_a, doc_b = _tokens(3, (5,)), _tokens(4, (4,))
  pad = lambda n: jnp.zeros((n,), jnp.int32)
  packed = jnp.concatenate([doc_a, doc_b, pad(3)])
  seg = jnp.array([1] * 5 + [2] * 4 + [0] * 3)
  pos = jnp.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0, 0])
  # Row 0: the two documents packed; row 1: document b alone.
  tokens = jnp.stack([packed, jnp.concatenate([doc_b, pad(8)])])
  segs = jnp.stack([seg, jnp.array([1] * 4 + [0] * 8)])
  positions = jnp.stack([pos, jnp.arange(12)])
  logits = _forward(CFG)(params, tokens, segs, positions)
  alone_a = _apply(CFG, params, jnp.stack([jnp.concatenate([doc_a, pad(7)])] * 2))
  np.testing.assert_allclose(logits[0, :5], alone_a[0, :5], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[0, 5:9], logits[1, :4], rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(logits)).all()


def test_all_padding_row_is_finite():
  params = _init(CFG)
  tokens = jnp.zeros((2, 12), jnp.int32)
  seg = jnp.zeros((2, 12), jnp.int32).at[1, :4].set(1)
  pos = jnp.zeros((2, 12), jnp.int32)
  logits = _forward(CFG)(params, tokens, seg, pos)
  assert np.isfinite(np.asarray(logits)).all()


@functools.lru_cache(maxsize=None)
def _reference_loss_and_grads():
  cfg = dataclasses.replace(CFG, scan_layers=True, remat_policy='none')
  params = _init(cfg)
  return params, _loss_and_grads(cfg, params, _tokens(5, (2, 9)))


def _loss_and_grads(cfg: ModelConfig, params, tokens):
  def loss_fn(params):
    logits = Transformer(cfg).apply({'params': params}, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
  return jax.jit(jax.value_and_grad(loss_fn))(params)


def _scan_to_loop(params: dict, num_layers: int) -> dict:
  """Scanned params (leading layer axis under 'layers') -> 'layers_i' params."""
  out = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(num_layers):
    out[f'layers_{i}'] = jax.tree.map(lambda x: x[i], params['layers'])
  return out


@pytest.mark.parametrize('scan_layers,remat_policy', [
    (True, 'full'), (True, 'dots_saveable'), (False, 'full'),
])
def test_scan_and_remat_do_not_change_loss_or_gradients(scan_layers, remat_policy):
  tokens = _tokens(5, (2, 9))
  params, (ref_loss, ref_grads) = _reference_loss_and_grads()
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers, remat_policy=remat_policy)
  if not scan_layers:
    params, ref_grads = (_scan_to_loop(t, CFG.num_layers) for t in (params, ref_grads))
  loss, grads = _loss_and_grads(cfg, params, tokens)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               grads, ref_grads)


def test_unknown_remat_policy_is_a_clear_error():
  with pytest.raises(ValueError, match="remat_policy='everything'.*dots_saveable"):
    dataclasses.replace(CFG, remat_policy='everything')


def _cached_logits(cfg, params, prompt_tokens, prompt_seg, new_tokens, max_len):
  """Prefill the prompts in one call, then feed `new_tokens` one at a time."""
  model = Transformer(cfg)
  batch = prompt_tokens.shape[0]
  cache = init_cache(cfg, batch, max_len)
  step = jax.jit(lambda params, cache, tokens, seg: model.apply(
      {'params': params, 'cache': cache}, tokens, segment_ids=seg, decode=True,
      mutable=['cache']))
  logits, variables = step(params, cache, prompt_tokens, prompt_seg)
  outs = [logits]
  for t in range(new_tokens.shape[1]):
    logits, variables = step(params, variables['cache'], new_tokens[:, t:t + 1],
                             jnp.ones((batch, 1), jnp.int32))
    outs.append(logits)
  return outs


@pytest.mark.parametrize('padding,scan_layers', [('left', True), ('right', False)])
def test_cached_decoding_equals_full_forward(padding, scan_layers):
  cfg = dataclasses.replace(CFG, scan_layers=scan_layers)
  params = _init(cfg)
  lengths, width, num_new = [3, 6, 1], 6, 4
  rows = [_tokens(10 + i, (n + num_new,)) for i, n in enumerate(lengths)]
  prompts, prompt_seg = [], []
  for row, n in zip(rows, lengths):
    pad = [0] * (width - n)
    tokens, seg = list(np.asarray(row[:n])), [1] * n
    prompts.append(pad + tokens if padding == 'left' else tokens + pad)
    prompt_seg.append(pad + seg if padding == 'left' else seg + pad)
  prompts, prompt_seg = jnp.array(prompts), jnp.array(prompt_seg)
  new_tokens = jnp.stack([row[n:] for row, n in zip(rows, lengths)])
  outs = _cached_logits(cfg, params, prompts, prompt_seg, new_tokens, max_len=16)

  # The uncached reference: each full sequence alone (one batch, right-padded
  # into its own segment so padding cannot leak in).
  total = max(lengths) + num_new
  full_tokens = jnp.array([list(np.asarray(r)) + [0] * (total - len(r)) for r in rows])
  full_seg = jnp.array([[1] * len(r) + [0] * (total - len(r)) for r in rows])
  full_pos = jnp.broadcast_to(jnp.arange(total), full_tokens.shape)
  full_logits = _forward(cfg)(params, full_tokens, full_seg, full_pos)
  for b, (row, n) in enumerate(zip(rows, lengths)):
    full = full_logits[b]
    offset = width - n if padding == 'left' else 0
    np.testing.assert_allclose(outs[0][b, offset:offset + n], full[:n], rtol=1e-4, atol=1e-4)
    for t in range(num_new):
      np.testing.assert_allclose(outs[t + 1][b, 0], full[n + t], rtol=1e-4, atol=1e-4)


def test_cache_index_and_layout():
  cache = init_cache(CFG, batch_size=3, max_len=10)
  attn = cache['layers']['attn']
  assert attn['cached_key'].shape == (CFG.num_layers, 3, CFG.num_kv_heads, CFG.head_dim, 10)
  assert attn['cached_value'].shape == (CFG.num_layers, 3, CFG.num_kv_heads, 10, CFG.head_dim)
  assert attn['cache_index'].shape == (CFG.num_layers, 3)
  params = _init(CFG)
  seg = jnp.array([[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]])
  _, variables = jax.jit(lambda params, cache: Transformer(CFG).apply(
      {'params': params, 'cache': cache}, jnp.ones((3, 4), jnp.int32), segment_ids=seg,
      decode=True, mutable=['cache']))(params, cache)
  # Left padding stays in the cache; right padding is overwritten next; an
  # all-padding row does not move.
  np.testing.assert_array_equal(variables['cache']['layers']['attn']['cache_index'][0], [4, 3, 0])


def test_num_params_matches_param_tree():
  for tie in (False, True):
    for scan in (False, True):
      cfg = dataclasses.replace(CFG, tie_embeddings=tie, scan_layers=scan)
      params = jax.eval_shape(lambda: _init(cfg))
      assert sum(x.size for x in jax.tree.leaves(params)) == num_params(cfg)
  assert 'lm_head' not in jax.eval_shape(
      lambda: _init(dataclasses.replace(CFG, tie_embeddings=True)))


def test_input_and_tied_logit_scales():
  """The two switches a Hugging Face Llama checkpoint turns off (ModelConfig)."""
  tokens = _tokens(9, (2, 12))
  root_d = np.sqrt(CFG1.d_model)
  tied = dataclasses.replace(CFG1, tie_embeddings=True, scale_tied_logits=True)
  params = _init(tied)
  # Tied logits are x @ E.T times 1/sqrt(d); off, plain x @ E.T.
  np.testing.assert_allclose(
      _apply(tied, params, tokens),
      _apply(dataclasses.replace(tied, scale_tied_logits=False), params, tokens) / root_d,
      rtol=1e-5, atol=1e-6)
  # Without the input multiplier a table stored sqrt(d) times larger is the
  # same model (untied, so the table feeds the input only).
  params = _init(CFG1)
  unscaled = dict(params, embed={'embedding': params['embed']['embedding'] * root_d})
  np.testing.assert_allclose(
      _apply(dataclasses.replace(CFG1, scale_embeddings=False), unscaled, tokens),
      _apply(CFG1, params, tokens), rtol=1e-4, atol=1e-5)


def test_flops_per_token():
  cfg = CFG
  non_embedding = num_params(cfg) - cfg.vocab_size * cfg.d_model
  expected = 6 * non_embedding + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * 128
  assert flops_per_token(cfg, 128) == expected
  tied = dataclasses.replace(cfg, tie_embeddings=True)
  # Tying removes head parameters but not the logits matmul.
  assert flops_per_token(tied, 128) == expected


def test_params_name_logical_axes():
  boxed = jax.eval_shape(lambda: Transformer(CFG).init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params'])
  is_box = lambda x: isinstance(x, nn.Partitioned)
  leaves = jax.tree.leaves(boxed, is_leaf=is_box)
  assert all(is_box(x) and len(x.names) == x.value.ndim for x in leaves)
  names = jax.tree.map(lambda x: x.names, boxed, is_leaf=is_box)
  assert names['layers']['attn']['wq'] == ('layers', 'embed', 'heads', 'kv')
  assert names['layers']['attn']['wk'] == ('layers', 'embed', 'kv_heads', 'kv')
  assert names['embed']['embedding'] == ('vocab', 'embed')


def test_dropout_uses_the_dropout_rng_only_when_not_deterministic():
  cfg = dataclasses.replace(CFG1, dropout_rate=0.5)
  params = _init(CFG1)
  tokens = _tokens(6, (2, 12))
  model = Transformer(cfg)
  apply = jax.jit(lambda seed, det: model.apply(
      {'params': params}, tokens, deterministic=det, rngs={'dropout': jax.random.key(seed)}),
                  static_argnums=1)
  np.testing.assert_array_equal(apply(0, True), apply(1, True))
  np.testing.assert_array_equal(apply(0, False), apply(0, False))
  assert np.abs(apply(0, False) - apply(1, False)).max() > 1e-3


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
  params = _init(CFG1)
  tokens = _tokens(7, (2, 12))
  ref = _apply(CFG1, params, tokens)
  logits = _apply(dataclasses.replace(CFG1, dtype='bfloat16'), params, tokens)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, ref, atol=0.15)


def test_splash_model_path_equals_xla(monkeypatch):
  """The model's splash path (kernel in the Pallas interpreter, TPU pretended)."""
  cfg = dataclasses.replace(CFG1, head_dim=64, attention_impl='splash')
  monkeypatch.setattr(attention, 'mesh_platform', lambda mesh: 'tpu')
  monkeypatch.setattr(attention, 'splash_attention',
                      functools.partial(attention.splash_attention, interpret=True))
  params = _init(dataclasses.replace(cfg, attention_impl='xla'), length=128, batch=1)
  tokens = _tokens(8, (1, 128))
  seg = jnp.array([[1] * 70 + [2] * 50 + [0] * 8])
  pos = jnp.array([list(range(70)) + list(range(50)) + [0] * 8])
  splash = _forward(cfg)(params, tokens, seg, pos)
  ref = _forward(dataclasses.replace(cfg, attention_impl='xla'))(params, tokens, seg, pos)
  np.testing.assert_allclose(splash, ref, rtol=1e-4, atol=1e-4)


def test_config_validation_and_from_config():
  with pytest.raises(ValueError, match='num_heads .6. must be a multiple of num_kv_heads .4.'):
    dataclasses.replace(CFG, num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match='attention_impl'):
    dataclasses.replace(CFG, attention_impl='flash')
  with pytest.raises(ValueError, match='head_dim must be even'):
    dataclasses.replace(CFG, head_dim=7)
  config = ml_collections.ConfigDict(dataclasses.asdict(CFG))
  assert ModelConfig.from_config(config) == CFG
  config.num_heds = 3
  with pytest.raises(KeyError, match='num_heds'):
    ModelConfig.from_config(config)


def test_learns_to_copy_a_repeated_random_sequence():
  """Retrieval from the context, learnt: the second half of each row repeats the first.

  The first half is uniform noise (nothing to learn: its loss stays at
  ln V); the second half is predictable only by attending back to the
  position half a row earlier and copying its token. A 2-layer model learns
  it in ~250 Adam steps, which needs RoPE's relative positions, the causal
  mask and the attention's gradient to be right. The offset is the same in
  every row, so a positional head suffices: this is not an induction head
  (matching the current token's earlier occurrence), which `tiny` did not
  learn in 300-1,000 steps of repeats at varying offsets at a learning rate
  of 3e-3, and at 1e-3 only begins to (README, preferences;
  benchmarks/copy_learning.py).
  """
  vocab, length, batch, steps = 64, 128, 16, 400  # two attention blocks
  cfg = ModelConfig(vocab_size=vocab, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, mlp_dim=128, max_len=length, scan_layers=False)
  model = Transformer(cfg)
  rng = np.random.default_rng(0)

  def rows():
    half = rng.integers(1, vocab, size=(batch, length // 2))
    return jnp.asarray(np.concatenate([half, half], 1), jnp.int32)

  # Jitted: op by op, the init and the held-out loss took 16 of the test's 43 s.
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, length), jnp.int32))['params']
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 2e-3, 50, steps))
  opt_state = tx.init(params)

  def nll(params, tokens):
    return -losses.token_log_probs(model.apply({'params': params}, tokens)[:, :-1], tokens[:, 1:])

  @jax.jit
  def step(params, opt_state, tokens):
    grads = jax.grad(lambda p: nll(p, tokens).mean())(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  held_out = rows()
  for _ in range(steps):
    params, opt_state = step(params, opt_state, rows())
  loss = jax.jit(nll)(params, held_out)
  first, repeat = float(loss[:, :length // 2 - 1].mean()), float(loss[:, length // 2:].mean())
  assert first > np.log(vocab) - 0.1, first  # noise stays unpredictable
  assert repeat < 0.3, repeat


@pytest.mark.parametrize('num_contract,dtype,preferred', [
    (1, jnp.float32, None), (2, jnp.float32, None), (1, jnp.bfloat16, jnp.float32),
])
def test_matmul_gradients_equal_plain_autodiff(num_contract, dtype, preferred):
  """`layers.matmul`'s CPU weight gradient (x transposed into memory first)
  equals autodiff of the plain einsum, and the transpose is really a copy."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 5, 4, 6)), dtype)
  w_shape = (4, 6, 7) if num_contract == 2 else (6, 7)
  w = jnp.asarray(rng.standard_normal(w_shape), dtype)
  g = jnp.asarray(rng.standard_normal((3, 5, 4, 7) if num_contract == 1 else (3, 5, 7)),
                  preferred or dtype)
  spec = 'abcd,de->abce' if num_contract == 1 else 'abcd,cde->abe'

  def vjp(f):
    y, pullback = jax.vjp(f, x, w)
    return (y, *pullback(g))

  got = vjp(lambda x, w: layers.matmul(x, w, num_contract, preferred))
  want = vjp(lambda x, w: jnp.einsum(spec, x, w, preferred_element_type=preferred))
  for a, b in zip(got, want):
    assert a.dtype == b.dtype and a.shape == b.shape
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol)
  grad_jaxpr = lambda: str(jax.make_jaxpr(
      lambda x, w: jax.grad(lambda w: layers.matmul(x, w, num_contract, preferred)
                            .astype(jnp.float32).sum())(w))(x, w))
  # The transposed copy is the CPU path only; a GPU keeps autodiff's gradient.
  assert ('optimization_barrier' in grad_jaxpr()) == (jax.default_backend() == 'cpu')
  # A step traced for a TPU topology on this CPU host keeps the plain gradient.
  from jax._src.mesh import AbstractDevice  # pylint: disable=g-import-not-at-top
  tpu_mesh = jax.sharding.AbstractMesh((1,), ('data',),
                                       abstract_device=AbstractDevice('TPU v5p', 1, 'tpu'))
  with jax.sharding.use_abstract_mesh(tpu_mesh):
    assert 'optimization_barrier' not in grad_jaxpr()
