"""The transformer's hyper-parameters, its parameter count and its FLOPs.

`ModelConfig` is a frozen dataclass, so it is hashable and can be a static
attribute of a Flax module. `num_params` is computed from the shapes alone and
is tested against the real parameter tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ATTENTION_IMPLS = ('auto', 'xla', 'block', 'cudnn', 'cudnn_packed', 'splash')
# The rematerialisation policies that `model.transformer` knows (see there).
REMAT_POLICIES = (
    'none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
    'save_attn_out', 'save_qkv_attn_out', 'save_everything',
)
DTYPES = ('float32', 'bfloat16', 'float16')
# RoPE frequency scalings that `model.rope` implements ('none': plain RoPE).
ROPE_SCALINGS = ('none', 'llama3')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-family decoder-only transformer.

  Attributes:
    vocab_size: number of token ids.
    d_model: width of the residual stream.
    num_layers: number of transformer blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); divides num_heads.
    head_dim: width of one attention head.
    mlp_dim: hidden width of the SwiGLU MLP.
    max_len: longest sequence the model is meant for (default KV-cache length).
    rope_theta: base of the rotary position embedding frequencies.
    rope_scaling: 'none', or 'llama3': Llama 3.1's context extension, which
      divides the low RoPE frequencies by `rope_scaling_factor`, keeps the high
      ones and interpolates in between (see model/rope.py). The four fields
      below are read only with 'llama3'; their defaults are Llama 3.1's.
    rope_scaling_factor: how much the low frequencies are slowed down.
    rope_low_freq_factor: wavelengths longer than
      rope_original_max_len / rope_low_freq_factor are fully scaled.
    rope_high_freq_factor: wavelengths shorter than
      rope_original_max_len / rope_high_freq_factor are kept.
    rope_original_max_len: the context length the model was pre-trained with
      before the extension (Hugging Face `original_max_position_embeddings`).
    tie_embeddings: logits use the input embedding matrix (no separate head).
    scale_embeddings: multiply the looked-up embeddings by sqrt(d_model), so
      the table's 1/sqrt(d_model) init gives a unit-RMS input (as Gemma
      does); False for Llama checkpoints, which have no input multiplier.
    scale_tied_logits: multiply the tied logits by 1/sqrt(d_model) (T5X,
      MaxText). Ignored when not tied. Off in every preset: under Adam it
      slows the tied readout's learning by sqrt(d) (measured on `tiny`: train
      loss 8.6 at step 20 with it, 4.8 without); kept as an option for
      checkpoints trained with it.
    embed_init_std: std of the embedding table's init; 0 means 1/sqrt(d_model).
      The tied presets use the GPT-2 / Hugging Face convention: no input
      multiplier, no logit scale, std 0.02. At init the final norm's output
      then barely points along the current token's row, so its own logit is
      ~d * 0.02**2 (0.1 at d=256, not ~sqrt(d) = 16 as with a unit-RMS
      input row: `tiny` started at 14.3 nats instead of ln V = 9.0), and
      the loss starts at ~ln V (tests/test_init_loss.py checks every preset).
    dropout_rate: residual dropout, active only when not deterministic.
    dtype: compute dtype ('float32' on CPU, 'bfloat16' on accelerators).
    param_dtype: dtype the parameters are stored in.
    scan_layers: stack the blocks with `nn.scan` (one compiled block).
    remat_policy: what the backward pass may keep; one of REMAT_POLICIES.
    attention_impl: 'auto' | 'xla' | 'block' | 'cudnn' | 'cudnn_packed' |
      'splash' (see model.attention).
    norm_eps: RMSNorm epsilon.
    loss_chunk_size: > 0: the next-token loss forms the logits this many
      positions at a time (`train.losses.chunked_cross_entropy`), never the
      whole [B, L, V] float32 array; 0: the plain loss on the full logits.
  """
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  max_len: int
  rope_theta: float = 10000.0
  rope_scaling: str = 'none'
  rope_scaling_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  tie_embeddings: bool = False
  scale_embeddings: bool = True
  scale_tied_logits: bool = False
  embed_init_std: float = 0.0
  dropout_rate: float = 0.0
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  scan_layers: bool = True
  remat_policy: str = 'none'
  attention_impl: str = 'auto'
  norm_eps: float = 1e-6
  loss_chunk_size: int = 0

  def __post_init__(self):
    for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads',
                 'head_dim', 'mlp_dim', 'max_len'):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f'ModelConfig.{name} must be a positive int, got {value!r}.')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'ModelConfig.num_heads ({self.num_heads}) must be a multiple of '
          f'num_kv_heads ({self.num_kv_heads}).')
    if self.head_dim % 2:
      raise ValueError(f'ModelConfig.head_dim must be even for RoPE, got {self.head_dim}.')
    if self.embed_init_std < 0:
      raise ValueError(f'ModelConfig.embed_init_std must be >= 0, got {self.embed_init_std}.')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f'ModelConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}.')
    if not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 0:
      raise ValueError(
          f'ModelConfig.loss_chunk_size must be an int >= 0, got {self.loss_chunk_size!r}.')
    if self.rope_theta <= 0:
      raise ValueError(f'ModelConfig.rope_theta must be positive, got {self.rope_theta}.')
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ValueError(
          f'ModelConfig.rope_scaling={self.rope_scaling!r} is not one of {ROPE_SCALINGS}.')
    if self.rope_scaling == 'llama3':
      if not self.rope_scaling_factor >= 1.0:
        raise ValueError('ModelConfig.rope_scaling_factor must be >= 1, got '
                         f'{self.rope_scaling_factor}.')
      if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
        raise ValueError(
            'ModelConfig needs 0 < rope_low_freq_factor < rope_high_freq_factor, got '
            f'{self.rope_low_freq_factor} and {self.rope_high_freq_factor}.')
      value = self.rope_original_max_len
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(
            f'ModelConfig.rope_original_max_len must be a positive int, got {value!r}.')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(
            f'ModelConfig.{name}={getattr(self, name)!r} is not one of {DTYPES}.')
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f'ModelConfig.remat_policy={self.remat_policy!r} is not one of {REMAT_POLICIES}.')
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
          f'ModelConfig.attention_impl={self.attention_impl!r} is not one of '
          f'{ATTENTION_IMPLS}.')

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> ModelConfig:
    """Builds it from an ml_collections ConfigDict (or dict) with the same keys."""
    items = dict(config.items()) if hasattr(config, 'items') else dict(config)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(items) - fields)
    if unknown:
      raise KeyError(f'Unknown model config key(s) {unknown}; valid keys: {sorted(fields)}.')
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.default is dataclasses.MISSING and f.name not in items)
    if missing:
      raise KeyError(f'Model config is missing key(s) {missing}.')
    # ConfigDicts may hold floats where ints are meant (e.g. 1e3); keep ints ints.
    for f in dataclasses.fields(cls):
      if f.name in items and f.type == 'int' and isinstance(items[f.name], float):
        if items[f.name].is_integer():
          items[f.name] = int(items[f.name])
    return cls(**items)


def num_params(cfg: ModelConfig) -> int:
  """Exact number of parameters of `Transformer(cfg)`."""
  d, v, f = cfg.d_model, cfg.vocab_size, cfg.mlp_dim
  attention = d * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)  # q, k, v, o
  mlp = 3 * d * f  # gate, up, down
  norms = 2 * d
  per_layer = attention + mlp + norms
  embedding = v * d
  head = 0 if cfg.tie_embeddings else d * v
  return embedding + cfg.num_layers * per_layer + d + head  # + final norm


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), for MFU.

  The PaLM paper's appendix formula: `6 * N + 12 * L * H * Q * T`, where N is
  the parameter count without the input-embedding lookup (which is a gather,
  not a matmul) but with the output projection (counted once, also when it is
  tied to the embedding), L the layers, H the query heads, Q the head dim and T
  the sequence length. The attention term counts the full T x T score and
  value matmuls (no discount for the causal mask), as is conventional.
  """
  n = num_params(cfg) - cfg.vocab_size * cfg.d_model  # drop the embedding lookup
  if cfg.tie_embeddings:
    n += cfg.vocab_size * cfg.d_model  # the logits matmul reuses it
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return float(6 * n + attention)
