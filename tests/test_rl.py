"""RL end to end on a small random model: rollouts, GRPO and PPO learning, resume.

The toy reward is the fraction of generated tokens that are one chosen token,
so a random model starts near 1/vocab and a working policy gradient raises
it far above that within a few dozen iterations. The runs go through
`train.rl.train` (the loop, checkpoints, metrics) like the command line.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rl as rl_config
from configs.cli import UserError
from data_pipeline import chat
from model import decode
from model import transformer
from model.config import ModelConfig
from train import checkpoint
from train import rewards
from train import rl
from train import rollouts

SMALL = ('model.d_model=32,model.num_layers=1,model.num_heads=2,model.num_kv_heads=1,'
         'model.head_dim=16,model.mlp_dim=64,model.max_len=64,seq_len=64,'
         'rollout.max_prompt_len=40,rollout.max_new_tokens=16,rollout.temperature=1.0,'
         'checkpoint_every=0')
CHOSEN = 100


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, stdlib_tokenizer):
  root = tmp_path_factory.mktemp('rl_data')
  shutil.copy(stdlib_tokenizer.path, root / 'tokenizer.model')
  records = [{'id': f'p{i}', 'messages': [{'role': 'user', 'content': f'Write f{i}.'}],
              'answer': f'def f{i}():\n    return {i}', 'function_name': f'f{i}'}
             for i in range(32)]
  (root / 'prompts_train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  return str(root)


def _config(data_dir, preset, *extra):
  config = rl_config.get_config(','.join(
      [preset, SMALL, f'model.vocab_size={600}', *extra]))
  with config.unlocked():
    config.data.workdir = data_dir
  return config


def chosen_token_reward(rollout):
  """How many of each completion's tokens are CHOSEN (1 per token: a dense enough signal)."""
  return ((rollout['tokens_BN'] == CHOSEN) & rollout['mask_BN']).sum(1).astype(np.float32)


def _metrics(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))
          if 'rl/reward_mean' in line]


def test_rows_put_each_completion_after_its_prompt():
  prompt = jnp.array([[5, 6, 7, 0], [8, 0, 0, 0]])
  rows = rollouts.make_rows(prompt, jnp.array([3, 1]), jnp.array([[1, 2, 9], [3, 9, 9]]),
                            jnp.array([[1, 1, 0], [1, 0, 0]], bool), pad_id=0)
  np.testing.assert_array_equal(rows['tokens'], [[5, 6, 7, 1, 2, 0, 0], [8, 3, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(rows['segment_ids'], [[1] * 5 + [0] * 2, [1] * 2 + [0] * 5])
  np.testing.assert_array_equal(rows['response_positions'], [[2, 3, 4], [0, 1, 2]])
  np.testing.assert_array_equal(rows['last_positions'], [4, 1])


def test_rollout_logprobs_match_a_forward_pass_and_rm_reads_the_last_token(stdlib_tokenizer):
  cfg = ModelConfig(vocab_size=600, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=16, mlp_dim=64, max_len=64, scan_layers=False)
  model = transformer.Transformer(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  prompts = [chat.render_prompt(stdlib_tokenizer, [{'role': 'user', 'content': t}]).tolist()
             for t in ('Write f.', 'Please write a longer function g now.')]
  prompt_BP, lengths_B = decode.pad_prompts(prompts, 0)
  out = rollouts.sample(model, params, prompt_BP, lengths_B, jax.random.key(1),
                        max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0,
                        stop_ids=chat.stop_ids(stdlib_tokenizer), pad_id=0)
  rows = rollouts.make_rows(jnp.asarray(prompt_BP), jnp.asarray(lengths_B), out.tokens,
                            out.mask, pad_id=0)
  logp, _ = rollouts.token_logprobs(model, params, rows, out.tokens)
  mask = np.asarray(out.mask)
  np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(out.logprobs)[mask], atol=2e-4)
  # A scalar-head model scores each row at its own last generated token, not at padding.
  scalar = model.init(jax.random.key(2), jnp.zeros((1, 8), jnp.int32), head='scalar')['params']
  scores = rewards.last_token_scores(model, scalar, rows, rows['last_positions'])
  full = model.apply({'params': scalar}, rows['tokens'], segment_ids=rows['segment_ids'],
                     positions=rows['positions'], head='scalar')
  ends = np.asarray(lengths_B) + mask.sum(1) - 1
  np.testing.assert_allclose(scores, np.asarray(full)[np.arange(2), ends], rtol=1e-6)


def test_parses_and_names_reward():
  fn = rewards.get('parses_and_names', rl_config.grpo_tiny().reward)
  example = {'function_name': 'f'}
  assert fn('', 'def f(x):\n    return x', example) == 1.0
  assert fn('', 'def g(x):\n    return x', example) == 0.5
  assert fn('', 'def f(x:\n', example) == 0.0


def test_grpo_learns_the_toy_reward(data_dir, tmp_path):
  workdir = str(tmp_path / 'grpo')
  config = _config(data_dir, 'grpo_tiny', 'num_train_steps=30', 'optimizer.learning_rate=1e-2',
                   'rollout.prompts_per_iteration=8', 'rollout.group_size=8')
  rl.train(config, workdir, score=chosen_token_reward)
  records = _metrics(workdir)
  first = np.mean([r['rl/reward_mean'] for r in records[:3]])
  last = np.mean([r['rl/reward_mean'] for r in records[-3:]])
  assert first < 0.3 and last > 6.0, (first, last)   # of 16 tokens; random: 16/600
  assert all(np.isfinite(r['rl/kl_per_token']) for r in records)
  assert records[-1]['rl/kl_per_token'] > 0


def test_ppo_learns_the_toy_reward(data_dir, tmp_path):
  workdir = str(tmp_path / 'ppo')
  config = _config(data_dir, 'ppo_tiny', 'num_train_steps=30', 'optimizer.learning_rate=1e-2',
                   'rollout.prompts_per_iteration=32', 'rollout.truncation=penalty',
                   'ppo.value_init=policy', 'reward.function=parses', 'ppo.vf_coef=0.5')
  rl.train(config, workdir, score=chosen_token_reward)
  records = _metrics(workdir)
  first = np.mean([r['rl/reward_mean'] for r in records[:3]])
  last = np.mean([r['rl/reward_mean'] for r in records[-3:]])
  assert first < 0.3 and last > 6.0, (first, last)   # of 16 tokens; random: 16/600
  assert all(np.isfinite(r['train/value_loss']) for r in records)
  assert 'train/explained_variance' in records[-1] and 'rl/kl_per_token' in records[-1]


def test_a_killed_run_resumes_bitwise(data_dir, tmp_path):
  extra = ('num_train_steps=4', 'optimizer.learning_rate=3e-3', 'rollout.prompts_per_iteration=4',
           'rollout.group_size=2', 'ppo.value_init=policy', 'reward.function=parses')
  straight = str(tmp_path / 'straight')
  rl.train(_config(data_dir, 'ppo_tiny', *extra), straight, score=chosen_token_reward)
  resumed = str(tmp_path / 'resumed')
  rl.train(_config(data_dir, 'ppo_tiny', *extra[1:], 'num_train_steps=2'), resumed,
           score=chosen_token_reward)
  rl.train(_config(data_dir, 'ppo_tiny', *extra), resumed, score=chosen_token_reward)
  a = _metrics(straight)
  b = _metrics(resumed)
  assert [r['step'] for r in b] == [1, 2, 3, 4]
  for key in ('rl/reward_mean', 'train/loss', 'train/value_loss', 'rl/kl_per_token'):
    assert [r[key] for r in a] == [r[key] for r in b], key

  def final_state(workdir):
    reader = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), read_only=True)
    try:
      shapes = reader.saved_shapes(4)
      assert any(k[0] == 'value_params' for k in shapes)
      assert any(k[0] == 'value_opt_state' for k in shapes)
      return reader.restore_params(4, jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _policy_shapes(shapes)))[1]
    finally:
      reader.close()
  for x, y in zip(jax.tree.leaves(final_state(straight)), jax.tree.leaves(final_state(resumed))):
    np.testing.assert_array_equal(x, y)


def _policy_shapes(shapes):
  """The saved policy tree as nested dicts of zero arrays (restore target)."""
  tree: dict = {}
  for key, shape in shapes.items():
    if key[0] != 'params':
      continue
    node = tree
    for part in key[1:-1]:
      node = node.setdefault(part, {})
    node[key[-1]] = np.zeros(shape, np.float32)
  return tree


@pytest.mark.parametrize('preset', sorted(rl_config.PRESETS))
def test_presets_validate(preset):
  # PPO's command names its reward model (--config.reward.model=runs/rm).
  suffix = ',reward.model=runs/rm' if preset.startswith('ppo') else ''
  rl_config.validate(rl_config.get_config(preset + suffix))


@pytest.mark.parametrize('overrides,message', [
    ('grpo_tiny,rollout.group_size=1', 'group_size must be >= 2'),
    ('ppo_tiny,reward.function=parses', 'ppo.value_init=reward needs reward.model'),
    ('grpo_tiny,reward.function=', 'Neither reward.model nor reward.function'),
    ('grpo_tiny,rl.minibatches=5', 'does not divide the 48 rollouts'),
    ('grpo_tiny,rollout.max_new_tokens=200', 'exceeds model.max_len=256'),
    ('grpo_tiny,grpo.aggregation=mean', "grpo.aggregation='mean'"),
])
def test_bad_configs_are_one_line_errors(overrides, message):
  with pytest.raises(UserError, match=message):
    rl_config.validate(rl_config.get_config(overrides))


def test_an_unknown_reward_names_the_known_ones():
  with pytest.raises(UserError, match='known: .*parses_and_names'):
    rewards.get('parse', rl_config.grpo_tiny().reward)
