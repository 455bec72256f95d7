"""LoRA: exact at step 0, base frozen, merge in float32, resume, refusals.

Unit tests on a small model, then SFT runs over the real stage runner
(`stage.run`, in-process) from a pre-trained run made here: the base stays
bitwise unchanged, the adapters move, the run resumes bitwise, its metrics
count the trainable parameters and optimizer bytes, generation and evaluation
load it merged, and a different base is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import lora as lora_config
from configs import pretrain as pretrain_config
from configs import sft as sft_config
from configs.cli import UserError
from data_pipeline import shards
from data_pipeline import tokenizer as tokenizer_lib
from model import config as model_config_lib
from model import transformer
from train import checkpoint
from train import lora
from train import mesh as mesh_lib
from train import objectives
from train import pretrain
from train import run_dir
from train import sft
from train import stage as stage_lib
from train import state as state_lib

VOCAB = 400
MODEL = ('model.vocab_size=400,model.d_model=32,model.num_layers=2,model.num_heads=2,'
         'model.num_kv_heads=1,model.head_dim=16,model.mlp_dim=64,model.max_len=128,'
         'seq_len=128,batch_size=4,log_every=1')


def _small(preset_args: str = '', **model):
  config = sft_config.get_config(f'tiny,{MODEL}{preset_args}')
  with config.unlocked():
    config.model.update(model)
  cfg = model_config_lib.ModelConfig.from_config(config.model)
  return config, transformer.Transformer(cfg), mesh_lib.make_mesh(config.mesh)


def _setup(config, model, mesh, rank=4, alpha=8.0, dropout=0.0,
           targets=lora_config.DEFAULT_TARGETS):
  return lora.setup(config, model, mesh, lora.LoraConfig(rank, alpha, dropout, targets))


def _logits(model, params, tokens):
  return jax.jit(lambda p: objectives.forward(model, p, {'tokens': tokens}, None))(params)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_step_zero_equals_the_base_and_merge_matches(scan_layers):
  config, model, mesh = _small(scan_layers=scan_layers)
  setup = _setup(config, model, mesh)
  assert len(setup.spec.targets) == (7 if scan_layers else 14)
  base = state_lib.create_sharded_state(config, model, mesh, jax.random.key(1))[0].params
  adapters = setup.init_state(config, jax.random.key(0)).params
  tokens = jax.random.randint(jax.random.key(2), (2, 32), 0, VOCAB)
  plain = _logits(model, base, tokens)
  adapted = _logits(model, lora.LoraParams(base, adapters, None, setup.spec), tokens)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))   # B = 0: exact

  moved = jax.tree.map(lambda x: x + 0.05, adapters)
  unmerged = _logits(model, lora.LoraParams(base, moved, None, setup.spec), tokens)
  merged = _logits(model, lora.merge(base, moved, setup.spec), tokens)
  assert float(jnp.max(jnp.abs(unmerged - plain))) > 0.1
  np.testing.assert_allclose(np.asarray(merged), np.asarray(unmerged), atol=1e-5, rtol=0)


def test_adapters_are_sharded_like_the_weight_they_adapt():
  config, model, mesh = _small(scan_layers=True)
  setup = _setup(config, model, mesh, rank=3)
  wq = setup.abstract_state.params['layers']['attn']['wq']
  wo = setup.abstract_state.params['layers']['attn']['wo']
  base = setup.base_abstract['layers']['attn']
  # wq [layers, embed, heads, kv]: A [layers, embed, r], B [layers, r, heads, kv].
  assert wq['lora_a'].shape == base['wq'].shape[:2] + (3,)
  assert wq['lora_b'].shape == (base['wq'].shape[0], 3) + base['wq'].shape[2:]
  # wo [layers, heads, kv, embed] projects back to the residual: fan-in heads x kv.
  assert wo['lora_a'].shape == base['wo'].shape[:3] + (3,)
  assert wo['lora_b'].shape == (base['wo'].shape[0], 3, base['wo'].shape[3])
  # On the FSDP + tensor rules each adapter axis goes where the weight's axis goes.
  rules = mesh_lib.RULE_PRESETS['fsdp_tp'] + ((lora.RANK_AXIS, None),)
  targets = {t.name: t for t in setup.spec.targets}
  wq_t, wo_t = targets['layers/attn/wq'], targets['layers/attn/wo']
  assert wq_t.a_names() == ('layers', 'embed', 'lora_rank')
  assert wq_t.b_names() == ('layers', 'lora_rank', 'heads', 'kv')
  assert wo_t.a_names() == ('layers', 'heads', 'kv', 'lora_rank')
  assert wo_t.b_names() == ('layers', 'lora_rank', 'embed')
  assert tuple(nn.logical_to_mesh_axes(wq_t.a_names(), rules)) == (None, 'fsdp', None)
  assert tuple(nn.logical_to_mesh_axes(wq_t.b_names(), rules)) == (None, None, 'tensor', None)


def test_bf16_merge_is_a_float32_sum_cast_once():
  config, model, mesh = _small(param_dtype='bfloat16', dtype='bfloat16', scan_layers=True)
  setup = _setup(config, model, mesh, rank=4, alpha=4.0)
  base = state_lib.create_sharded_state(config, model, mesh, jax.random.key(1))[0].params
  adapters = jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.key(3), x.shape),
                          setup.init_state(config, jax.random.key(0)).params)
  merged = lora.merge(base, adapters, setup.spec)
  w = np.asarray(base['layers']['mlp']['wo'], np.float32)            # [L, F, D]
  a = np.asarray(adapters['layers']['mlp']['wo']['lora_a'], np.float64)
  b = np.asarray(adapters['layers']['mlp']['wo']['lora_b'], np.float64)
  delta = np.einsum('lfr,lrd->lfd', a, b)                             # scale 1
  expected = (w + delta.astype(np.float32)).astype(jnp.bfloat16)     # one rounding
  got = np.asarray(merged['layers']['mlp']['wo'])
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), expected.astype(np.float32))
  # The known bug: the update rounded to bfloat16, then added in bfloat16.
  naive = np.asarray(base['layers']['mlp']['wo']) + delta.astype(jnp.bfloat16)
  assert np.mean(naive.astype(np.float32) != expected.astype(np.float32)) > 0.01
  # Weights without adapters are the base's, untouched.
  np.testing.assert_array_equal(np.asarray(merged['embed']['embedding']),
                                np.asarray(base['embed']['embedding']))


def test_targets_that_match_nothing_or_a_vector_are_refused():
  config, model, mesh = _small()
  with pytest.raises(UserError, match=r'lora.targets=.*matches no parameter.*layers(_0)?/attn/wq'):
    _setup(config, model, mesh, targets='nothing_here')
  with pytest.raises(UserError, match=r'lora.targets=.*norm/scale \(shape \(32,\)\), which is not a matrix'):
    _setup(config, model, mesh, targets='norm')


def test_lora_config_is_checked():
  config = sft_config.get_config(f'tiny,{MODEL},lora.rank=4')
  with pytest.raises(UserError, match='lora.rank=4 needs init_from'):
    sft_config.validate(config)
  for key, value in (('rank', -1), ('dropout', 1.0), ('alpha', 0.0), ('targets', '(')):
    config = sft_config.get_config(f'tiny,{MODEL}')
    with config.unlocked():
      config.init_from = 'runs/x'
      config.lora[key] = value
    with pytest.raises(UserError, match=f'config key lora.{key}='):
      sft_config.validate(config)


def test_fingerprint_sees_one_changed_bit():
  tree = {'a': jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
          'b': jnp.ones((5,), jnp.bfloat16)}
  same = jax.tree.map(lambda x: x + 0, tree)
  assert lora.fingerprint(tree) == lora.fingerprint(same)
  swapped = dict(tree, a=tree['a'][::-1])          # same values, other places
  flipped = dict(tree, b=tree['b'].at[3].set(jnp.bfloat16(1.0078125)))   # one ulp
  assert len({lora.fingerprint(t) for t in (tree, swapped, flipped)}) == 3


# ------------------------------------------------------------ runs

def _write_text_data(root, tok):
  with open(os.path.join(os.path.dirname(os.__file__), 'textwrap.py')) as f:
    lines = [line for line in f.read().split('\n') if line.strip()]
  data = root / 'data'
  shards.write_dataset(str(data), {
      'train': [(f'd{i}', tok.encode('\n'.join(lines[i:i + 5])), 10) for i in range(0, 300, 5)],
      'validation': [(f'v{i}', tok.encode(lines[i]), 10) for i in range(300, 320)]})
  (data / 'DONE').write_text('test data\n')
  return data


def _pretrain(data, workdir, seed):
  config = pretrain_config.get_config(
      f'tiny,{MODEL},num_train_steps=2,eval_every=0,checkpoint_every=0,seed={seed}')
  with config.unlocked():
    config.data.workdir = str(data)
    config.data.preset = 'files'
  stage_lib.run(pretrain.STAGE, config, str(workdir))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('lora')
  with open(os.path.join(os.path.dirname(os.__file__), 'textwrap.py')) as f:
    model_file = tokenizer_lib.train_tokenizer([f.read()], str(root / 'tok'), VOCAB)
  tok = tokenizer_lib.Tokenizer.load(model_file)
  data = _write_text_data(root, tok)
  os.replace(model_file, data / 'tokenizer.model')
  records = []
  for i in range(40):
    answer = f'def fn_{i}(x):\n    return x + {i}\n'
    records.append({'prompt': f'Write fn_{i}.', 'completion': answer})
  jsonl = root / 'sft.jsonl'
  jsonl.write_text(''.join(json.dumps(r) + '\n' for r in records))
  _pretrain(data, root / 'base', seed=0)
  _pretrain(data, root / 'other_base', seed=1)
  return dict(root=root, data=str(data), jsonl=str(jsonl), base=str(root / 'base'),
              other_base=str(root / 'other_base'))


def _sft_config(runs, base, **overrides):
  config = sft_config.get_config(
      f'tiny,{MODEL},num_train_steps=6,num_epochs=50,eval_every=3,checkpoint_every=3,lora.rank=4,'
      'lora.alpha=8.0,lora.dropout=0.1,optimizer.learning_rate=1e-2,optimizer.warmup_steps=1,'
      'data.source=files,data.validation=0.2,data.test=0.2')
  with config.unlocked():
    config.data.paths = runs['jsonl']
    config.data.tokenizer = f'{runs["data"]}/tokenizer.model'
    config.data.workdir = str(runs['root'] / 'sft_data')
    config.init_from = base
    for key, value in overrides.items():
      config[key] = value
  return config


def _checkpoint_state(workdir, step):
  return ocp.StandardCheckpointer().restore(
      os.path.join(workdir, 'checkpoints', str(step), 'state'))


def _base_gap_loss(config, model):
  """SFT's loss plus how far the adapted logits are from frozen['base']'s."""
  inner = objectives.next_token(model)

  def loss_fn(params, batch, rng, frozen):
    total, aux = inner(params, batch, rng, frozen)
    assert isinstance(params, lora.LoraParams)
    gap = jnp.max(jnp.abs(objectives.forward(model, params, batch, None)
                          - objectives.forward(model, frozen['base'], batch, None)))
    return total, dict(aux, base_gap=jax.lax.stop_gradient(gap) * aux['count'])
  del config
  return loss_fn


def test_lora_sft_trains_adapters_only_resumes_bitwise_and_loads_merged(runs):
  workdir = str(runs['root'] / 'lora')
  _, _, base_before, _, _ = run_dir.load_run(runs['base'])
  base_before = jax.device_get(base_before)
  stage = dataclasses.replace(sft.STAGE, loss=_base_gap_loss)
  stage_lib.run(stage, _sft_config(runs, runs['base']), workdir)

  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  startup = next(r for r in records if 'model/trainable_params' in r)
  num_params = startup['model/num_params']
  # d 32, 2 layers, rank 4: per layer wq 32x4+4x32, wk/wv 32x4+4x16, wo 32x4+4x32,
  # wi_gate/wi_up 32x4+4x64, wo 64x4+4x32.
  per_layer = 256 + 192 + 192 + 256 + 384 + 384 + 384
  assert startup['model/trainable_params'] == 2 * per_layer < num_params / 5
  # Adam's float32 mu and nu over the adapters, plus its int32 step counters.
  assert 0 < startup['model/optimizer_bytes'] - 2 * 4 * 2 * per_layer <= 16
  assert startup['model/lora_rank'] == 4
  gaps = [r['train/base_gap'] for r in records if 'train/base_gap' in r]
  assert gaps[0] == 0.0 and gaps[-1] > 0.0     # exact at step 0, then the adapters move
  assert [r['step'] for r in records if 'eval/loss' in r] == [3, 6]

  # The checkpoint holds the adapters and their moments, and records the base.
  state = _checkpoint_state(workdir, 6)
  assert set(state['params']) == {'layers_0', 'layers_1'}     # no embedding, norms or head
  assert set(state['params']['layers_0']['attn']['wq']) == {'lora_a', 'lora_b'}
  assert set(state['params']['layers_0']) == {'attn', 'mlp'}
  reader = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
  record = reader.metadata(6)[lora.META_KEY]
  reader.close()
  assert record['path'] == runs['base'] and record['step'] == 2
  config = _sft_config(runs, runs['base'])
  model = transformer.Transformer(model_config_lib.ModelConfig.from_config(config.model))
  fresh = lora.setup(config, model, mesh_lib.make_mesh(config.mesh),
                     lora.LoraConfig.from_config(config)).init_state(config, jax.random.key(0))
  moved = jax.tree.map(lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))),
                       state['params'], jax.device_get(fresh.params))
  assert all(jax.tree.leaves(moved))       # every A and B left its initial value

  # The base run is bitwise what it was.
  _, _, base_after, _, _ = run_dir.load_run(runs['base'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(base_after), base_before)

  # Resume: a copy without step 6 resumes from 3 and ends bitwise where the run did.
  resumed = str(runs['root'] / 'lora_resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '6'))
  stage_lib.run(stage, _sft_config(runs, runs['base']), resumed)
  jax.tree.map(np.testing.assert_array_equal, _checkpoint_state(resumed, 6),
               _checkpoint_state(workdir, 6))

  # Generation and evaluation open the run merged: base + adapters, within 1e-5.
  config, model, merged, _, _ = run_dir.load_run(workdir)
  assert config.checkpoint_step == 6
  assert jax.tree.structure(merged) == jax.tree.structure(base_before)
  spec = lora.make_spec(lora.LoraConfig.from_config(config),
                        state_lib.boxed_param_shapes(config, model))
  tokens = jax.random.randint(jax.random.key(5), (2, 16), 0, VOCAB)
  unmerged = _logits(model, lora.LoraParams(base_before, state['params'], None, spec), tokens)
  np.testing.assert_allclose(np.asarray(_logits(model, merged, tokens)), np.asarray(unmerged),
                             atol=1e-5, rtol=0)
  assert float(jnp.max(jnp.abs(unmerged - _logits(model, base_before, tokens)))) > 1e-3
  _, params = run_dir.load_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(merged))

  # Another base (same shapes, other values) is refused on resume and on load.
  with pytest.raises(UserError, match='not the base this run'):
    stage_lib.run(stage, _sft_config(runs, runs['other_base'], num_train_steps=9), workdir)
  moved_base = str(runs['root'] / 'moved_base')
  shutil.move(runs['base'], moved_base)
  shutil.copytree(runs['other_base'], runs['base'])
  try:
    with pytest.raises(UserError, match='not the base this run'):
      run_dir.load_run(workdir)
  finally:
    shutil.rmtree(runs['base'])
    shutil.move(moved_base, runs['base'])


def test_lora_needs_init_from_at_the_runner(runs, tmp_path):
  config = _sft_config(runs, '')
  with pytest.raises(UserError, match='needs init_from'):
    stage_lib.run(sft.STAGE, config, str(tmp_path / 'run'))
