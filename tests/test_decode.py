"""KV-cache decoding == recomputing the forward pass; EOS handling; sharding."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from model import decode
from model.config import ModelConfig
from model.transformer import Transformer
from train import generate as generate_cli
from train import mesh as mesh_lib

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, max_len=64)
# Different lengths, so the batch needs padding; all start with BOS (2).
PROMPTS = [[2, 5, 6, 7, 8], [2, 9], [2, 10, 11, 12, 13, 14, 15, 16], [2, 40, 41]]
NEW = 10


@pytest.fixture(scope='module')
def model_and_params():
  model = Transformer(CFG)
  init = jax.jit(model.init)
  params = nn.unbox(init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params'])
  return model, params


@pytest.fixture(scope='module')
def greedy_cached(model_and_params):
  model, params = model_and_params
  return decode.generate(model, params, PROMPTS, max_new_tokens=NEW, rng=jax.random.key(1),
                         greedy=True, eos_id=None)


def _score(model, params, prompts, completions_BN):
  """Teacher-forced log-probs of each completion after its prompt, one forward pass."""
  rows = [list(p) + list(c) for p, c in zip(prompts, completions_BN)]
  width = max(len(r) for r in rows)
  seq = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    seq[i, :len(r)] = r
  segments = (np.arange(width)[None] < np.array([len(r) for r in rows])[:, None]).astype(np.int32)
  logits = jax.jit(model.apply)({'params': params}, seq, segments)
  logp = np.asarray(jax.nn.log_softmax(logits))
  return np.array([[logp[b, len(p) - 1 + i, t] for i, t in enumerate(c)]
                   for b, (p, c) in enumerate(zip(prompts, completions_BN))])


def test_cached_equals_uncached_greedy_with_padded_batch(model_and_params, greedy_cached):
  model, params = model_and_params
  ref = decode.generate_uncached(model, params, PROMPTS, max_new_tokens=NEW,
                                 rng=jax.random.key(1), greedy=True, eos_id=None)
  tokens = np.asarray(greedy_cached.tokens)
  np.testing.assert_array_equal(tokens, np.asarray(ref.tokens))
  np.testing.assert_allclose(np.asarray(greedy_cached.logprobs), np.asarray(ref.logprobs),
                             atol=2e-5, rtol=1e-5)
  assert tokens.shape == (len(PROMPTS), NEW)
  assert len({tuple(row) for row in tokens}) > 1          # not a degenerate constant output
  assert np.asarray(greedy_cached.mask).all() and int(greedy_cached.num_steps) == NEW
  # Raw model log-probs: the same as scoring prompt + completion in one pass.
  # (No padding there at all, so this also shows the padding is invisible.)
  np.testing.assert_allclose(np.asarray(greedy_cached.logprobs),
                             _score(model, params, PROMPTS, tokens), atol=2e-5)
  np.testing.assert_array_equal(np.asarray(greedy_cached.sampling_logprobs), 0.0)


def test_sampled_cached_equals_uncached_and_is_jittable(model_and_params):
  model, params = model_and_params
  prompt_BP, lengths_B = decode.pad_prompts(PROMPTS)
  kwargs = dict(max_new_tokens=NEW, rng=jax.random.key(7), temperature=0.8, top_k=20,
                top_p=0.95, eos_id=None)
  ref = decode.generate_uncached(model, params, prompt_BP, lengths_B, **kwargs)
  # The pure cached decoder jits end to end with only max_new_tokens & co static.
  sampling = decode.SamplingConfig(temperature=0.8, top_k=20, top_p=0.95)
  jitted = jax.jit(functools.partial(decode.decode_tokens, model, max_new_tokens=NEW,
                                     sampling=sampling, eos_id=None))
  cached = jitted(params, jnp.asarray(prompt_BP), jnp.asarray(lengths_B), jax.random.key(7))
  np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(ref.tokens))
  np.testing.assert_allclose(np.asarray(cached.logprobs), np.asarray(ref.logprobs), atol=2e-5)
  np.testing.assert_allclose(np.asarray(cached.sampling_logprobs),
                             np.asarray(ref.sampling_logprobs), atol=2e-5)


def test_eos_stops_rows_and_the_loop(model_and_params, greedy_cached):
  model, params = model_and_params
  free = np.asarray(greedy_cached.tokens)
  eos = int(free[0, 2])  # row 0 will emit it at step 2 (or earlier)
  out = decode.generate(model, params, PROMPTS, max_new_tokens=NEW, rng=jax.random.key(1),
                        greedy=True, eos_id=eos, pad_id=0)
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  for row in range(len(PROMPTS)):
    hits = np.flatnonzero(free[row] == eos)
    stop = hits[0] + 1 if len(hits) else NEW
    np.testing.assert_array_equal(tokens[row, :stop], free[row, :stop])
    np.testing.assert_array_equal(tokens[row, stop:], 0)
    np.testing.assert_array_equal(mask[row], np.arange(NEW) < stop)
    assert bool(out.done[row]) == bool(len(hits))
    assert int(out.lengths[row]) == stop
    np.testing.assert_array_equal(np.asarray(out.logprobs)[row, stop:], 0.0)
  # Every row the same prompt (same shapes, no recompilation): all rows finish
  # together and the loop ends right there, well before NEW steps.
  same_BP, _ = decode.pad_prompts([PROMPTS[0]] * 3 + [PROMPTS[2]])
  same_BP[3] = same_BP[0]
  same = decode.generate(model, params, same_BP, np.full(4, len(PROMPTS[0]), np.int32),
                         max_new_tokens=NEW, rng=jax.random.key(1), greedy=True, eos_id=eos)
  first = int(np.flatnonzero(free[0] == eos)[0])
  assert int(same.num_steps) == first + 1 < NEW
  assert np.asarray(same.done).all()


def test_bad_lengths_are_rejected(model_and_params):
  model, params = model_and_params
  with pytest.raises(ValueError, match='max_len'):
    decode.generate(model, params, PROMPTS, max_new_tokens=NEW, rng=jax.random.key(0),
                    eos_id=None, max_len=12)
  with pytest.raises(ValueError, match='empty'):
    decode.generate(model, params, [[2], []], max_new_tokens=2, rng=jax.random.key(0),
                    eos_id=None)


_SHARDED = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn, ml_collections
    from model import decode
    from model.config import ModelConfig
    from model.transformer import Transformer
    from train import mesh as mesh_lib
    assert jax.device_count() == 8
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=64, max_len=64)
    model = Transformer(cfg)
    boxed = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
    params = nn.unbox(boxed)
    mesh_cfg = ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2, num_slices=1,
                                             rules_preset='fsdp_tp', rules=()))
    mesh = mesh_lib.make_mesh(mesh_cfg)
    rules = mesh_lib.logical_rules(mesh_cfg)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    sharded = jax.device_put(params, shardings)
    assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(sharded))
    prompts, new, want_tokens, want_logprobs = json.loads(sys.argv[1])
    out = decode.generate(model, sharded, prompts, max_new_tokens=new, rng=jax.random.key(1),
                          greedy=True, eos_id=None, mesh=mesh, rules=rules)
    np.testing.assert_array_equal(np.asarray(out.tokens), want_tokens)
    np.testing.assert_allclose(np.asarray(out.logprobs), want_logprobs, atol=1e-4)
    print('SHARDED_OK')
''')


def test_sharded_generation_matches_single_device(greedy_cached):
  """Params sharded as in training (fsdp + tensor) give the unsharded tokens."""
  want = [PROMPTS, NEW, np.asarray(greedy_cached.tokens).tolist(),
          np.asarray(greedy_cached.logprobs).tolist()]
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', _SHARDED, json.dumps(want)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
  assert 'SHARDED_OK' in result.stdout, result.stderr[-3000:]


class _CharTokenizer:
  """Stand-in tokenizer: one token per character, ids 4.. ('a' -> 4)."""
  pad_id, bos_id, eos_id = 0, 2, 3

  def encode(self, text):
    return [4 + ord(c) - ord('a') for c in text]

  def decode(self, ids):
    return ''.join(chr(ord('a') + i - 4) if i >= 4 else '' for i in ids)


def test_generate_cli_prompts_samples_and_format(model_and_params):
  model, params = model_and_params
  config = ml_collections.ConfigDict(dict(mesh=dict(data=-1, fsdp=1, tensor=1, num_slices=1,
                                                    rules_preset='fsdp_tp', rules=None)))
  mesh = mesh_lib.make_mesh(config.mesh)
  tokenizer = _CharTokenizer()
  samples = generate_cli.sample_completions(
      config, model, params, tokenizer, mesh, ['b', 'cdefghij'], max_new_tokens=NEW,
      num_samples=2, greedy=True)
  assert [(s['prompt'], s['sample']) for s in samples] == [('b', 0), ('b', 1), ('cdefghij', 0),
                                                           ('cdefghij', 1)]
  # 'b' is id 5, so the first prompt is [BOS, 5]: the same as decoding that directly.
  direct = decode.generate(model, params, [[2, 5]], max_new_tokens=NEW, rng=jax.random.key(0),
                           greedy=True, eos_id=3)
  new_ids = [int(t) for t, m in zip(direct.tokens[0], direct.mask[0]) if m and t != 3]
  assert samples[0]['completion'] == samples[1]['completion'] == tokenizer.decode(new_ids)
  assert samples[0]['num_tokens'] == int(direct.lengths[0])
  assert samples[0]['stopped'] == bool(direct.done[0])
  text = generate_cli.format_sample(samples[0], 0, 4)
  assert '----- prompt -----\nb\n----- completion -----\n' in text


def test_generation_stops_at_any_of_several_stop_ids(model_and_params):
  """A chat model stops at <|end|> or EOS: the row is done at the first of either."""
  model, params = model_and_params
  free = decode.generate(model, params, [[2, 5], [2, 7]], max_new_tokens=NEW,
                         rng=jax.random.key(0), greedy=True, eos_id=None)
  first = [int(free.tokens[0][0]), int(free.tokens[1][1])]   # what each row emits, greedily
  out = decode.generate(model, params, [[2, 5], [2, 7]], max_new_tokens=NEW,
                        rng=jax.random.key(0), greedy=True, eos_id=tuple(first))
  assert bool(out.done[0]) and int(out.lengths[0]) == 1
  assert bool(out.done[1]) and int(out.lengths[1]) <= 2
  assert decode.stop_ids(3) == (3,) and decode.stop_ids((7, 3)) == (7, 3)
