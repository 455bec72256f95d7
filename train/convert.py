"""Hugging Face Llama checkpoints into strata run directories, and back.

  python -m train.convert import --hf_dir=DIR --workdir=runs/x
      [--dtype=float32 --param_dtype=float32 --scan_layers=true --seq_len=N]
  python -m train.convert export --workdir=runs/x --hf_dir=OUT [--step=N --export_dtype=bfloat16]

`import` reads a `LlamaForCausalLM` directory (`config.json` and
`model.safetensors`, or shards `model-0000N-of-0000M.safetensors` with
`model.safetensors.index.json`; float32, bfloat16 or float16 tensors) and
writes a run directory: `config.json` (a pre-training config whose `model`
is the checkpoint's shape), `checkpoints/0` (the parameters only, no
optimizer state) and `tokenizer.model` when the directory has a SentencePiece
one whose size is the vocabulary's. `train.generate` and `train.evaluate`
take the run as `--workdir`, and every training stage as `init_from`. The
run cannot itself be resumed with `python -m train` (it has no optimizer
state). No PyTorch is involved: the tensors are read with safetensors' numpy
API.

Large checkpoints stream: every parameter is created directly in its target
sharding with `jax.make_array_from_callback`, whose callback reads from the
files only the slice that one device holds (per layer, through
`safe_open(...).get_slice`; train/hf_files.py), and each file is opened only
for that read, so no memory map keeps a second copy of the checkpoint
resident. Besides the parameters (on CPU they are the device arrays), the host
holds one parameter's shard being made and, while the checkpoint is saved,
Orbax's buffers: benchmarks/convert_memory.py measured a peak of 1.44x the
parameters (plus the process's own 0.3 GiB) for a 1b-shaped import on CPU.

`export` writes `config.json` and one `model.safetensors` that
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads, tensor by
tensor (one parameter on the host at a time), in the dtype the run was
imported from (float32 for a run trained here) unless `--export_dtype` says
otherwise; bfloat16 and float16 files imported into float32 parameters
export back bit for bit. The run's `tokenizer.model` is copied as it is; no
Hugging Face tokenizer config is written.

The mapping (HF tensor [out, in] -> strata parameter, per layer i; with
`scan_layers` the layers are stacked on a leading axis of `layers/...`):

  model.embed_tokens.weight [V, D]                 embed/embedding [V, D]
  model.layers.i.input_layernorm.weight [D]        layers_i/attn_norm/scale
  model.layers.i.self_attn.q_proj.weight [N*H, D]  layers_i/attn/wq [D, N, H]
  model.layers.i.self_attn.k_proj.weight [K*H, D]  layers_i/attn/wk [D, K, H]
  model.layers.i.self_attn.v_proj.weight [K*H, D]  layers_i/attn/wv [D, K, H]
  model.layers.i.self_attn.o_proj.weight [D, N*H]  layers_i/attn/wo [N, H, D]
  model.layers.i.post_attention_layernorm.weight   layers_i/mlp_norm/scale
  model.layers.i.mlp.gate_proj.weight [F, D]       layers_i/mlp/wi_gate [D, F]
  model.layers.i.mlp.up_proj.weight [F, D]         layers_i/mlp/wi_up [D, F]
  model.layers.i.mlp.down_proj.weight [D, F]       layers_i/mlp/wo [F, D]
  model.norm.weight [D]                            final_norm/scale
  lm_head.weight [V, D] (absent when tied)         lm_head [D, V]

No permutation of q/k: Hugging Face Llama rotates feature i with i + H/2
("rotate_half"), as model/rope.py does. Config fields: hidden_size,
intermediate_size, num_hidden_layers, num_attention_heads,
num_key_value_heads (GQA), head_dim, rms_norm_eps, max_position_embeddings,
tie_word_embeddings, and the RoPE base and scaling from transformers 5's
`rope_parameters` or the older `rope_theta` / `rope_scaling`; the embedding
has no input multiplier (`scale_embeddings=False`). Refused, naming the
field: another `model_type` or `architectures`, `hidden_act` other than
silu, `attention_bias` or `mlp_bias`, a RoPE type other than default and
llama3, a partial rotary factor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Sequence

from absl import flags
from etils import epath
import jax
import ml_collections
import numpy as np

from configs import cli
from configs.cli import UserError
from train import console
from train import distributed
from train import hf_files
from train import paths

HF_CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'
ARCHITECTURE = 'LlamaForCausalLM'
ROPE_TYPES = ('default', 'llama3')


# ------------------------------------------------------------- the config

def _get(hf: dict[str, Any], name: str, where: str, kind: type | tuple[type, ...],
         default: Any = dataclasses.MISSING) -> Any:
  """`hf[name]` checked to be a `kind` (bools are not ints), or `default` if absent/null."""
  value = hf.get(name)
  if value is None:
    if default is dataclasses.MISSING:
      raise UserError(f'{where}: the field "{name}" is missing.')
    return default
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
    raise UserError(f'{where}: the field "{name}" is {value!r}, expected '
                    f'{" or ".join(k.__name__ for k in kinds)}.')
  return value


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
  """The model's RoPE keys, from `rope_parameters` (transformers 5) or the older fields."""
  if hf.get('rope_scaling') is not None:
    field, params = 'rope_scaling', hf['rope_scaling']
  else:
    field, params = 'rope_parameters', hf.get('rope_parameters') or {}
  if not isinstance(params, dict):
    raise UserError(f'{where}: the field "{field}" is {params!r}, expected an object.')
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type not in ROPE_TYPES:
    raise UserError(f'{where}: "{field}.rope_type" is {rope_type!r}; strata implements '
                    f'{" and ".join(ROPE_TYPES)} RoPE only.')
  partial = params.get('partial_rotary_factor')
  partial = hf.get('partial_rotary_factor') if partial is None else partial
  if partial not in (None, 1, 1.0):
    raise UserError(f'{where}: "partial_rotary_factor" is {partial!r}; strata rotates the '
                    'whole head (1.0) only.')
  theta = params.get('rope_theta', hf.get('rope_theta', 10000.0))
  if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
    raise UserError(f'{where}: "rope_theta" is {theta!r}, expected a positive number.')
  keys = {'rope_theta': float(theta), 'rope_scaling': 'none'}
  if rope_type == 'llama3':
    sub = f'{where} "{field}"'
    keys.update(
        rope_scaling='llama3',
        rope_scaling_factor=float(_get(params, 'factor', sub, (int, float))),
        rope_low_freq_factor=float(_get(params, 'low_freq_factor', sub, (int, float))),
        rope_high_freq_factor=float(_get(params, 'high_freq_factor', sub, (int, float))),
        rope_original_max_len=_get(params, 'original_max_position_embeddings', sub, int,
                                   hf.get('max_position_embeddings', 2048)))
  return keys


def model_keys_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
  """The shape and RoPE keys of `config.model` for a Hugging Face Llama `config.json`.

  Raises UserError naming the field for anything strata cannot represent.
  """
  model_type = hf.get('model_type')
  if model_type != 'llama':
    raise UserError(f'{where}: "model_type" is {model_type!r}; only "llama" checkpoints '
                    'can be imported.')
  architectures = hf.get('architectures') or [ARCHITECTURE]
  if list(architectures) != [ARCHITECTURE]:
    raise UserError(f'{where}: "architectures" is {architectures!r}; only '
                    f'["{ARCHITECTURE}"] can be imported.')
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    raise UserError(f'{where}: "hidden_act" is {act!r}; strata\'s MLP is SwiGLU (silu).')
  for name in ('attention_bias', 'mlp_bias'):
    if hf.get(name):
      raise UserError(f'{where}: "{name}" is true; strata\'s projections have no biases.')
  d_model = _get(hf, 'hidden_size', where, int)
  num_heads = _get(hf, 'num_attention_heads', where, int)
  keys = dict(
      vocab_size=_get(hf, 'vocab_size', where, int),
      d_model=d_model,
      num_layers=_get(hf, 'num_hidden_layers', where, int),
      num_heads=num_heads,
      num_kv_heads=_get(hf, 'num_key_value_heads', where, int, num_heads),
      head_dim=_get(hf, 'head_dim', where, int, d_model // max(num_heads, 1)),
      mlp_dim=_get(hf, 'intermediate_size', where, int),
      max_len=_get(hf, 'max_position_embeddings', where, int, 2048),
      norm_eps=float(_get(hf, 'rms_norm_eps', where, (int, float), 1e-6)),
      tie_embeddings=_get(hf, 'tie_word_embeddings', where, bool, False),
      # A Hugging Face Llama has no input multiplier and no tied-logit scale.
      scale_embeddings=False,
      scale_tied_logits=False,
      embed_init_std=float(_get(hf, 'initializer_range', where, (int, float), 0.02)),
      dropout_rate=0.0,
  )
  keys.update(_rope(hf, where))
  return keys


def hf_config_from_model(cfg: Any, extra: dict[str, Any], dtype: str) -> dict[str, Any]:
  """A `LlamaForCausalLM` config.json for ModelConfig `cfg`.

  `extra`: token ids (bos/eos/pad) to write. Both the transformers 5 field
  (`rope_parameters`) and the older ones (`rope_theta`, `rope_scaling`) are
  written, so older transformers versions read the same RoPE.
  """
  rope = {'rope_type': 'default', 'rope_theta': float(cfg.rope_theta)}
  if cfg.rope_scaling == 'llama3':
    rope.update(rope_type='llama3', factor=float(cfg.rope_scaling_factor),
                low_freq_factor=float(cfg.rope_low_freq_factor),
                high_freq_factor=float(cfg.rope_high_freq_factor),
                original_max_position_embeddings=int(cfg.rope_original_max_len))
  hf = {
      'architectures': [ARCHITECTURE],
      'model_type': 'llama',
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.d_model,
      'intermediate_size': cfg.mlp_dim,
      'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim,
      'hidden_act': 'silu',
      'max_position_embeddings': cfg.max_len,
      'rms_norm_eps': float(cfg.norm_eps),
      'tie_word_embeddings': bool(cfg.tie_embeddings),
      'attention_bias': False,
      'attention_dropout': 0.0,
      'mlp_bias': False,
      'initializer_range': float(cfg.embed_init_std or 0.02),
      'rope_parameters': rope,
      'rope_theta': float(cfg.rope_theta),
      'rope_scaling': dict(rope) if cfg.rope_scaling != 'none' else None,
      'use_cache': True,
      'dtype': dtype,
      'torch_dtype': dtype,
  }
  hf.update(extra)
  return hf


# ------------------------------------------------------- the tensor mapping

@dataclasses.dataclass(frozen=True)
class Tensor:
  """One strata parameter and the Hugging Face tensor(s) it comes from.

  `hf_name` has a `{}` for the layer index when the parameter is per layer;
  `stacked` means the layers are one parameter with a leading layer axis.
  `layout` says how a HF tensor [out, in] becomes the parameter:
    'same': as it is; 'transpose': [in, out];
    'heads_out': [N*H, D] -> [D, N, H]; 'heads_in': [D, N*H] -> [N, H, D].
  """
  path: tuple[str, ...]
  hf_name: str
  layout: str
  stacked: bool = False


_LAYER_TENSORS = (
    (('attn_norm', 'scale'), 'model.layers.{}.input_layernorm.weight', 'same'),
    (('attn', 'wq'), 'model.layers.{}.self_attn.q_proj.weight', 'heads_out'),
    (('attn', 'wk'), 'model.layers.{}.self_attn.k_proj.weight', 'heads_out'),
    (('attn', 'wv'), 'model.layers.{}.self_attn.v_proj.weight', 'heads_out'),
    (('attn', 'wo'), 'model.layers.{}.self_attn.o_proj.weight', 'heads_in'),
    (('mlp_norm', 'scale'), 'model.layers.{}.post_attention_layernorm.weight', 'same'),
    (('mlp', 'wi_gate'), 'model.layers.{}.mlp.gate_proj.weight', 'transpose'),
    (('mlp', 'wi_up'), 'model.layers.{}.mlp.up_proj.weight', 'transpose'),
    (('mlp', 'wo'), 'model.layers.{}.mlp.down_proj.weight', 'transpose'),
)


def tensor_map(cfg: Any) -> list[Tensor]:
  """Every parameter of `Transformer(cfg)` with its Hugging Face source, in file order."""
  out = [Tensor(('embed', 'embedding'), 'model.embed_tokens.weight', 'same')]
  if cfg.scan_layers:
    out += [Tensor(('layers',) + path, name, layout, stacked=True)
            for path, name, layout in _LAYER_TENSORS]
  else:
    out += [Tensor((f'layers_{i}',) + path, name.format(i), layout)
            for i in range(cfg.num_layers) for path, name, layout in _LAYER_TENSORS]
  out.append(Tensor(('final_norm', 'scale'), 'model.norm.weight', 'same'))
  if not cfg.tie_embeddings:
    out.append(Tensor(('lm_head',), 'lm_head.weight', 'transpose'))
  return out


def hf_names(tensor: Tensor, num_layers: int) -> list[str]:
  return ([tensor.hf_name.format(i) for i in range(num_layers)] if tensor.stacked
          else [tensor.hf_name])


def hf_shape(layout: str, shape: Sequence[int]) -> tuple[int, ...]:
  """The Hugging Face tensor's shape for one layer's parameter of `shape`."""
  if layout == 'same':
    return tuple(shape)
  if layout == 'transpose':
    return tuple(shape[::-1])
  if layout == 'heads_out':
    d, n, h = shape
    return (n * h, d)
  if layout == 'heads_in':
    n, h, d = shape
    return (d, n * h)
  raise ValueError(f'unknown layout {layout!r}')


def flat_params(params: Any) -> dict[tuple[str, ...], Any]:
  """{('layers', 'attn', 'wq'): leaf} of a parameter tree (arrays or shapes)."""
  return {tuple(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def hf_entries(cfg: Any, params: Any, file_dtype: np.dtype
               ) -> list[tuple[str, tuple[int, ...], np.dtype]]:
  """(name, shape, dtype) of every Hugging Face tensor of `params`, in file order."""
  flat = flat_params(params)
  entries = []
  for tensor in tensor_map(cfg):
    shape = flat[tensor.path].shape[1:] if tensor.stacked else flat[tensor.path].shape
    entries += [(name, hf_shape(tensor.layout, shape), np.dtype(file_dtype))
                for name in hf_names(tensor, cfg.num_layers)]
  return entries


def to_hf(layout: str, x: np.ndarray) -> np.ndarray:
  """One layer's parameter in the Hugging Face layout (C-contiguous)."""
  if layout == 'same':
    out = x
  elif layout == 'transpose':
    out = x.T
  elif layout == 'heads_out':
    out = x.reshape(x.shape[0], -1).T
  elif layout == 'heads_in':
    out = x.reshape(-1, x.shape[-1]).T
  else:
    raise ValueError(f'unknown layout {layout!r}')
  return np.ascontiguousarray(out)


def _bounds(index: tuple[slice, ...], shape: Sequence[int]) -> list[tuple[int, int]]:
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f'strided shard index {index}')
    out.append((start, stop))
  return out


def read_block(read: Callable[[tuple[slice, ...]], np.ndarray], layout: str,
               shape: Sequence[int], index: tuple[slice, ...]) -> np.ndarray:
  """`param[index]` of one layer's parameter of `shape`, reading only what it needs.

  `read(hf_index)` returns that slice of the Hugging Face tensor.
  """
  b = _bounds(index, shape)
  if layout == 'same':
    return read(tuple(slice(*x) for x in b))
  if layout == 'transpose':
    return read(tuple(slice(*x) for x in b[::-1])).T
  if layout == 'heads_out':   # param [D, N, H] <- hf [N*H, D]
    (d0, d1), (n0, n1), (h0, h1) = b
    h = shape[2]
    block = read((slice(n0 * h, n1 * h), slice(d0, d1)))
    return block.reshape(n1 - n0, h, d1 - d0)[:, h0:h1, :].transpose(2, 0, 1)
  if layout == 'heads_in':    # param [N, H, D] <- hf [D, N*H]
    (n0, n1), (h0, h1), (d0, d1) = b
    h = shape[1]
    block = read((slice(d0, d1), slice(n0 * h, n1 * h)))
    return block.reshape(d1 - d0, n1 - n0, h)[:, :, h0:h1].transpose(1, 2, 0)
  raise ValueError(f'unknown layout {layout!r}')


# ------------------------------------------------------- import

def _read_hf_config(hf_dir: str) -> tuple[dict[str, Any], str]:
  if paths.is_remote(hf_dir):
    raise UserError(f'--hf_dir={hf_dir}: give a local directory (safetensors maps local '
                    'files); copy the checkpoint here first.')
  directory = epath.Path(hf_dir)
  if not directory.is_dir():
    raise UserError(f'--hf_dir={hf_dir} is not a directory.')
  path = directory / HF_CONFIG_FILE
  if not path.exists():
    raise UserError(f'--hf_dir={hf_dir}: no {HF_CONFIG_FILE} in it; give a Hugging Face '
                    'model directory (save_pretrained / a hub snapshot).')
  try:
    hf = json.loads(path.read_text())
  except ValueError as e:
    raise UserError(f'{path}: not JSON ({e}).') from None
  if not isinstance(hf, dict):
    raise UserError(f'{path}: not a JSON object.')
  return hf, os.fspath(path)


def _token_ids(hf: dict[str, Any]) -> dict[str, Any]:
  return {k: hf.get(k) for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')}


def run_config(model_keys: dict[str, Any], workdir: str, *, dtype: str, param_dtype: str,
               scan_layers: bool, seq_len: int | None, hf_info: dict[str, Any]
               ) -> ml_collections.ConfigDict:
  """The run's config.json: the `1b` pre-training preset with the checkpoint's model.

  `data.workdir` is the run itself, so no other data's tokenizer is ever taken
  for this model's (train.evaluate then needs --data_dir); `hf` records the
  source, its dtype and token ids for export.
  """
  from configs import pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.get_config('1b')
  model = config.model
  for key, value in model_keys.items():
    model[key] = value
  model.dtype, model.param_dtype, model.scan_layers = dtype, param_dtype, scan_layers
  config.seq_len = int(seq_len or min(model.max_len, 2048))
  if config.seq_len > model.max_len:
    raise UserError(f'--seq_len={config.seq_len} is longer than the checkpoint\'s '
                    f'max_position_embeddings ({model.max_len}).')
  # What train.evaluate scores at once by default (the preset's 256 rows are a pod's).
  config.batch_size = 8
  config.data.workdir = workdir
  config.hf = ml_collections.ConfigDict(hf_info)
  return config


def _tokenizer_bytes(hf_dir: str, vocab_size: int) -> bytes | None:
  """The directory's SentencePiece tokenizer.model if it fits the vocabulary, else None."""
  path = epath.Path(hf_dir) / TOKENIZER_FILE
  if not path.exists():
    print(f'No {TOKENIZER_FILE} in {hf_dir}: the run has no tokenizer (train.generate needs '
          'one).', flush=True)
    return None
  data = path.read_bytes()
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  processor = spm.SentencePieceProcessor()
  try:
    processor.LoadFromSerializedProto(data)
  except (RuntimeError, OSError):
    print(f'{path} is not a SentencePiece model (Llama 3 uses a tiktoken file); not copied.',
          flush=True)
    return None
  if processor.GetPieceSize() != vocab_size:
    print(f'{path} has {processor.GetPieceSize()} pieces but vocab_size is {vocab_size}; not '
          'copied (generate and evaluate refuse a tokenizer of another size).', flush=True)
    return None
  return data


def import_checkpoint(hf_dir: str, workdir: str, *, dtype: str = 'float32',
                      param_dtype: str = 'float32', scan_layers: bool = True,
                      seq_len: int | None = None) -> dict[str, Any]:
  """Writes the run directory `workdir` from the Hugging Face Llama in `hf_dir`.

  Everything is checked (config fields, every tensor's name, shape and dtype)
  before anything is written; config.json is written last, so a failed import
  leaves no directory that looks like a run. Returns a summary.
  """
  from model import config as model_config_lib  # pylint: disable=g-import-not-at-top
  from model import transformer  # pylint: disable=g-import-not-at-top
  from train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import run_files  # pylint: disable=g-import-not-at-top
  from train import state as state_lib  # pylint: disable=g-import-not-at-top

  hf, where = _read_hf_config(hf_dir)
  model_keys = model_keys_from_hf(hf, where)
  workdir = run_files.check_workdir(workdir)
  if ((epath.Path(workdir) / run_files.CONFIG_FILE).exists()
      or run_files.has_checkpoint(workdir)):
    raise UserError(f'--workdir={workdir} already holds a run; import into a new directory.')
  files = hf_files.CheckpointFiles(hf_dir)
  for name in ('dtype', 'param_dtype'):
    value = {'dtype': dtype, 'param_dtype': param_dtype}[name]
    if value not in model_config_lib.DTYPES:
      raise UserError(f'--{name}={value} is not one of {model_config_lib.DTYPES}.')
  hf_info = dict(source=paths.resolve_str(hf_dir), **_token_ids(hf))
  config = run_config(model_keys, workdir, dtype=dtype, param_dtype=param_dtype,
                      scan_layers=scan_layers, seq_len=seq_len, hf_info=hf_info)
  try:
    cfg = model_config_lib.ModelConfig.from_config(config.model)
  except (KeyError, ValueError, TypeError) as e:
    raise UserError(f'{where}: {cli.one_line(e)}') from None

  mesh = mesh_lib.make_mesh(config.mesh)
  model = transformer.Transformer(cfg)
  targets = state_lib.abstract_state(config, model, mesh)[0].params
  tensors = {t.path: t for t in tensor_map(cfg)}
  flat = jax.tree_util.tree_flatten_with_path(targets)
  param_paths = [tuple(k.key for k in path) for path, _ in flat[0]]
  if set(param_paths) != set(tensors):   # a model change this file does not know about
    raise AssertionError(f'parameter tree {sorted(param_paths)} != mapping {sorted(tensors)}')
  expected = {}
  for path, (_, leaf) in zip(param_paths, flat[0]):
    tensor = tensors[path]
    layer_shape = leaf.shape[1:] if tensor.stacked else leaf.shape
    for name in hf_names(tensor, cfg.num_layers):
      expected[name] = hf_shape(tensor.layout, layer_shape)
  files.check(expected, ignored={'lm_head.weight'} if cfg.tie_embeddings else set())
  source_dtypes = sorted({files.dtype_name(n) for n in expected})
  config.hf.dtype = source_dtypes[0] if len(source_dtypes) == 1 else 'float32'
  tokenizer = _tokenizer_bytes(hf_dir, cfg.vocab_size)

  leaves = [_make_param(files, tensors[path], leaf, cfg.num_layers)
            for path, (_, leaf) in zip(param_paths, flat[0])]
  params = jax.tree_util.tree_unflatten(flat[1], leaves)
  checkpointer = checkpoint_lib.Checkpointer(
      os.fspath(epath.Path(workdir) / run_files.CHECKPOINT_DIR), keep=1, keep_best=False,
      async_save=False)
  try:
    checkpointer.save(0, {'params': params}, {}, {})
  finally:
    checkpointer.close()
  del params, leaves
  if jax.process_index() == 0:
    if tokenizer is not None:
      (epath.Path(workdir) / run_files.TOKENIZER_FILE).write_bytes(tokenizer)
    run_files.write_config(config, workdir)
  return {'workdir': workdir, 'num_params': model_config_lib.num_params(cfg),
          'source_dtype': config.hf.dtype, 'param_dtype': param_dtype,
          'tokenizer': tokenizer is not None}


def _make_param(files: hf_files.CheckpointFiles, tensor: Tensor, target: jax.ShapeDtypeStruct,
                num_layers: int) -> jax.Array:
  """One parameter, created shard by shard on its devices from the files."""
  dtype = np.dtype(target.dtype)
  names = hf_names(tensor, num_layers)
  layer_shape = target.shape[1:] if tensor.stacked else target.shape

  def layer_block(layer: int, index: tuple[slice, ...]) -> np.ndarray:
    # In the file's dtype, possibly a transposed view: the one copy comes below.
    read = lambda hf_index: files.read(names[layer], hf_index)
    return read_block(read, tensor.layout, layer_shape, index)

  def shard(index: tuple[slice, ...]) -> np.ndarray:
    if not tensor.stacked:   # cast and made contiguous in one copy
      return np.array(layer_block(0, index), dtype=dtype, order='C')
    first, last = _bounds(index[:1], target.shape[:1])[0]
    shape = [last - first] + [b - a for a, b in _bounds(index[1:], layer_shape)]
    out = np.empty(shape, dtype)
    for layer in range(first, last):
      out[layer - first] = layer_block(layer, index[1:])   # cast on assignment
    return out

  return jax.make_array_from_callback(target.shape, target.sharding, shard)


# ------------------------------------------------------- export

def load_params(workdir: str, step: int | None = None) -> tuple[Any, Any, Any, Any]:
  """(config, ModelConfig, params, tokenizer) of a run: what export writes.

  The one place export gets its parameters. A LoRA run comes back merged
  (`run_dir.load_run` folds the adapters into the recorded base with
  `train.lora.merge`: float32, then the base dtype), so export writes plain
  Llama weights and nothing else in export needs to know about LoRA.
  """
  from train import run_dir  # pylint: disable=g-import-not-at-top
  config, model, params, tokenizer, _ = run_dir.open_run(workdir, step)
  return config, model.config, params, tokenizer


def _check_exportable(cfg: Any, where: str) -> None:
  if cfg.tie_embeddings and cfg.scale_embeddings:
    raise UserError(f'{where}: model.scale_embeddings is true with tied embeddings; a Hugging '
                    'Face Llama has no input multiplier, and the tied table cannot absorb it.')
  if cfg.tie_embeddings and cfg.scale_tied_logits:
    raise UserError(f'{where}: model.scale_tied_logits is true; a Hugging Face Llama has no '
                    'logit scale.')
  if cfg.d_model % cfg.num_heads:
    raise UserError(f'{where}: model.d_model={cfg.d_model} is not a multiple of '
                    f'model.num_heads={cfg.num_heads}, which transformers\' LlamaConfig '
                    'requires.')


def _export_token_ids(config: Any, tokenizer: Any) -> dict[str, Any]:
  hf = config.get('hf')
  if hf is not None:
    return {k: hf.get(k) for k in ('bos_token_id', 'eos_token_id', 'pad_token_id')}
  if tokenizer is not None:
    return {'bos_token_id': tokenizer.bos_id, 'eos_token_id': tokenizer.eos_id,
            'pad_token_id': tokenizer.pad_id if tokenizer.pad_id >= 0 else None}
  from data_pipeline import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return {'bos_token_id': tokenizer_lib.BOS_ID, 'eos_token_id': tokenizer_lib.EOS_ID,
          'pad_token_id': tokenizer_lib.PAD_ID}


def export_checkpoint(workdir: str, hf_dir: str, *, step: int | None = None,
                      export_dtype: str | None = None) -> dict[str, Any]:
  """Writes config.json and model.safetensors of the run `workdir` into `hf_dir`."""
  out = epath.Path(hf_dir)
  if jax.process_count() > 1:
    raise UserError('export runs as one process; start it on one host.')
  if out.exists() and any(out.iterdir()):
    raise UserError(f'--hf_dir={hf_dir} exists and is not empty; export into a new directory.')
  config, cfg, params, tokenizer = load_params(workdir, step)
  where = os.fspath(epath.Path(workdir) / HF_CONFIG_FILE)
  _check_exportable(cfg, where)
  if export_dtype is None:
    export_dtype = config.get('hf', {}).get('dtype') or cfg.param_dtype
  if export_dtype not in hf_files.DTYPES:
    raise UserError(f'--export_dtype={export_dtype} is not one of {sorted(hf_files.DTYPES)}.')
  file_dtype = hf_files.DTYPES[export_dtype]

  tensors = tensor_map(cfg)
  flat = flat_params(params)
  entries = hf_entries(cfg, params, file_dtype)
  out.mkdir(parents=True, exist_ok=True)
  weights = out / hf_files.WEIGHTS_FILE
  tmp = os.fspath(weights) + '.tmp'
  writer = hf_files.SafetensorsWriter(tmp, entries)
  try:
    for tensor in tensors:
      # One parameter on the host at a time (a stacked one: all its layers).
      value = np.asarray(jax.device_get(flat[tensor.path]))
      if tensor.path == ('embed', 'embedding') and cfg.scale_embeddings:
        # Untied: the input multiplier folds into the table (checked above).
        value = value.astype(np.float32) * np.float32(math.sqrt(cfg.d_model))
      layers = value if tensor.stacked else value[None]
      for name, layer in zip(hf_names(tensor, cfg.num_layers), layers):
        writer.write(name, to_hf(tensor.layout, layer).astype(file_dtype))
      del value, layers
  finally:
    writer.close()
  os.replace(tmp, weights)
  hf = hf_config_from_model(cfg, _export_token_ids(config, tokenizer), export_dtype)
  run_tokenizer = epath.Path(workdir) / TOKENIZER_FILE
  if run_tokenizer.exists():
    (out / TOKENIZER_FILE).write_bytes(run_tokenizer.read_bytes())
  (out / HF_CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + '\n')
  return {'hf_dir': os.fspath(out), 'step': int(config.checkpoint_step),
          'dtype': export_dtype, 'num_tensors': len(entries)}


# ------------------------------------------------------- the command

FLAGS = flags.FLAGS
COMMANDS = ('import', 'export')


def define_flags() -> None:
  """Defines the command-line flags; called only when run as a program."""
  flags.DEFINE_string('hf_dir', None, 'Hugging Face model directory (import: read; export: '
                      'written, must be new or empty).')
  flags.DEFINE_string('workdir', None, 'strata run directory (import: written, must be new; '
                      'export: read).')
  flags.DEFINE_string('dtype', 'float32', 'import: the run\'s compute dtype (model.dtype); '
                      'bfloat16 on accelerators.')
  flags.DEFINE_string('param_dtype', 'float32', 'import: the dtype the parameters are stored '
                      'in (model.param_dtype).')
  flags.DEFINE_bool('scan_layers', True, 'import: stack the layers (model.scan_layers).')
  flags.DEFINE_integer('seq_len', None, 'import: the run\'s seq_len (default: '
                       'max_position_embeddings, at most 2048).')
  flags.DEFINE_integer('step', None, 'export: the checkpoint step (default: the latest).')
  flags.DEFINE_string('export_dtype', None, 'export: float32, bfloat16 or float16 (default: '
                      'the dtype the run was imported from, else model.param_dtype).')


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise UserError(f'give one command, import or export, e.g. python -m train.convert import '
                    f'--hf_dir=DIR --workdir=runs/x (got {" ".join(argv[1:]) or "none"}).')
  for name in ('hf_dir', 'workdir'):
    if not FLAGS[name].value:
      raise UserError(f'{argv[1]} needs --{name}.')
  distributed.initialize_from_flags()
  console.quiet_libraries()
  if argv[1] == 'import':
    summary = import_checkpoint(FLAGS.hf_dir, FLAGS.workdir, dtype=FLAGS.dtype,
                                param_dtype=FLAGS.param_dtype, scan_layers=FLAGS.scan_layers,
                                seq_len=FLAGS.seq_len)
    if jax.process_index() == 0:
      print(f'Imported {FLAGS.hf_dir} into {summary["workdir"]}: '
            f'{summary["num_params"]:,} parameters ({summary["source_dtype"]} in the files, '
            f'{summary["param_dtype"]} in the run). Use it as --workdir for train.generate / '
            'train.evaluate, or as init_from for fine-tuning.', flush=True)
  else:
    summary = export_checkpoint(FLAGS.workdir, FLAGS.hf_dir, step=FLAGS.step,
                                export_dtype=FLAGS.export_dtype)
    print(f'Exported {FLAGS.workdir} (step {summary["step"]}) to {summary["hf_dir"]}: '
          f'{summary["num_tensors"]} tensors in {summary["dtype"]}.', flush=True)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
