"""SFT end to end on tiny data: init_from a pre-trained run, train, generate, evaluate.

The pre-trained run and the SFT run are real `python -m train` / `python -m
train.sft` processes on a tokenizer with the chat control tokens; the JSONL
instructions mix the three formats users bring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import sft as sft_config
from configs.cli import UserError
from data_pipeline import shards
from data_pipeline import tokenizer as tokenizer_lib
from train import checkpoint
from train import run_dir
from train import stage as stage_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 400
MODEL = ('model.vocab_size=400,model.d_model=32,model.num_layers=2,model.num_heads=2,'
         'model.num_kv_heads=1,model.head_dim=16,model.mlp_dim=64,model.max_len=128,'
         'seq_len=128,batch_size=4,log_every=1,checkpoint_every=0')


def _env(cache):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('XLA_FLAGS', None)
  return env


def _run(args, cache, timeout=300):
  result = subprocess.run([sys.executable, '-m', *args], env=_env(cache), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  return result


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('sft')
  with open(os.path.join(os.path.dirname(os.__file__), 'textwrap.py')) as f:
    text = f.read()
  model = tokenizer_lib.train_tokenizer([text], str(root / 'tok'), VOCAB)
  tok = tokenizer_lib.Tokenizer.load(model)
  lines = [line for line in text.split('\n') if line.strip()]
  data = root / 'data'
  shards.write_dataset(str(data), {
      'train': [(f'd{i}', tok.encode('\n'.join(lines[i:i + 5])), 10) for i in range(0, 300, 5)],
      'validation': [(f'v{i}', tok.encode(lines[i]), 10) for i in range(300, 320)]})
  os.replace(model, data / 'tokenizer.model')
  (data / 'DONE').write_text('test data\n')
  jsonl = root / 'sft.jsonl'
  records = []
  for i in range(60):
    name = f'fn_{i}'
    answer = f'def {name}(x):\n    return x + {i}\n'
    kind = i % 3
    if kind == 0:
      records.append({'messages': [{'role': 'user', 'content': f'Write {name}.'},
                                   {'role': 'assistant', 'content': answer}]})
    elif kind == 1:
      records.append({'prompt': f'Write {name}.', 'completion': answer})
    else:
      records.append({'instruction': f'Write {name}.', 'input': 'x is an int', 'output': answer})
  records.append({'messages': [{'role': 'user', 'content': 'hi'}]})   # no answer: skipped
  jsonl.write_text(''.join(json.dumps(r) + '\n' for r in records) + 'not json\n')
  cache = str(root / 'cache')
  pretrained = str(root / 'pretrained')
  _run(['train', f'--config=configs/pretrain.py:tiny,{MODEL},num_train_steps=3,eval_every=0',
        f'--config.data.workdir={data}', '--config.data.preset=files',
        f'--workdir={pretrained}'], cache)
  return dict(root=root, data=str(data), jsonl=str(jsonl), cache=cache, pretrained=pretrained)


def _sft_args(setup, workdir, *extra):
  return ['train.sft', f'--config=configs/sft.py:tiny,{MODEL},num_train_steps=6,eval_every=3,'
          'data.source=files,data.validation=0.2,data.test=0.2',
          f'--config.data.paths={setup["jsonl"]}',
          f'--config.data.tokenizer={setup["data"]}/tokenizer.model',
          f'--config.data.workdir={setup["root"]}/sft_data', f'--workdir={workdir}', *extra]


def test_sft_from_a_pretrained_run_then_generate_and_evaluate(setup, tmp_path):
  workdir = str(tmp_path / 'sft')
  result = _run(_sft_args(setup, workdir, f'--config.init_from={setup["pretrained"]}'),
                setup['cache'])
  assert f'Initialised the parameters from {setup["pretrained"]}' in result.stdout
  report = json.loads((setup['root'] / 'sft_data' / 'sft_report.json').read_text())
  assert report['skipped'] and sum(report['skipped'].values()) == 2   # the two bad lines
  records = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  evals = [r for r in records if 'eval/loss' in r]
  assert [r['step'] for r in evals] == [3, 6]
  config = json.load(open(os.path.join(workdir, 'config.json')))
  assert config['chat'] and config['init_from'] == setup['pretrained']

  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text(json.dumps({'prompt': 'Write fn_3.', 'id': 'a'}) + '\n' + json.dumps(
      {'messages': [{'role': 'user', 'content': 'Write fn_4.'}], 'id': 'b'}) + '\n')
  out = tmp_path / 'out.jsonl'
  _run(['train.generate', f'--workdir={workdir}', f'--prompts_file={prompts}',
        f'--output={out}', '--max_new_tokens=8', '--greedy'], setup['cache'])
  samples = [json.loads(l) for l in out.read_text().splitlines()]
  assert [s['id'] for s in samples] == ['a', 'b']
  assert all(isinstance(s['completion'], str) for s in samples)

  _run(['train.evaluate', f'--workdir={workdir}', '--split=validation'], setup['cache'])
  result = json.load(open(os.path.join(workdir, 'eval_validation.json')))
  # Response loss: only answer tokens are targets, and they are all predicted.
  assert result['unpredicted_tokens'] == 0 and result['unigram_loss'] is None
  assert result['loss'] > 0


def test_init_from_restores_the_params_exactly(setup):
  config = sft_config.get_config(f'tiny,{MODEL}')
  with config.unlocked():
    config.init_from = setup['pretrained']
    config.data.workdir = setup['data']
  source = stage_lib.adopt_init_from(config, None)
  model_cfg = stage_lib.model_config(config)
  from model.transformer import Transformer  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import state as state_lib  # pylint: disable=g-import-not-at-top
  model = Transformer(model_cfg)
  mesh = mesh_lib.make_mesh(config.mesh)
  abstract, shardings = state_lib.abstract_state(config, model, mesh)
  state = stage_lib.state_from_run(config, abstract, shardings, source)
  _, _, params, _, _ = run_dir.load_run(setup['pretrained'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               jax.device_get(params))
  assert int(state.step) == 0
  assert all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(
      jax.device_get(state.opt_state)) if x.dtype == np.float32)   # a fresh optimizer


def test_shrink_and_perturb_scales_every_matrix_and_adds_noise_of_its_std(setup):
  for bad, match in (('', 'init_from is empty'), (',init_from=x,lora.rank=4', 'LoRA')):
    with pytest.raises(UserError, match=match):
      sft_config.validate(sft_config.get_config(f'tiny,init_shrink=0.5{bad}'))
  config = sft_config.get_config(f'tiny,{MODEL},init_shrink=0.5,init_perturb=0.1')
  with config.unlocked():
    config.init_from = setup['pretrained']
    config.data.workdir = setup['data']
  source = stage_lib.adopt_init_from(config, None)
  from model.transformer import Transformer  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import state as state_lib  # pylint: disable=g-import-not-at-top
  abstract, shardings = state_lib.abstract_state(
      config, Transformer(stage_lib.model_config(config)), mesh_lib.make_mesh(config.mesh))
  state = stage_lib.state_from_run(config, abstract, shardings, source)
  _, _, params, _, _ = run_dir.load_run(setup['pretrained'])
  for new, old in zip(jax.tree.leaves(jax.device_get(state.params)),
                      jax.tree.leaves(jax.device_get(params))):
    if old.ndim < 2:   # norm scales are left alone
      np.testing.assert_array_equal(new, old)
      continue
    noise = (new - 0.5 * old) / (0.1 * old.std())
    bound = 5 / np.sqrt(noise.size)   # five standard errors of a standard normal sample
    assert abs(noise.mean()) < bound and abs(noise.std() - 1) < bound, (noise.mean(),
                                                                       noise.std(), noise.size)


def test_init_from_a_run_with_another_tokenizer_is_refused(setup, tmp_path):
  config = sft_config.get_config(f'tiny,{MODEL}')
  with config.unlocked():
    config.init_from = setup['pretrained']
  with pytest.raises(UserError, match='another tokenizer'):
    stage_lib.adopt_init_from(config, b'some other tokenizer')
  with config.unlocked():
    config.init_from = str(tmp_path)
  with pytest.raises(UserError, match='no config.json'):
    stage_lib.adopt_init_from(config, None)


def test_a_stages_frozen_tree_reaches_the_loss_and_is_never_changed(setup, tmp_path):
  """A stage's `frozen` hook (here: init_from's params as a reference) feeds every step."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from train import objectives  # pylint: disable=g-import-not-at-top
  from train import sft  # pylint: disable=g-import-not-at-top
  kept = {}

  def frozen(built):
    _, reference = stage_lib.params_from_run(built.init_from, built.abstract_state.params)
    kept.update(tree=reference, copy=jax.device_get(reference))
    return reference, built.state_shardings.params

  def loss(config, model):
    del config
    next_token = objectives.next_token(model)

    def loss_fn(params, batch, rng, reference):
      total, aux = next_token(params, batch, rng, None)
      distance = sum(jnp.sum(jnp.square(p - r)) for p, r in
                     zip(jax.tree.leaves(params), jax.tree.leaves(reference)))
      # Reported per count like every aux sum: train/distance is the squared distance.
      return total, dict(aux, distance=jax.lax.stop_gradient(distance) * aux['count'])
    return loss_fn

  stage = dataclasses.replace(sft.STAGE, loss=loss, eval_loss=loss, frozen=frozen)
  config = sft_config.get_config(f'tiny,{MODEL},num_train_steps=3,eval_every=3,'
                                 'data.source=files,data.validation=0.2,data.test=0.2')
  with config.unlocked():
    config.data.paths = setup['jsonl']
    config.data.tokenizer = f'{setup["data"]}/tokenizer.model'
    config.data.workdir = str(tmp_path / 'sft_data')
    config.init_from = setup['pretrained']
  stage_lib.run(stage, config, str(tmp_path / 'run'))
  records = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
  distances = [r['train/distance'] for r in records if 'train/distance' in r]
  assert distances[0] == 0.0 and distances[-1] > 0.0   # starts at the reference, moves off
  assert [r['eval/distance'] for r in records if 'eval/distance' in r][-1] > 0.0
  # The reference was passed by reference every step, never donated or updated.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(kept['tree']), kept['copy'])
