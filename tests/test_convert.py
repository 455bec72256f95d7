"""Hugging Face Llama import/export (train/convert.py) against transformers itself.

A random tiny `LlamaForCausalLM` (GQA: 4 query heads, 2 kv heads), saved with
`save_pretrained`, is imported and opened the way train.generate opens a run
(`run_dir.load_run`); its logits must equal transformers' own forward pass.
The reference is the PyTorch implementation (requirements-test.lock), never
a re-derivation of our mapping.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from configs.cli import UserError
from model import rope
from model.config import ModelConfig
from train import convert
from train import hf_files
from train import run_dir

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 96


def _hf_config(tied: bool, vocab_size: int = VOCAB, **rope_parameters):
  rope_parameters = rope_parameters or {'rope_type': 'default', 'rope_theta': 10000.0}
  return transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      rms_norm_eps=1e-5, tie_word_embeddings=tied, rope_parameters=rope_parameters)


def _hf_model(config, seed: int):
  """A LlamaForCausalLM with every weight random (norm scales near 1, not exactly 1)."""
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if 'norm' in name else 0.0))
  return model


def _hf_logits(model, tokens_BT) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens_BT))).logits.float().numpy()


def _logits(model, params, tokens_BT, **kwargs) -> np.ndarray:
  """Our logits, jitted (one compile instead of one per eager op)."""
  return np.asarray(jax.jit(model.apply)({'params': params}, tokens_BT, **kwargs))


def _read_all(directory: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith('.safetensors'):
      with safe_open(os.path.join(directory, name), framework='numpy') as f:
        out.update({k: f.get_tensor(k) for k in f.keys()})
  return out


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# Two imports cover the combinations: tied + float32 file + stacked layers (and
# a SentencePiece tokenizer), untied + bfloat16 file + unrolled layers.
CASES = {
    'tied_f32_scan': dict(tied=True, dtype=torch.float32, scan_layers=True, tokenizer=True),
    'untied_bf16_unrolled': dict(tied=False, dtype=torch.bfloat16, scan_layers=False,
                                 tokenizer=False),
}


@pytest.fixture(scope='module', params=sorted(CASES))
def imported(request, tmp_path_factory, stdlib_tokenizer):
  case = CASES[request.param]
  vocab = stdlib_tokenizer.vocab_size if case['tokenizer'] else VOCAB
  hf_model = _hf_model(_hf_config(case['tied'], vocab), seed=len(request.param))
  root = tmp_path_factory.mktemp(request.param)
  hf_dir, workdir = str(root / 'hf'), str(root / 'run')
  hf_model.to(case['dtype']).save_pretrained(hf_dir)
  if case['tokenizer']:
    with open(stdlib_tokenizer.path, 'rb') as f, open(os.path.join(hf_dir, 'tokenizer.model'),
                                                        'wb') as g:
      g.write(f.read())
  # The reference: transformers reading the same files, in float32 (a bfloat16
  # file's values are exact in float32; casting the model back and forth would
  # also round its RoPE table).
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
  hf_model.eval()
  convert.import_checkpoint(hf_dir, workdir, scan_layers=case['scan_layers'])
  config, model, params, tokenizer, _ = run_dir.load_run(workdir)
  return dict(case, name=request.param, hf_model=hf_model, hf_dir=hf_dir, workdir=workdir,
              root=root, config=config, model=model, params=params, run_tokenizer=tokenizer)


def test_imported_run_gives_transformers_logits(imported):
  config, model = imported['config'], imported['model']
  assert model.config.tie_embeddings == imported['tied']
  assert model.config.scan_layers == imported['scan_layers']
  assert not model.config.scale_embeddings
  assert config.hf.dtype == ('bfloat16' if imported['dtype'] == torch.bfloat16 else 'float32')
  tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 17))
  ours = _logits(model, imported['params'], tokens)
  np.testing.assert_allclose(ours, _hf_logits(imported['hf_model'], tokens), atol=1e-4, rtol=0)
  if imported['tokenizer']:   # the SentencePiece model came along, as generate needs
    assert imported['run_tokenizer'].vocab_size == model.config.vocab_size
  else:
    assert not os.path.exists(os.path.join(imported['workdir'], 'tokenizer.model'))


def test_two_packed_documents_equal_two_separate_forward_passes(imported):
  model = imported['model']
  rng = np.random.default_rng(1)
  doc_a, doc_b = (rng.integers(0, model.config.vocab_size, n) for n in (9, 6))
  tokens = np.concatenate([doc_a, doc_b])[None]
  segment_ids = np.array([[1] * 9 + [2] * 6])
  positions = np.concatenate([np.arange(9), np.arange(6)])[None]
  ours = _logits(model, imported['params'], tokens, segment_ids=segment_ids,
                 positions=positions)
  ref = np.concatenate([_hf_logits(imported['hf_model'], doc_a[None]),
                        _hf_logits(imported['hf_model'], doc_b[None])], axis=1)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_export_reproduces_the_tensors_and_transformers_loads_it(imported):
  out = str(imported['root'] / 'exported')
  summary = convert.export_checkpoint(imported['workdir'], out)
  assert summary['dtype'] == imported['config'].hf.dtype   # back in the file's own dtype
  source, exported = _read_all(imported['hf_dir']), _read_all(out)
  assert sorted(exported) == sorted(source)
  assert ('lm_head.weight' in exported) == (not imported['tied'])
  for name, value in source.items():
    assert _bits_equal(exported[name], value), name
  hf_config = json.load(open(os.path.join(out, 'config.json')))
  assert hf_config['tie_word_embeddings'] == imported['tied']
  assert os.path.exists(os.path.join(out, 'tokenizer.model')) == imported['tokenizer']

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = np.random.default_rng(2).integers(0, imported['model'].config.vocab_size, (2, 13))
  ours = _logits(imported['model'], imported['params'], tokens)
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), ours, atol=1e-5, rtol=0)


def test_sharded_llama3_checkpoint_imports_and_init_from_takes_its_rope(tmp_path):
  llama3 = dict(rope_type='llama3', rope_theta=500000.0, factor=4.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=16)
  hf_model = _hf_model(_hf_config(tied=False, **llama3), seed=3)
  hf_dir, workdir = str(tmp_path / 'hf'), str(tmp_path / 'run')
  hf_model.save_pretrained(hf_dir, max_shard_size='8KB')
  assert os.path.exists(os.path.join(hf_dir, 'model.safetensors.index.json'))
  assert len([f for f in os.listdir(hf_dir) if f.endswith('.safetensors')]) > 2
  convert.import_checkpoint(hf_dir, workdir)
  _, model, params, _, _ = run_dir.load_run(workdir)
  assert (model.config.rope_scaling, model.config.rope_original_max_len) == ('llama3', 16)
  # Positions past the original context, where the scaling changes the angles.
  tokens = np.random.default_rng(3).integers(0, VOCAB, (1, 40))
  ours = _logits(model, params, tokens)
  np.testing.assert_allclose(ours, _hf_logits(hf_model, tokens), atol=1e-4, rtol=0)
  unscaled = dataclasses.replace(model.config, rope_scaling='none')
  plain = _logits(type(model)(unscaled), params, tokens)
  assert np.abs(plain - ours).max() > 1e-2   # the test would see llama3 scaling ignored

  out = str(tmp_path / 'exported')
  convert.export_checkpoint(workdir, out)
  source, exported = _read_all(hf_dir), _read_all(out)
  assert sorted(source) == sorted(exported)
  assert all(_bits_equal(exported[k], v) for k, v in source.items())
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert reloaded.config.rope_parameters['rope_type'] == 'llama3'
  np.testing.assert_allclose(_hf_logits(reloaded.eval(), tokens), ours, atol=1e-5, rtol=0)

  # A fine-tuning stage started from the run takes its RoPE keys along with its shape.
  from configs import sft
  from train import stage
  config = sft.get_config('tiny')
  config.init_from = workdir
  stage.adopt_init_from(config, None)
  assert ModelConfig.from_config(config.model).rope_scaling == 'llama3'
  assert config.model.rope_scaling_factor == 4.0


def test_llama3_rope_matches_transformers():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from transformers.models.llama import modeling_llama
  hf_config = transformers.LlamaConfig(
      hidden_size=512, num_attention_heads=8, max_position_embeddings=131072,
      rope_parameters=dict(rope_type='llama3', rope_theta=500000.0, factor=8.0,
                           low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192))
  scaling = rope.Llama3Scaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_len=8192)
  ref_inv, _ = ROPE_INIT_FUNCTIONS['llama3'](hf_config, None)
  ours_inv = np.asarray(rope.inverse_frequencies(64, 500000.0, scaling))
  np.testing.assert_allclose(ours_inv, ref_inv.numpy(), rtol=1e-6, atol=0)
  # All three regimes occur: kept, interpolated and fully scaled frequencies.
  plain = np.asarray(rope.inverse_frequencies(64, 500000.0))
  ratio = ours_inv / plain
  assert ratio.max() == 1.0 and ratio.min() == pytest.approx(1 / 8)
  assert ((ratio > 1 / 8 + 1e-6) & (ratio < 1 - 1e-6)).any()

  positions = np.array([[0, 1, 7, 1000, 9000, 120000]])
  x = np.random.default_rng(4).standard_normal((1, 6, 2, 64)).astype(np.float32)
  ours = np.asarray(rope.apply_rope(x, positions, 500000.0, scaling))
  cos, sin = modeling_llama.LlamaRotaryEmbedding(hf_config)(
      torch.tensor(x), torch.tensor(positions))
  q = torch.tensor(x).transpose(1, 2)   # transformers: [B, heads, T, H]
  ref, _ = modeling_llama.apply_rotary_pos_emb(q, q, cos, sin)
  np.testing.assert_allclose(ours, ref.transpose(1, 2).numpy(), atol=2e-4, rtol=0)


@pytest.mark.parametrize('layout, shape', [
    ('same', (12, 10)), ('transpose', (10, 12)), ('heads_out', (10, 4, 6)),
    ('heads_in', (4, 6, 10)), ('same', (10,))])
def test_a_shard_reads_exactly_its_slice_of_the_parameter(layout, shape):
  rng = np.random.default_rng(6)
  hf = rng.standard_normal(convert.hf_shape(layout, shape)).astype(np.float32)
  reads = []

  def read(index):
    reads.append(hf[index].size)
    return hf[index]

  full = convert.read_block(read, layout, shape, tuple(slice(None) for _ in shape))
  assert full.shape == tuple(shape)
  assert _bits_equal(convert.to_hf(layout, full), hf)   # export inverts import
  for _ in range(10):
    index = []
    for n in shape:
      start = int(rng.integers(0, n))
      index.append(slice(start, int(rng.integers(start + 1, n + 1))))
    reads.clear()
    block = convert.read_block(read, layout, shape, tuple(index))
    np.testing.assert_array_equal(block, full[tuple(index)])
    # Only whole heads are read beyond the slice (their head_dim), never the tensor.
    assert reads[0] <= block.size * (shape[-1] if layout == 'heads_out' else
                                     shape[1] if layout == 'heads_in' else 1)


def test_command_line_import_on_eight_devices_gives_the_same_parameters(tmp_path):
  hf_dir = str(tmp_path / 'hf')
  _hf_model(_hf_config(tied=False), seed=9).save_pretrained(hf_dir)
  sharded, single = str(tmp_path / 'sharded'), str(tmp_path / 'single')
  proc = subprocess.run(
      [sys.executable, '-m', 'train.convert', 'import', f'--hf_dir={hf_dir}',
       f'--workdir={sharded}'], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Imported' in proc.stdout
  convert.import_checkpoint(hf_dir, single)
  a, b = run_dir.load_run(sharded)[2], run_dir.load_run(single)[2]
  assert jax.tree.all(jax.tree.map(lambda x, y: _bits_equal(np.asarray(x), np.asarray(y)), a, b))


def _strata_run(workdir: str, **model_changes) -> None:
  """A run directory as a training stage leaves it: config.json and a checkpoint."""
  import flax.linen as nn
  from configs import pretrain
  from model.transformer import Transformer
  from train import checkpoint as checkpoint_lib
  from train import run_files
  config = pretrain.get_config('tiny')
  config.model.update(dict(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=8, mlp_dim=48, max_len=64, **model_changes))
  config.seq_len = 64
  # No data of its own: the preset's relative 'runs/data' would find the demo's data
  # (and its 8192-piece tokenizer) when the tests run in a checkout that made it.
  config.data.workdir = os.path.join(workdir, 'no_data')
  cfg = ModelConfig.from_config(config.model)
  # numpy draws on the real init's shapes: compiling jax.random would cost more than the test.
  shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  rng = np.random.default_rng(7)
  params = jax.tree.map(   # norm scales near 1, not 1, so a wrong norm mapping would show
      lambda s: jax.device_put((rng.standard_normal(s.shape) * 0.2 + (s.ndim == 1))
                               .astype(np.float32)),
      nn.meta.unbox(shapes['params']))
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                             async_save=False)
  checkpointer.save(0, {'params': params}, {}, {})
  checkpointer.close()
  run_files.write_config(config, workdir)


def test_export_of_a_strata_run_folds_the_input_scale_and_refuses_what_llama_lacks(tmp_path):
  # Untied with the sqrt(d) input multiplier (the large presets): it folds into the table.
  workdir = str(tmp_path / 'run')
  _strata_run(workdir, tie_embeddings=False, scale_embeddings=True, scan_layers=False)
  out = str(tmp_path / 'hf')
  assert convert.export_checkpoint(workdir, out)['dtype'] == 'float32'
  hf_config = json.load(open(os.path.join(out, 'config.json')))
  assert (hf_config['bos_token_id'], hf_config['eos_token_id']) == (2, 3)  # strata's ids
  _, model, params, _, _ = run_dir.load_run(workdir)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = np.random.default_rng(5).integers(0, VOCAB, (2, 11))
  np.testing.assert_allclose(_hf_logits(reloaded, tokens),
                             _logits(model, params, tokens),
                             atol=1e-5, rtol=0)
  # Tied with a logit scale: nothing in a Hugging Face Llama can hold it.
  tied = str(tmp_path / 'tied')
  _strata_run(tied, tie_embeddings=True, scale_embeddings=False, scale_tied_logits=True)
  with pytest.raises(UserError, match='scale_tied_logits'):
    convert.export_checkpoint(tied, str(tmp_path / 'hf_tied'))
  assert not (tmp_path / 'hf_tied').exists()


def test_config_fields_in_the_old_and_the_transformers_5_form_map_alike():
  base = dict(model_type='llama', architectures=['LlamaForCausalLM'], vocab_size=100,
              hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=8, max_position_embeddings=4096)
  scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                 original_max_position_embeddings=1024)
  new = convert.model_keys_from_hf(
      dict(base, rope_parameters=dict(rope_type='llama3', rope_theta=5e5, **scaling)), 'new')
  old = convert.model_keys_from_hf(
      dict(base, rope_theta=5e5, rope_scaling=dict(type='llama3', **scaling)), 'old')
  assert new == old
  assert (new['rope_theta'], new['rope_scaling'], new['rope_original_max_len']) == (
      5e5, 'llama3', 1024)
  # Absent fields take LlamaConfig's defaults: MHA, hidden/heads, untied, theta 1e4.
  plain = convert.model_keys_from_hf(base, 'plain')
  assert (plain['num_kv_heads'], plain['head_dim'], plain['tie_embeddings']) == (8, 8, False)
  assert (plain['rope_theta'], plain['rope_scaling'], plain['norm_eps']) == (1e4, 'none', 1e-6)
  assert not plain['scale_embeddings']


def _write_config(directory, **changes) -> str:
  hf = _hf_config(tied=False).to_dict()
  hf.update(changes)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf, f)
  return str(directory)


@pytest.mark.parametrize('changes, field', [
    (dict(attention_bias=True), 'attention_bias'),
    (dict(mlp_bias=True), 'mlp_bias'),
    (dict(rope_parameters={'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 2.0}),
     'rope_parameters.rope_type'),
    (dict(rope_scaling={'type': 'dynamic', 'factor': 2.0}), 'rope_scaling.rope_type'),
    (dict(model_type='mistral'), 'model_type'),
    (dict(architectures=['LlamaModel']), 'architectures'),
    (dict(hidden_act='gelu'), 'hidden_act'),
    (dict(hidden_size=None), 'hidden_size'),
])
def test_unrepresentable_configs_are_refused_naming_the_field(tmp_path, changes, field):
  hf_dir = _write_config(tmp_path / 'hf', **changes)
  with pytest.raises(UserError, match=field.replace('.', r'\.')):
    convert.import_checkpoint(hf_dir, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_missing_files_and_tensors_are_refused(tmp_path):
  hf_dir = _write_config(tmp_path / 'hf')
  with pytest.raises(UserError, match=r'no model\.safetensors'):
    convert.import_checkpoint(hf_dir, str(tmp_path / 'run'))
  with pytest.raises(UserError, match=r'no config\.json'):
    convert.import_checkpoint(str(tmp_path), str(tmp_path / 'run'))
  # A checkpoint whose file lacks a tensor the config implies.
  hf_model = _hf_model(_hf_config(tied=False), seed=5)
  hf_model.save_pretrained(hf_dir)
  tensors = _read_all(hf_dir)
  del tensors['model.layers.1.mlp.up_proj.weight']
  from safetensors.numpy import save_file
  save_file(tensors, os.path.join(hf_dir, 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(UserError, match=r'model\.layers\.1\.mlp\.up_proj\.weight is missing'):
    convert.import_checkpoint(hf_dir, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_safetensors_writer_output_reads_back_with_safetensors(tmp_path):
  from safetensors import safe_open
  arrays = {'a': np.arange(6, dtype=np.float32).reshape(2, 3),
            'b': np.array([1.5, -2.0, 3.25], ml_dtypes.bfloat16),
            'c': np.ones((1, 1, 5), np.float16)}
  path = str(tmp_path / 'x.safetensors')
  writer = hf_files.SafetensorsWriter(path, [(k, v.shape, v.dtype) for k, v in arrays.items()])
  for name, value in arrays.items():
    writer.write(name, value)
  writer.close()
  with safe_open(path, framework='numpy') as f:
    assert f.metadata() == {'format': 'pt'}
    for name, value in arrays.items():
      assert _bits_equal(f.get_tensor(name), value)


def test_command_line_reports_a_refusal_in_one_line(tmp_path):
  hf_dir = _write_config(tmp_path / 'hf', attention_bias=True)
  proc = subprocess.run(
      [sys.executable, '-m', 'train.convert', 'import', f'--hf_dir={hf_dir}',
       f'--workdir={tmp_path / "run"}'], cwd=REPO, capture_output=True, text=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().startswith('error:') and 'attention_bias' in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
