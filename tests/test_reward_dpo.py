"""Reward model and DPO: they learn on toy pairs, and run end to end through the stage runner.

The learning tests train a small random model with optax on a separable toy
preference set (seconds on CPU); the end-to-end tests run `train.reward` and
`train.dpo` in-process from a pre-trained run, then `train.score` on their runs.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import dpo as dpo_config
from configs import pretrain as pretrain_config
from configs import reward as reward_config
from configs.cli import UserError
from data_pipeline import shards
from model import config as model_config_lib
from model import transformer
from train import dpo
from train import evaluate
from train import objectives
from train import pretrain
from train import reward
from train import run_dir
from train import score
from train import stage as stage_lib

# ---------------------------------------------------------------------------
# Learning on toy pairs.

END = 3   # stands for <|end|>
L = 32


def _toy_batch(rng, rows):
  """Rows of two packed pairs: random prompt, chosen from ids 10-19, rejected from 20-29."""
  out = {k: np.zeros((rows, L), np.int32) for k in
         ('tokens', 'rejected', 'chosen_mask', 'rejected_mask', 'segment_ids', 'positions')}
  for r in range(rows):
    col = 0
    for s in (1, 2):
      prompt = rng.integers(4, 10, 4)
      chosen = np.r_[prompt, rng.integers(10, 20, 3), END]
      rejected = np.r_[prompt, rng.integers(20, 30, rng.integers(2, 4)), END]
      n = len(chosen)
      out['tokens'][r, col:col + n] = chosen
      out['rejected'][r, col:col + len(rejected)] = rejected
      out['chosen_mask'][r, col + 4:col + n] = 1
      out['rejected_mask'][r, col + 4:col + len(rejected)] = 1
      out['segment_ids'][r, col:col + n] = s
      out['positions'][r, col:col + n] = np.arange(n)
      col += n
  return {k: jnp.asarray(v) for k, v in out.items()}


def _toy_cfg():
  return model_config_lib.ModelConfig(
      vocab_size=32, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
      mlp_dim=64, max_len=L, dtype='float32', param_dtype='float32', scan_layers=False,
      attention_impl='xla', tie_embeddings=True)


def _train(loss_fn, params, frozen, steps, lr, seed=0):
  tx = optax.adam(lr)
  opt = tx.init(params)
  rng = np.random.default_rng(seed)

  @jax.jit
  def step(params, opt, batch):
    grads, aux = jax.grad(loss_fn, has_aux=True)(params, batch, None, frozen)
    scale = 1.0 / jnp.maximum(aux['count'], 1.0)
    updates, opt = tx.update(jax.tree.map(lambda g: g * scale, grads), opt)
    return optax.apply_updates(params, updates), opt

  for _ in range(steps):
    params, opt = step(params, opt, _toy_batch(rng, 8))
  return params


def _evaluate(loss_fn, params, frozen):
  _, aux = jax.jit(loss_fn)(params, _toy_batch(np.random.default_rng(99), 16), None, frozen)
  return {k: float(v) / float(aux['count']) for k, v in aux.items() if k != 'count'}


def test_reward_model_learns_a_separable_preference():
  model = reward.ScoreModel(_toy_cfg())
  params = model.init(jax.random.key(0), jnp.zeros((1, L), jnp.int32))['params']
  loss_fn = objectives.reward_model(model)
  before = _evaluate(loss_fn, params, {})
  params = _train(loss_fn, params, {}, steps=60, lr=3e-3)
  after = _evaluate(loss_fn, params, {})   # held-out pairs: another seed
  assert after['accuracy'] >= 0.95 and after['loss'] < before['loss'] - 0.3, (before, after)
  assert after['margin'] > 1.0


def test_dpo_raises_the_chosen_minus_rejected_log_ratio():
  model = transformer.Transformer(_toy_cfg())
  params = model.init(jax.random.key(0), jnp.zeros((1, L), jnp.int32))['params']
  reference = jax.tree.map(jnp.copy, params)
  kept = jax.device_get(reference)
  loss_fn = objectives.dpo(model, beta=0.1)
  before = _evaluate(loss_fn, params, {'reference': reference})
  assert abs(before['rewards_margin']) < 1e-5 and abs(before['loss'] - np.log(2)) < 1e-5
  params = _train(loss_fn, params, {'reference': reference}, steps=40, lr=3e-3)
  after = _evaluate(loss_fn, params, {'reference': reference})
  assert after['rewards_margin'] > 1.0 and after['rewards_accuracy'] >= 0.95, after
  assert after['loss'] < 0.4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(reference), kept)
  # With LoRA the runner passes the un-adapted weights as 'base': the same reference.
  assert objectives.reference_params({'base': reference}) is reference


def test_ipo_and_cdpo_losses_also_train():
  model = transformer.Transformer(_toy_cfg())
  params = model.init(jax.random.key(0), jnp.zeros((1, L), jnp.int32))['params']
  for loss_fn in (objectives.dpo(model, beta=0.5, loss_type='ipo'),
                  objectives.dpo(model, beta=0.1, label_smoothing=0.1)):
    trained = _train(loss_fn, params, {'reference': params}, steps=20, lr=3e-3)
    assert _evaluate(loss_fn, trained, {'reference': params})['rewards_margin'] > 0.2


# ---------------------------------------------------------------------------
# End to end through the stage runner.

MODEL = ('model.vocab_size=600,model.d_model=32,model.num_layers=2,model.num_heads=2,'
         'model.num_kv_heads=1,model.head_dim=16,model.mlp_dim=64,model.max_len=128,'
         'seq_len=128,batch_size=4,log_every=1,checkpoint_every=0')


@pytest.fixture(scope='module')
def setup(stdlib_tokenizer, tmp_path_factory):
  root = tmp_path_factory.mktemp('pref')
  tok = stdlib_tokenizer
  with open(tok.path, 'rb') as f:
    tokenizer_bytes = f.read()
  data = root / 'data'
  lines = [f'def f{i}(x):\n    return x + {i}\n' for i in range(40)]
  shards.write_dataset(str(data), {
      'train': [(f'd{i}', tok.encode(t), 10) for i, t in enumerate(lines)],
      'validation': [(f'v{i}', tok.encode(t), 10) for i, t in enumerate(lines[:4])]})
  (data / 'tokenizer.model').write_bytes(tokenizer_bytes)
  (data / 'DONE').write_text('test data\n')
  config = pretrain_config.get_config(f'tiny,{MODEL},num_train_steps=2,eval_every=0')
  with config.unlocked():
    config.data.workdir = str(data)
    config.data.preset = 'files'
  pretrain.train(config, str(root / 'lm'))
  pairs = root / 'pairs.jsonl'
  records = [{'prompt': f'Write f{i}.', 'chosen': f'def f{i}(x):\n    return x + {i}',
              'rejected': f'def f{i}(x)\n    return', 'kind': 'syntax' if i % 2 else 'other'}
             for i in range(60)]
  pairs.write_text(''.join(json.dumps(r) + '\n' for r in records))
  return dict(root=root, lm=str(root / 'lm'), pairs=str(pairs),
              tokenizer=str(data / 'tokenizer.model'))


def _config(module, setup, **extra):
  config = module.get_config(f'tiny,{MODEL},num_train_steps=3,eval_every=3,'
                             'data.source=files,data.validation=0.2,data.test=0.2')
  with config.unlocked():
    config.data.paths = setup['pairs']
    config.data.tokenizer = setup['tokenizer']
    config.data.workdir = str(setup['root'] / 'pref_data')
    config.init_from = setup['lm']
    for key, value in extra.items():
      config[key] = value
  return config


def test_reward_model_from_an_lm_run_then_score(setup, tmp_path):
  workdir = str(tmp_path / 'rm')
  reward.train(_config(reward_config, setup), workdir)
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert any('eval/accuracy' in r for r in records) and any('train/margin' in r for r in records)
  assert not any(k.startswith('train/accuracy/') for r in records for k in r)
  config, _, params, _, _ = reward.load_reward_model(workdir)
  assert config.head == 'scalar' and 'score_head' in params
  scorer = score.Scorer(workdir, batch_size=8)
  # The held-out accuracy per kind, logged in training, is train.score's on
  # the same pairs (another code path), and adds up to the overall accuracy.
  evaluation = [r for r in records if 'eval/accuracy' in r][-1]
  _check_per_kind(evaluation, 'eval/accuracy', scorer, setup)
  summary, results = score.score_pairs(scorer, setup['pairs'])
  assert summary['pairs'] == 60 and summary['run_kind'] == 'reward'
  assert set(summary['per_kind']) == {'syntax', 'other'} and 0 <= summary['accuracy'] <= 1
  # Scoring a pair's chosen response alone gives its score in the pair.
  responses = tmp_path / 'responses.jsonl'
  responses.write_text(json.dumps({'prompt': 'Write f0.', 'response': 'def f0(x):\n'
                                   '    return x + 0'}) + '\n' + json.dumps({'prompt': 'x'}) + '\n')
  scored, skipped = score.score_responses(scorer, str(responses))
  assert skipped == {'missing_field': 1}
  np.testing.assert_allclose(scored[0]['score'], results[0]['chosen_score'], rtol=1e-5)
  with pytest.raises(UserError, match='not a reward-model run'):
    reward.load_reward_model(setup['lm'])


def _check_per_kind(evaluation, overall, scorer, setup):
  """eval/accuracy/<kind> of the last evaluation against train.score on the validation pairs."""
  kinds = ('syntax', 'other')
  counts = {k: evaluation[f'eval/count/{k}'] for k in kinds}
  assert sum(counts.values()) == evaluation['eval/count'] > 0
  np.testing.assert_allclose(
      sum(evaluation[f'eval/accuracy/{k}'] * counts[k] for k in kinds) / sum(counts.values()),
      evaluation[overall], rtol=1e-6)
  summary, _ = score.score_pairs(scorer, os.path.join(setup['root'], 'pref_data',
                                                      'pairs_validation.jsonl'))
  for k in kinds:
    assert summary['per_kind'][k]['pairs'] == counts[k]
    np.testing.assert_allclose(summary['per_kind'][k]['accuracy'],
                               evaluation[f'eval/accuracy/{k}'], rtol=1e-6)


def _built(config) -> stage_lib.Built:
  """What the stage runner builds before it restores `init_from`."""
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import state as state_lib  # pylint: disable=g-import-not-at-top
  source = stage_lib.adopt_init_from(config, None)
  model = reward.ScoreModel(stage_lib.model_config(config))
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract, shardings = state_lib.abstract_state(config, model, mesh)
  return stage_lib.Built(config=config, model=model, mesh=mesh, abstract_state=abstract,
                         state_shardings=shardings, init_from=source)


def test_reward_init_from_keeps_the_trunk_and_adds_a_head(setup):
  built = _built(_config(reward_config, setup))
  _, params = reward.params_from_any_run(built)
  from train import run_dir  # pylint: disable=g-import-not-at-top
  _, _, lm_params, _, _ = run_dir.load_run(setup['lm'])
  assert set(params) == set(lm_params) | {'score_head'}
  for name in lm_params:
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params[name]),
                 jax.device_get(lm_params[name]))
  assert float(jnp.abs(params['score_head']['kernel']).max()) < 1.0


def test_second_reward_phase_starts_from_the_first_phases_whole_model(setup, tmp_path):
  """`make posttrain`'s two phases: `init_from` a reward-model run restores its
  trunk and its trained score head, not a new head."""
  first = str(tmp_path / 'rm_first')
  reward.train(_config(reward_config, setup), first)
  _, _, first_params, _, _ = reward.load_reward_model(first)
  config = _config(reward_config, setup)
  with config.unlocked():
    config.init_from = first
    config.seed = 7  # A fresh head would be drawn from this seed.
  built = _built(config)
  _, params = reward.params_from_any_run(built)
  assert set(params) == set(first_params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params),
               jax.device_get(first_params))
  second = str(tmp_path / 'rm_second')
  reward.train(config, second)  # And the stage trains from it.
  assert reward.load_reward_model(second)[0].head == 'scalar'


def test_dpo_from_an_lm_run_keeps_its_reference_then_score(setup, tmp_path):
  kept = {}

  def frozen(built):
    tree, shardings = dpo.reference(built)
    kept.update(tree=tree, copy=jax.device_get(tree))
    return tree, shardings

  stage = dataclasses.replace(dpo.STAGE, frozen=frozen)
  workdir = str(tmp_path / 'dpo')
  stage_lib.run(stage, _config(dpo_config, setup), workdir)
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  first = next(r for r in records if 'train/loss' in r)
  np.testing.assert_allclose(first['train/loss'], np.log(2), atol=1e-4)   # policy == reference
  evals = [r for r in records if 'eval/rewards_accuracy' in r]
  assert evals and all(k in evals[-1] for k in ('eval/rewards_margin', 'eval/logps_chosen'))
  # The reference was passed to every step, never donated or updated.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(kept['tree']), kept['copy'])
  scorer = score.Scorer(workdir, batch_size=8)
  summary, _ = score.score_pairs(scorer, setup['pairs'])
  assert summary['run_kind'] == 'dpo' and summary['pairs'] == 60
  _check_per_kind(evals[-1], 'eval/rewards_accuracy', scorer, setup)


def test_dpo_with_precomputed_reference_log_probs_trains_like_the_held_reference(setup, tmp_path):
  """One pass of the reference before training gives the losses of a reference run at every step."""
  runs = {}
  for precompute in (False, True):
    seen = {}

    def frozen(built, seen=seen):
      tree, shardings = dpo.reference(built)
      seen['frozen'] = tree
      return tree, shardings

    stage = dataclasses.replace(dpo.STAGE, frozen=frozen)
    config = _config(dpo_config, setup)
    with config.unlocked():
      config.dpo.precompute_reference = precompute
      config.num_train_steps = 4
      config.log_every = 1
    workdir = tmp_path / f'dpo_{precompute}'
    stage_lib.run(stage, config, str(workdir))
    records = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
    runs[precompute] = {k: [r[k] for r in records if k in r]
                        for k in ('train/loss', 'train/rewards_margin', 'eval/loss')}
    assert ('reference' in seen['frozen']) != precompute   # no reference weights held
    assert (workdir / dpo.REFERENCE_DATA).exists() == precompute
  assert len(runs[True]['train/loss']) >= 2 and runs[True]['eval/loss']   # one epoch
  for key, values in runs[False].items():
    np.testing.assert_allclose(runs[True][key], values, rtol=2e-4, atol=2e-5, err_msg=key)
  # The stored fields are the reference's per-token log-probs: a pair's sums are < 0.
  data = str(tmp_path / 'dpo_True' / dpo.REFERENCE_DATA)
  assert set(shards.layout(data)[1]) >= set(objectives.REFERENCE_FIELDS)
  record = shards.data_source(data, 'train')[0]
  chosen = np.asarray(record['ref_chosen_logp'], np.int32).view(np.float32)
  assert chosen.sum() < 0 and np.count_nonzero(chosen) == np.asarray(record['chosen_mask']).sum()


def test_dpo_config_checks():
  config = dpo_config.get_config('tiny')
  with pytest.raises(UserError, match='init_from is empty'):
    dpo_config.validate(config)
  config = dpo_config.get_config('tiny,init_from=runs/sft,dpo.loss_type=ipo,'
                                 'dpo.label_smoothing=0.1')
  with pytest.raises(UserError, match='sigmoid loss only'):
    dpo_config.validate(config)
  with pytest.raises(UserError, match='not a reward config'):
    reward_config.validate(dpo_config.get_config('tiny'))
  for module in (reward_config, dpo_config):
    for preset in module.PRESETS:
      config = module.get_config(f'{preset},init_from=x,data.paths=x')
      module.validate(config)


def test_posttrain_table_measures_a_dpo_run_on_the_sft_data(setup, tmp_path):
  """`train.posttrain` scores every run on one SFT data split: a DPO run's own
  data.workdir holds preference pairs, which have no prompts file to read."""
  from data_pipeline import sft_data  # pylint: disable=g-import-not-at-top
  from train import posttrain  # pylint: disable=g-import-not-at-top
  # SFT data whose held-out prompts name the function asked for, as the embedded default's do.
  jsonl = tmp_path / 'sft.jsonl'
  jsonl.write_text(''.join(json.dumps({'prompt': f'Write f{i}.',
                                       'completion': f'def f{i}(x):\n    return x + {i}'}) + '\n'
                           for i in range(40)))
  sft_dir = str(tmp_path / 'sft_data')
  sft_data.prepare(sft_dir, setup['tokenizer'], source='files', paths=str(jsonl), seq_len=128,
                   validation=0.25, test=0.0)
  prompts = sft_data.prompts_file(sft_dir, 'validation')
  records = [json.loads(l) for l in open(prompts)]
  for r in records:
    r['function_name'] = r['messages'][0]['content'][len('Write '):-1]
  open(prompts, 'w').write(''.join(json.dumps(r) + '\n' for r in records))

  dpo_dir = str(tmp_path / 'dpo')
  stage_lib.run(dpo.STAGE, _config(dpo_config, setup, num_train_steps=1, eval_every=0), dpo_dir)
  runs = [('dpo', dpo_dir), ('lm', setup['lm'])]
  # By default the held-out data is the reference run's, else the first run's.
  assert posttrain.held_out_data(runs, setup['lm'], None) == run_dir.load_config(
      setup['lm']).data.workdir
  assert posttrain.held_out_data(runs, None, None) == str(setup['root'] / 'pref_data')
  assert posttrain.held_out_data(runs, setup['lm'], sft_dir) == sft_dir
  reference = run_dir.open_run(setup['lm'])[2]
  row = posttrain.stage_row(dpo_dir, reference, None, data_dir=sft_dir, split='validation',
                            max_new_tokens=8, limit=None)
  expected_loss = evaluate.evaluate_split(*_open(dpo_dir), data_dir=sft_dir, split='validation',
                                          progress=False)['loss']
  np.testing.assert_allclose(row['response_loss'], expected_loss, rtol=1e-6)
  assert np.isfinite(expected_loss)
  assert 0 <= row['parse_rate'] <= 1 and 0 <= row['parse_and_name_rate'] <= row['parse_rate']
  assert np.isfinite(row['kl_to_reference']) and row['rm_score'] is None
  # Preference data has no prompts: a one-line error names what to give instead.
  with pytest.raises(UserError, match='is not an SFT data workdir .* no validation split'):
    posttrain.stage_row(dpo_dir, None, None, data_dir=str(setup['root'] / 'pref_data'),
                        split='validation', max_new_tokens=8, limit=None)


def _open(workdir):
  config, model, params, _, mesh = run_dir.open_run(workdir)
  return config, model, params, mesh
