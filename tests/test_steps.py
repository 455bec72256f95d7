"""Train / eval steps: accumulation, remat/scan invariance, golden values, sharding."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharded_step_check as check
from configs import pretrain
from model import attention
from model.config import ModelConfig, num_params
from model.transformer import Transformer
from train import losses
from train import mesh as mesh_lib
from train import state as state_lib
from train import steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def reference():
  """Two train steps of `check.small_config()` on one device, shared by the tests below."""
  config = check.small_config()
  model, mesh, state, shardings, train_step = check.build(config)
  init = jax.device_get(state)
  after_1, metrics_1 = train_step(state, check.make_batch(config, seed=0))
  after_1 = jax.device_get(after_1)
  after_2, metrics_2 = train_step(jax.device_put(after_1, shardings),
                                  check.make_batch(config, seed=1))
  return dict(config=config, model=model, mesh=mesh, shardings=shardings, init=init,
              after_1=after_1, metrics_1=jax.device_get(metrics_1),
              losses=[float(metrics_1['train/loss']), float(metrics_2['train/loss'])],
              params_2=check.flat_params(after_2.params))


def _assert_trees_close(a, b, rtol, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_next_token_targets_stay_inside_segments():
  batch = {'tokens': jnp.array([[5, 6, 7, 8, 9, 0]]),
           'segment_ids': jnp.array([[1, 1, 2, 2, 2, 0]])}
  targets, weights = losses.next_token_targets(batch)
  np.testing.assert_array_equal(targets[0, :4], [6, 7, 8, 9])
  # 6->7 crosses documents, 9->pad is padding, the pad and the last column are no targets.
  np.testing.assert_array_equal(weights[0], [1, 0, 1, 1, 0, 0])


def test_cross_entropy_sums_and_z_loss():
  logits = jnp.array([[[0.0, math.log(3.0)], [1.0, 1.0]]])
  targets = jnp.array([[1, 0]])
  weights = jnp.array([[1.0, 0.0]])
  nll, z, n = losses.cross_entropy(logits, targets, weights, z_loss=0.5)
  np.testing.assert_allclose(nll, -math.log(3 / 4), rtol=1e-6)
  np.testing.assert_allclose(z, 0.5 * math.log(4.0) ** 2, rtol=1e-6)
  assert float(n) == 1.0


def test_grad_accumulation_equals_one_large_batch(reference):
  config = check.small_config('optimizer.grad_accum_steps=4')
  _, _, state, _, train_step = check.build(config)
  # The batch's rows hold different numbers of target tokens, so averaging
  # per-micro-batch means would differ from the large-batch mean.
  after_4, metrics_4 = jax.device_get(train_step(state, check.make_batch(config, seed=0)))
  metrics_1, after_1 = reference['metrics_1'], reference['after_1']
  np.testing.assert_allclose(metrics_4['train/loss'], metrics_1['train/loss'], rtol=1e-6)
  np.testing.assert_allclose(metrics_4['train/grad_norm'], metrics_1['train/grad_norm'], rtol=1e-5)
  assert metrics_4['train/num_tokens'] == metrics_1['train/num_tokens']
  # Adam's first update is ~lr * sign(grad): allow 1% of that lr (5e-3) for
  # elements whose gradient is near zero.
  _assert_trees_close(after_4.params, after_1.params, rtol=1e-5, atol=5e-5)
  # Moments of ~1e-4; a few near-zero ones differ by ~2e-9 (float32 sums in another order).
  _assert_trees_close(after_4.opt_state, after_1.opt_state, rtol=1e-4, atol=1e-8)


def _unstack_layers(params, num_layers):
  """Scanned params ('layers' with a leading axis) -> unrolled 'layers_0', 'layers_1', ..."""
  params = dict(params)
  stacked = params.pop('layers')
  for i in range(num_layers):
    params[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


def _loss_and_grads(config, params, batch):
  model = Transformer(ModelConfig.from_config(config.model))

  def loss_fn(p):
    logits = model.apply({'params': p}, batch['tokens'], segment_ids=batch['segment_ids'],
                         positions=batch['positions'])
    targets, weights = losses.next_token_targets(batch)
    nll, _, n = losses.cross_entropy(logits, targets, weights)
    return nll / n

  return jax.jit(jax.value_and_grad(loss_fn))(params)


def test_remat_and_scan_do_not_change_loss_or_grads(reference):
  config = reference['config']
  batch = check.make_batch(config)
  params = reference['init'].params
  loss, grads = _loss_and_grads(config, params, batch)
  scanned_full = check.small_config('model.remat_policy=full')
  other_loss, other_grads = _loss_and_grads(scanned_full, params, batch)
  np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
  _assert_trees_close(other_grads, grads, rtol=1e-4, atol=1e-7)
  unrolled = check.small_config('model.scan_layers=False,model.remat_policy=dots_saveable')
  other_loss, other_grads = _loss_and_grads(unrolled, _unstack_layers(params, 2), batch)
  np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
  _assert_trees_close(other_grads, _unstack_layers(grads, 2), rtol=1e-4, atol=1e-7)


# Recorded from this code at commit time (CPU, float32). A change here means
# the init, the model or the step changed numerics: update only on purpose.
GOLDEN_FIRST_LOSS = 4.888219833374023
GOLDEN_SECOND_LOSS = 4.862430095672607


def test_golden_first_steps(reference):
  losses_ = reference['losses']
  # The fixture is `tiny`'s tied head: at init the scaled tied logits give the
  # input token ~1 and the others std 1/sqrt(d), so the loss is ~ln(vocab)
  # (tests/test_init_loss.py); unscaled it would be ~sqrt(d) nats higher.
  assert abs(losses_[0] - math.log(reference['config'].model.vocab_size)) < 0.1, losses_
  np.testing.assert_allclose(losses_, [GOLDEN_FIRST_LOSS, GOLDEN_SECOND_LOSS], rtol=1e-5)


def test_eval_step_and_evaluate_batches(reference):
  config, model, mesh = reference['config'], reference['model'], reference['mesh']
  eval_step = steps.make_eval_step(
      config, model, mesh, reference['shardings'].params,
      mesh_lib.batch_sharding(mesh, mesh_lib.logical_rules(config.mesh)))
  state = reference['after_1']
  batches = [check.make_batch(config, seed) for seed in range(3)]
  result = steps.evaluate_batches(eval_step, state.params, batches)
  nats, count = 0.0, 0.0
  for batch in batches:
    logits = model.apply({'params': state.params}, batch['tokens'],
                         segment_ids=batch['segment_ids'], positions=batch['positions'])
    targets, weights = losses.next_token_targets(batch)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    nats += float(jnp.sum(nll * weights))
    count += float(jnp.sum(weights))
  assert result['num_tokens'] == count
  np.testing.assert_allclose(result['loss'], nats / count, rtol=1e-5)
  np.testing.assert_allclose(result['perplexity'], math.exp(nats / count), rtol=1e-5)


def test_sharded_step_matches_single_device(reference, tmp_path):
  out = tmp_path / 'sharded.npz'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tests', 'sharded_step_check.py'), str(out),
       'data=2,fsdp=2,tensor=2'],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  sharded = np.load(out)
  np.testing.assert_allclose(sharded['losses'], reference['losses'], rtol=2e-6)
  for name, value in reference['params_2'].items():
    np.testing.assert_allclose(sharded['param/' + name], value, rtol=1e-4, atol=5e-5,
                               err_msg=name)


@pytest.mark.parametrize('preset,expected', [('1b', 1.104e9), ('7b', 6.738e9)])
def test_large_presets_build_abstract_state(preset, expected):
  config = pretrain.get_config(preset)
  model = Transformer(ModelConfig.from_config(config.model))
  mesh = mesh_lib.make_mesh(config.mesh)  # fsdp=-1 over the one CPU device
  abstract, shardings = state_lib.abstract_state(config, model, mesh)
  leaves = jax.tree.leaves(abstract.params)
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(abstract))
  count = sum(math.prod(leaf.shape) for leaf in leaves)
  assert count == num_params(ModelConfig.from_config(config.model))
  assert abs(count - expected) / expected < 1e-3, count
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract)


def test_a_frozen_tree_is_passed_through_never_donated_or_changed(reference):
  """A stage's frozen tree (e.g. a reference model) enters the loss but never the update."""
  from train import objectives  # pylint: disable=g-import-not-at-top
  config, model, mesh = reference['config'], reference['model'], reference['mesh']
  shardings = reference['shardings']
  frozen = jax.device_put(jax.tree.map(lambda x: x + 1.0, reference['init'].params),
                          shardings.params)
  before = jax.device_get(frozen)
  base = objectives.next_token(model)

  def loss_fn(params, batch, rng, frozen_tree):
    # Pull towards the frozen tree: its gradient flows to params only.
    sum_loss, aux = base(params, batch, rng, None)
    pull = sum(jnp.sum((p - f) ** 2) for p, f in zip(jax.tree.leaves(params),
                                                     jax.tree.leaves(frozen_tree)))
    return sum_loss + pull * aux['count'], dict(aux, pull=pull * aux['count'])

  step = steps.make_train_step(
      config, model, mesh, shardings,
      mesh_lib.batch_sharding(mesh, mesh_lib.logical_rules(config.mesh)),
      loss_fn=loss_fn, frozen=frozen, frozen_shardings=shardings.params)
  state = jax.device_put(reference['init'], shardings)
  for seed in range(2):
    state, metrics = step(state, check.make_batch(config, seed))
  assert float(metrics['train/pull']) > 0
  assert not any(x.is_deleted() for x in jax.tree.leaves(frozen))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), before)
  # The params moved towards it: the pull term shrank.
  assert not np.allclose(jax.device_get(state.params['embed']['embedding']),
                         reference['init'].params['embed']['embedding'])


def _train_step_hlo(reference) -> str:
  """The optimized HLO of the reference train step, made and compiled afresh
  (so a monkeypatched option or platform takes effect)."""
  config, model, mesh, shardings = (reference[k] for k in ('config', 'model', 'mesh',
                                                            'shardings'))
  step = steps.make_train_step(config, model, mesh, shardings,
                               mesh_lib.batch_sharding(mesh, mesh_lib.logical_rules(config.mesh)))
  state = jax.device_put(reference['init'], shardings)
  return step.lower(state, check.make_batch(config)).compile().as_text()


def _library_fusions(hlo: str) -> list[str]:
  """The op names of the compiled step's YNNPACK fusions (XLA:CPU's library calls).

  A fusion without an op name gives '' (which no assertion below accepts).
  """
  names = []
  for line in re.findall(r'^\s+%\S+ = .*"kind":"__ynn_fusion".*$', hlo, re.M):
    match = re.search(r'op_name="([^"]*)"', line)
    names.append(match.group(1) if match else '')
  return names


def test_cpu_train_step_reads_rope_from_a_table_not_sin_and_cos(reference, monkeypatch):
  # Computed in the step, sin and cos are fused into every rotation of the
  # queries and keys, forward and backward, and evaluated per element and
  # head (3-5% of a bench_cpu step); on CPU they come from a table instead.
  def transcendentals():
    # Per-element ones: the learning-rate schedule's cosine is a scalar, f32[].
    return len(re.findall(r'= f32\[\d[^\]]*\]\S* (?:sine|cosine)\(', _train_step_hlo(reference)))

  assert transcendentals() == 0
  # The computed path (what TPU/GPU trace) has them: the check can see them.
  monkeypatch.setattr(attention, 'current_platform', lambda: 'tpu')
  assert transcendentals() > 0


def test_cpu_steps_compile_no_library_fusions(reference, monkeypatch):
  # By default XLA:CPU hands dots, with the reductions and elementwise ops
  # next to them, to YNNPACK (attention's softmax sums ran at ~8 GFLOP/s so);
  # the steps ask for XLA's own dots and fusions on CPU, and for nothing elsewhere.
  mesh = reference['mesh']
  assert steps.compiler_options(mesh) == steps.CPU_COMPILER_OPTIONS
  assert _library_fusions(_train_step_hlo(reference)) == []

  # XLA's default, which the option turns off: library fusions, some with a reduction.
  monkeypatch.setattr(steps, 'CPU_COMPILER_OPTIONS', {})
  default = _library_fusions(_train_step_hlo(reference))
  assert any('reduce' in op for op in default)

  monkeypatch.setattr(steps, 'mesh_platform', lambda mesh: 'tpu')
  assert steps.compiler_options(mesh) is None
