"""Pre-training configs: next-token prediction on a prepared corpus.

Presets (`configs/pretrain.py:<preset>[,key=value,...]`):

  tiny      ~5.0M params (d 256, 4 layers, GQA 4q/2kv heads, tied embeddings),
            seq 256, batch 16, 450 steps (1.8M tokens). The demo model for a
            2-core CPU.
              python -m train --config=configs/pretrain.py:tiny --workdir=runs/tiny
            Hardware: 2 CPU cores (AMD EPYC), float32. Wall time: measured on
            this 2-core machine at 0.94-1.0 s/step when it is otherwise idle
            (`make demo` 8 min 58 s in a fresh clone, 2026-12-05), about
            twice that with another training job sharing the cores. Peak
            learning rate 1e-3 (3e-3 until 2026-12-05). Expect (stdlib data,
            seed 0): train loss from 9.06 (ln 8192 = 9.01: tied embeddings
            the GPT-2 / Hugging Face way, see model/config.py) to ~4.5;
            validation loss 5.35 at step 150, 4.92 at 300, 4.66 (perplexity
            106) at 450; test loss 4.58, 2.005 bits/byte. At 3e-3 the same
            run reached 5.64 / 5.32 / 5.03-5.09 and test 4.83-4.85, and
            fine-tuning it did worse than fine-tuning from scratch (README,
            "Fine-tuning").
  tiny_2k   `tiny` for 2,000 steps (8.2M tokens), half of each batch's rows
            copy-task rows (x of 8-32 ids, below): the trunk the
            post-training figures need, past `make demo`'s 20-minute budget.
              python -m train --config=configs/pretrain.py:tiny_2k --workdir=runs/tiny_2k
            (`make posttrain_2k` runs it, then the post-training pipeline.)
            Wall time: 33 min on quiet cores (2026-12-05). Expect: validation
            loss 4.75 / 4.03 / 3.76 / 3.62 at steps 500-2,000. SFT from it
            writes the requested function name in 54% of the held-out test
            answers, against 0% from `tiny` (README, "A longer pre-training").
  small     ~28M params (d 512, 8 layers, tied embeddings), seq 512, batch 32.
              python -m train --config=configs/pretrain.py:small --workdir=runs/small
            A CPU can run it but slowly; meant for one GPU/TPU host.
  bench_cpu the benchmark shape of the issue: 6 layers, d 384, 6 heads, seq 256,
            batch 16, vocab 8192.
              python -m benchmarks.train_step --config=configs/pretrain.py:bench_cpu
            Measured on the 2-core machine (quiet, 2026-12-04): 2.7-2.9 s/step,
            ~125 GFLOP/s of model FLOPs counted the peer's way.
  1b        Llama-3.2-1B-like shape (d 2048, 16 layers, 32q/8kv heads, mlp 8192,
            vocab 32000, seq 2048), bf16 compute, splash attention on TPU
            ('auto'), full remat, FSDP over every chip. On one H200
            (2026-12-04, batch 16): 0.552 s/step, MFU 0.42; without remat
            0.529 s, MFU 0.44 (README, "On one GPU").
  7b        the LLaMA-2 7B shape (d 4096, 32 layers, 32 heads, mlp 11008,
            vocab 32000, seq 4096; 6.74e9 params), bf16, full remat, FSDP.
            Both are for TPU pod slices, e.g.
              python -m train --config=configs/pretrain.py:7b --workdir=gs://bucket/runs/7b
            On CPU they can only build their abstract state (`jax.eval_shape`).

`data.workdir` is the prepared data (see configs/data.py); if it is the
embedded default (`data.preset='stdlib'`) and missing, training builds it first.
The tokenizer's vocabulary must equal `model.vocab_size`.

`data.copy_fraction` > 0 replaces that share of each train batch's rows by
copy-task rows (random token ids x, then x again, the loss on the repeat
only; data_pipeline/copy_task.py), to teach copying from the context early.
Off in every preset but `tiny_2k` (0.5): on `tiny` at 0.25 it lowered the
real-data test loss (4.75 against 4.83-4.85) but taught no copying of
random ids in 450 steps, nor at 0.5 in 2,000 steps at 1e-3 (README,
"Preferences"); copying the identifiers of real code does come with the
longer run.

Mesh: sizes of the ('data', 'fsdp', 'tensor') axes, one may be -1 (fills the
devices); `mesh.rules_preset` names logical-axis rules in train/mesh.py
('fsdp_tp', 'fsdp', 'tp') unless `mesh.rules` lists them explicitly.
"""

from __future__ import annotations

import ml_collections

from configs import overrides
from configs import validation as v
from configs.cli import UserError


def _model(**kwargs) -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict(dict(
      vocab_size=8192,
      d_model=256,
      num_layers=4,
      num_heads=4,
      num_kv_heads=4,
      head_dim=64,
      mlp_dim=704,
      max_len=256,
      rope_theta=10000.0,
      # Llama 3.1's context extension (model/config.py); off unless 'llama3'.
      rope_scaling='none',
      rope_scaling_factor=8.0,
      rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0,
      rope_original_max_len=8192,
      tie_embeddings=False,
      # Input and tied-logit scaling and the table's init (model/config.py):
      # untied presets scale the input; tied ones use _tied().
      scale_embeddings=True,
      scale_tied_logits=False,
      embed_init_std=0.0,
      dropout_rate=0.0,
      dtype='float32',
      param_dtype='float32',
      scan_layers=True,
      remat_policy='none',
      attention_impl='auto',
      norm_eps=1e-6,
      # > 0: the loss forms the logits this many positions at a time (model/config.py).
      loss_chunk_size=0,
  ))
  model.update(kwargs)
  return model


# Tied embeddings the GPT-2 / Hugging Face Llama way: no input multiplier, no
# logit scale, a 0.02 table, so the first loss is ~ln V and the readout learns
# at full speed (model/config.py says why and what was measured).
_TIED = dict(tie_embeddings=True, scale_embeddings=False, scale_tied_logits=False,
             embed_init_std=0.02)


def _base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # copy_fraction: share of each train batch's rows replaced by copy-task rows
  # (random ids x of copy_min_len..copy_max_len, then x again; the loss on the
  # repeat only), which teaches copying from the context early
  # (data_pipeline/copy_task.py). 0 = off; evaluation always reads real data.
  config.data = ml_collections.ConfigDict(dict(workdir='runs/data', preset='stdlib',
                                               copy_fraction=0.0, copy_min_len=8,
                                               copy_max_len=64))
  config.model = _model()
  config.seq_len = 256
  config.batch_size = 32          # global, over all processes
  config.num_train_steps = 1000
  config.num_epochs = ml_collections.FieldReference(None, field_type=int)
  config.eval_every = 250
  config.eval_steps = 20
  config.checkpoint_every = 500
  config.keep_checkpoints = 2
  config.patience = 0             # evaluations without improvement; 0 = never stop early
  config.best_metric = 'loss'     # the evaluation metric "best" checkpoints and patience follow
  config.best_mode = 'min'        # 'min' for a loss, 'max' for an accuracy
  config.log_every = 25
  config.seed = 0
  config.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3,
      warmup_steps=100,
      schedule='cosine',          # 'cosine' | 'linear' | 'constant'
      end_lr_factor=0.1,
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      grad_clip_norm=1.0,
      grad_accum_steps=1,
      # Parameters whose path matches this regex get no weight decay.
      weight_decay_exclude=r'norm|bias|(^|/)embed(ding)?(/|$)',
  ))
  config.loss = ml_collections.ConfigDict(dict(z_loss=0.0))
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, tensor=1, num_slices=1, rules_preset='fsdp_tp',
      rules=ml_collections.FieldReference(None, field_type=tuple)))
  return config


def _cpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CPU-friendly settings: unrolled layers measured ~4% faster per step than
  `nn.scan` on XLA:CPU (benchmarks/train_step.py, bench_cpu: 5.53 vs 5.72
  CPU-seconds), and no remat (memory is not the limit)."""
  config.model.scan_layers = False
  config.model.remat_policy = 'none'
  return config


def _set_seq_len(config: ml_collections.ConfigDict, seq_len: int) -> None:
  # RoPE / KV-cache length follows the training length unless set otherwise.
  config.seq_len = seq_len
  config.model.max_len = seq_len


def tiny() -> ml_collections.ConfigDict:
  config = _base()
  config.model = _model(d_model=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                        mlp_dim=704, **_TIED)
  _set_seq_len(config, 256)
  # Sized for ~10 minutes on 2 free CPU cores: a step of 16 x 256 tokens costs
  # ~2.3 CPU-seconds (benchmarks/train_step.py), i.e. ~1.2 s of wall time.
  config.batch_size = 16
  config.num_train_steps = 450
  config.eval_every = 150
  config.eval_steps = 16
  config.checkpoint_every = 150
  config.log_every = 10
  # 1e-3, not 3e-3: validation 4.66 against 5.03 at step 450, and a start that
  # fine-tuning can use (README, "Fine-tuning").
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 50
  return _cpu(config)


def tiny_2k() -> ml_collections.ConfigDict:
  """`tiny` for 2,000 steps, half of every batch's rows copy-task rows: the
  post-training trunk that reads the request (see the module docstring)."""
  config = tiny()
  config.num_train_steps = 2000
  config.eval_every = 500
  config.checkpoint_every = 250
  config.data.copy_fraction = 0.5
  config.data.copy_max_len = 32
  return config


def small() -> ml_collections.ConfigDict:
  config = _base()
  config.model = _model(d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                        mlp_dim=1408, **_TIED)
  _set_seq_len(config, 512)
  config.batch_size = 32
  config.num_train_steps = 10_000
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 500
  return _cpu(config)


def bench_cpu() -> ml_collections.ConfigDict:
  config = _base()
  config.model = _model(d_model=384, num_layers=6, num_heads=6, num_kv_heads=6, head_dim=64,
                        mlp_dim=1024)
  _set_seq_len(config, 256)
  config.batch_size = 16
  return _cpu(config)


def _llama(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Accelerator settings shared by the large presets."""
  config.model.dtype = 'bfloat16'
  config.model.param_dtype = 'float32'
  config.model.remat_policy = 'full'
  config.model.attention_impl = 'auto'   # splash on TPU, cudnn on GPU
  config.data.preset = 'files'
  config.optimizer.learning_rate = 3e-4
  config.optimizer.warmup_steps = 2000
  config.optimizer.weight_decay = 0.1
  config.optimizer.end_lr_factor = 0.1
  config.eval_every = 1000
  config.eval_steps = 50
  config.checkpoint_every = 1000
  config.log_every = 10
  config.mesh.update(dict(data=1, fsdp=-1, tensor=1))
  return config


def one_b() -> ml_collections.ConfigDict:
  config = _base()
  config.model = _model(vocab_size=32000, d_model=2048, num_layers=16, num_heads=32,
                        num_kv_heads=8, head_dim=64, mlp_dim=8192, rope_theta=500000.0,
                        norm_eps=1e-5)
  _set_seq_len(config, 2048)
  config.batch_size = 256
  config.num_train_steps = 100_000
  return _llama(config)


def seven_b() -> ml_collections.ConfigDict:
  config = _base()
  config.model = _model(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
                        num_kv_heads=32, head_dim=128, mlp_dim=11008, norm_eps=1e-5)
  _set_seq_len(config, 4096)
  config.batch_size = 256
  config.num_train_steps = 250_000
  return _llama(config)


PRESETS = {
    'tiny': tiny,
    'tiny_2k': tiny_2k,
    'small': small,
    'bench_cpu': bench_cpu,
    '1b': one_b,
    '7b': seven_b,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return overrides.build(arg, PRESETS, default_preset='tiny')


RULES: tuple[v.Rule, ...] = (
    ('seq_len', v.is_int(2), 'an int >= 2'),
    ('batch_size', v.is_int(1), 'an int >= 1'),
    ('num_train_steps', v.is_int(0), 'an int >= 0 (0: until num_epochs ends)'),
    ('num_epochs', v.optional(v.is_int(1)), 'None or an int >= 1'),
    ('eval_every', v.is_int(0), 'an int >= 0 (0: no evaluation during training)'),
    ('eval_steps', v.is_int(-1), 'an int >= -1 (0 or -1: the whole validation split)'),
    ('checkpoint_every', v.is_int(0), 'an int >= 0'),
    ('keep_checkpoints', v.is_int(1), 'an int >= 1'),
    ('patience', v.is_int(0), 'an int >= 0'),
    ('log_every', v.is_int(1), 'an int >= 1'),
    ('best_mode', lambda m: m in ('min', 'max'), "'min' or 'max'"),
    ('seed', v.is_int(), 'an int'),
    ('optimizer.learning_rate', v.is_number(0.0, low_open=True), 'a number > 0'),
    ('optimizer.warmup_steps', v.is_int(0), 'an int >= 0'),
    ('optimizer.end_lr_factor', v.is_number(0.0, 1.0), 'a number in [0, 1]'),
    ('optimizer.weight_decay', v.is_number(0.0), 'a number >= 0'),
    ('optimizer.b1', v.is_number(0.0, 1.0, high_open=True), 'a number in [0, 1)'),
    ('optimizer.b2', v.is_number(0.0, 1.0, high_open=True), 'a number in [0, 1)'),
    ('optimizer.eps', v.is_number(0.0, low_open=True), 'a number > 0'),
    ('optimizer.grad_clip_norm', v.is_number(0.0), 'a number >= 0 (0: no clipping)'),
    ('optimizer.grad_accum_steps', v.is_int(1), 'an int >= 1'),
    ('loss.z_loss', v.is_number(0.0), 'a number >= 0'),
)

COPY_RULES: tuple[v.Rule, ...] = (
    ('data.copy_fraction', v.is_number(0.0, 1.0), 'a number in [0, 1]'),
    ('data.copy_min_len', v.is_int(1), 'an int >= 1'),
    ('data.copy_max_len', v.is_int(1), 'an int >= 1'),
)


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks ranges and the combinations that would hang or silently misbehave."""
  missing = [k for k in ('model', 'data', 'seq_len', 'optimizer') if k not in config]
  if missing:
    raise UserError(f'This is not a pre-training config (no {", ".join(missing)}; preset '
                    f'{config.get("preset", "?")!r}): `python -m train` takes '
                    '--config=configs/pretrain.py:PRESET.')
  v.check(config, RULES)
  if config.seq_len > config.model.max_len:
    raise UserError(f'config key seq_len={config.seq_len} is longer than '
                    f'model.max_len={config.model.max_len}; raise model.max_len or lower '
                    'seq_len.')
  if config.num_train_steps == 0 and config.num_epochs is None:
    raise UserError('config key num_train_steps=0 means "until the data ends", but '
                    'num_epochs is not set and the data repeats forever: set '
                    '--config.num_epochs=N, or num_train_steps > 0.')
  if 'copy_fraction' in config.data:
    v.check(config, COPY_RULES)
    if config.data.copy_min_len > config.data.copy_max_len:
      raise UserError(f'config key data.copy_min_len={config.data.copy_min_len} is more than '
                      f'data.copy_max_len={config.data.copy_max_len}.')
  accum = config.optimizer.grad_accum_steps
  if config.batch_size % accum:
    raise UserError(f'config key batch_size={config.batch_size} is not a multiple of '
                    f'optimizer.grad_accum_steps={accum}.')
