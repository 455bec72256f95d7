"""RL from feedback: PPO and GRPO, each iteration a rollout batch and its updates.

  python -m train.rl --config=configs/rl.py:grpo_tiny --workdir=runs/grpo \\
      --config.init_from=runs/sft --config.reward.function=parses_and_names
  python -m train.rl --config=configs/rl.py:ppo_tiny --workdir=runs/ppo \\
      --config.init_from=runs/sft --config.reward.model=runs/rm

How it sits in the one loop (train/loop.py, unchanged). The loop calls
`train_step(state, batch)` on batches from an iterator with
`get_state`/`set_state`, checkpoints the state and the iterator's position,
logs the metrics the step returns and stops on a non-finite loss. For RL:

  * the iterator is a `rollouts.PromptStream`: a batch is the iteration's
    prompts (each repeated `group_size` times), its position is saved with
    every checkpoint;
  * `train_step` is an `Iteration`: it samples completions with the current
    policy (model/decode.py, on the training mesh, params in place), scores
    them (a registered reward function or a reward model), computes the
    reference log-probs, advantages (GRPO: group-relative; PPO: GAE over
    per-token rewards with the value model), then runs one jitted update
    (`rl.epochs` passes of `rl.minibatches` minibatches, a `lax.scan`) and
    returns the new state and the iteration's metrics;
  * the state is an `RLState`: the policy under `params` (so
    `train.generate`, `train.evaluate` and a next stage's `init_from` read an
    RL run like any other), its optimizer state, the value model and its
    optimizer state (PPO), the step (= iterations done) and the rng. The
    rollout and minibatch rngs are `fold_in(rng, step)`, so a resumed run
    repeats the uninterrupted one bit for bit.

Frozen trees: the reference policy (the starting parameters; skipped when
beta = 0) and the reward model; never donated, never updated. The generation
is host-synchronous (the reward needs the text), so the iteration is timed
exactly: `perf/generation_share` is the part of it spent sampling.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Mapping, Sequence

from etils import epath
import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import cli
from configs import rl as rl_config
from data_pipeline import chat
from data_pipeline import sft_data
from data_pipeline import tokenizer as tokenizer_lib
from model import transformer
from train import checkpoint as checkpoint_lib
from train import loop
from train import losses
from train import mesh as mesh_lib
from train import optimizer as optimizer_lib
from train import paths
from train import rewards as rewards_lib
from train import rollouts
from train import run_files
from train import stage as stage_lib
from train import state as state_lib
from train import steps as steps_lib

# score(host rollout) -> rewards [B]: the host rollout holds 'tokens_BN',
# 'mask_BN', 'done_B', 'index_B' (numpy).
ScoreFn = Callable[[Mapping[str, np.ndarray]], np.ndarray]


class RLState(struct.PyTreeNode):
  """What an RL iteration changes; `params` is the policy (a plain LM tree)."""
  step: jax.Array            # int32: iterations done
  params: Any
  opt_state: Any
  rng: jax.Array             # raw uint32 key; iteration k uses fold_in(rng, k)
  value_params: Any = None   # PPO: trunk + score_head
  value_opt_state: Any = None


# ------------------------------------------------------------------ the state

def _value_shardings(tx, abstract_opt, param_shardings, mesh):
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                               transform_non_params=lambda _: mesh_lib.replicated(mesh))


def abstract_rl_state(config, model, mesh, tx) -> tuple[RLState, RLState]:
  """(abstract RLState with shardings, shardings); the policy's part is the training state's."""
  policy, policy_shardings = state_lib.abstract_state(config, model, mesh)
  value, value_sh, value_opt, value_opt_sh = None, None, None, None
  if config.algorithm == 'ppo':
    value = rewards_lib.scalar_abstract_params(model, mesh, mesh_lib.logical_rules(config.mesh))
    value_sh = jax.tree.map(lambda s: s.sharding, value)
    shapes = jax.eval_shape(tx.init, value)
    value_opt_sh = _value_shardings(tx, shapes, value_sh, mesh)
    value_opt = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             shapes, value_opt_sh)
  abstract = RLState(step=policy.step, params=policy.params, opt_state=policy.opt_state,
                     rng=policy.rng, value_params=value, value_opt_state=value_opt)
  shardings = RLState(step=policy_shardings.step, params=policy_shardings.params,
                      opt_state=policy_shardings.opt_state, rng=policy_shardings.rng,
                      value_params=value_sh, value_opt_state=value_opt_sh)
  return abstract, shardings


def _copy(tree: Any, shardings: Any) -> Any:
  """A fresh copy of `tree` in its own buffers (so donating one never frees the other)."""
  return jax.jit(lambda t: jax.tree.map(lambda x: x + jnp.zeros((), x.dtype), t),
                 out_shardings=shardings)(tree)


def initial_policy(config, model, mesh, abstract_params, init_from: str | None) -> Any:
  """The starting policy: `init_from`'s parameters, else a fresh init from `config.seed`."""
  if init_from:
    step, params = stage_lib.params_from_run(init_from, abstract_params)
    print(f'Initialised the policy from {init_from} (step {step}).', flush=True)
    return params
  return state_lib.create_sharded_state(config, model, mesh, jax.random.key(config.seed))[0].params


def initial_value(config, model, policy_params, value_abstract, reward_params) -> Any:
  """PPO's value model: the reward model's params, or the policy's trunk + a fresh scalar head."""
  shardings = jax.tree.map(lambda s: s.sharding, value_abstract)
  if config.ppo.value_init == 'reward':
    if jax.tree.structure(reward_params) != jax.tree.structure(value_abstract) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(reward_params),
                                           jax.tree.leaves(value_abstract))):
      raise cli.UserError(f'ppo.value_init=reward: the reward model {config.reward.model} has '
                          'another shape than the policy; use --config.ppo.value_init=policy.')
    return _copy(reward_params, shardings)
  tokens = jnp.zeros((1, 8), jnp.int32)
  fresh = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, tokens, head='scalar')['params']),
                  out_shardings=shardings)(jax.random.key(config.seed + 1))
  fresh = dict(fresh)
  for key in fresh:
    if key != 'score_head':
      fresh[key] = policy_params[key]
  return _copy(fresh, shardings)


# ----------------------------------------------------------------- the update

def _grpo_loss(config, model):
  aggregation = config.grpo.aggregation
  beta = float(config.rl.beta)

  def loss_fn(params, value_params, mb):
    del value_params
    logp_BN, _ = rollouts.token_logprobs(model, params, mb, mb['targets'])
    total, aux = losses.grpo_loss(
        logp_BN, mb['old_logp'], mb.get('ref_logp'), mb['advantages'], mb['loss_mask'],
        clip_eps=float(config.rl.clip_eps), clip_eps_high=config.rl.clip_eps_high, beta=beta,
        aggregation=aggregation)
    count = jnp.maximum(aux.pop('count'), 1.0)
    metrics = {k: v / count for k, v in aux.items()}
    return total / count, metrics
  return loss_fn


def _ppo_loss(config, model):
  cfg = config.ppo

  def loss_fn(params, value_params, mb):
    mask_BN = mb['loss_mask']
    logp_BN, entropy_BN = rollouts.token_logprobs(model, params, mb, mb['targets'],
                                                  with_entropy=True)
    values_BN = rollouts.state_values(model, value_params, mb)
    policy = losses.clipped_surrogate(logp_BN, mb['old_logp'], mb['advantages'],
                                      clip_eps=float(config.rl.clip_eps),
                                      clip_eps_high=config.rl.clip_eps_high)
    value = losses.clipped_value_loss(values_BN, mb['old_values'], mb['returns'],
                                      clip=float(cfg.value_clip))
    sums = {name: losses.aggregate(x_BN, mask_BN)[0] for name, x_BN in (
        ('policy_loss', policy['loss']), ('clip_fraction', policy['clipped']),
        ('approx_kl', policy['approx_kl']), ('value_loss', value['loss']),
        ('value_clip_fraction', value['clipped']), ('entropy', entropy_BN))}
    count = jnp.maximum(jnp.sum(mask_BN), 1.0)
    total = (sums['policy_loss'] + float(cfg.vf_coef) * sums['value_loss']
             - float(cfg.entropy_coef) * sums['entropy'])
    return total / count, {k: v / count for k, v in sums.items()}
  return loss_fn


def make_update(config, model, mesh, tx, shardings: RLState):
  """The jitted update: `rl.epochs` shuffled passes of `rl.minibatches` minibatches.

  update(state, batch) -> (state with step + 1, mean metrics); the state is donated.
  """
  rules = mesh_lib.logical_rules(config.mesh)
  loss_fn = _ppo_loss(config, model) if config.algorithm == 'ppo' else _grpo_loss(config, model)
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
  epochs, minibatches = int(config.rl.epochs), int(config.rl.minibatches)
  is_ppo = config.algorithm == 'ppo'

  def update(state: RLState, batch: Mapping[str, jax.Array]):
    with steps_lib.sharding_context(mesh, rules):
      rows = batch['targets'].shape[0]
      rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)
      order = jnp.stack([jax.random.permutation(jax.random.fold_in(rng, e), rows)
                         for e in range(epochs)])
      order = order.reshape(epochs * minibatches, rows // minibatches)

      def body(carry, index):
        params, opt_state, value_params, value_opt_state = carry
        mb = jax.tree.map(lambda x: x[index], batch)
        (loss, metrics), (grads, value_grads) = grad_fn(params, value_params, mb)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
        if is_ppo:
          updates, value_opt_state = tx.update(value_grads, value_opt_state, value_params)
          value_params = optax.apply_updates(value_params, updates)
          metrics['value_grad_norm'] = optax.global_norm(value_grads)
        return (params, opt_state, value_params, value_opt_state), metrics

      carry = (state.params, state.opt_state, state.value_params, state.value_opt_state)
      (params, opt_state, value_params, value_opt_state), metrics = jax.lax.scan(
          body, carry, order)
      new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                value_params=value_params, value_opt_state=value_opt_state)
      return new_state, {f'train/{k}': jnp.mean(v) for k, v in metrics.items()}

  # Compiled like the other stages' train steps (on CPU: no library fusions).
  return jax.jit(update, out_shardings=(shardings, mesh_lib.replicated(mesh)),
                 donate_argnums=(0,), compiler_options=steps_lib.compiler_options(mesh))


# ----------------------------------------------------------- advantages (PPO)

def ppo_advantages(config, values_BN, old_logp_BN, ref_logp_BN, scores_B, mask_BN):
  """Per-token rewards (score at the last token - beta * KL) -> GAE, whitened.

  Returns (advantages_BN, returns_BN, kl_BN).
  """
  m_BN = mask_BN.astype(jnp.float32)
  if ref_logp_BN is None:
    kl_BN = jnp.zeros_like(old_logp_BN)
  else:
    kl_BN = losses.kl_estimate(old_logp_BN, ref_logp_BN, config.rl.kl_estimator) * m_BN
  last_BN = m_BN * (1.0 - jnp.concatenate([m_BN[:, 1:], jnp.zeros_like(m_BN[:, :1])], axis=1))
  rewards_BN = -float(config.rl.beta) * kl_BN + scores_B[:, None] * last_BN
  advantages_BN, returns_BN = losses.gae(rewards_BN, values_BN, m_BN,
                                         gamma=float(config.ppo.gamma), lam=float(config.ppo.lam))
  if config.ppo.whiten_advantages:
    advantages_BN = losses.whiten(advantages_BN, m_BN)
  return advantages_BN, returns_BN, kl_BN


def explained_variance(values_BN, returns_BN, mask_BN) -> jax.Array:
  """1 - Var(returns - values) / Var(returns) over the masked-in tokens."""
  def var(x):
    mean = losses.masked_mean(x, mask_BN)
    return losses.masked_mean(jnp.square(x - mean), mask_BN)
  return 1.0 - var(returns_BN - values_BN) / jnp.maximum(var(returns_BN), 1e-8)


# --------------------------------------------------------------- an iteration

@dataclasses.dataclass
class Iteration:
  """`train_step(state, prompts) -> (state, metrics)`: one rollout batch and its updates."""
  config: ml_collections.ConfigDict
  model: transformer.Transformer
  mesh: jax.sharding.Mesh
  update: Callable[..., Any]
  score: ScoreFn | None            # host rewards, or None with a reward model
  reference: Any                   # frozen policy params, or None (beta == 0)
  reward_model: tuple[Any, Any] | None   # (model, params) or None
  stop_ids: tuple[int, ...]
  pad_id: int

  def __post_init__(self):
    rules = mesh_lib.logical_rules(self.config.mesh)
    self.rules = rules
    model = self.model

    def under_mesh(fn):
      @functools.wraps(fn)
      def wrapped(*args):
        with steps_lib.sharding_context(self.mesh, rules):
          return fn(*args)
      return jax.jit(wrapped, compiler_options=steps_lib.compiler_options(self.mesh))

    self._rows = jax.jit(functools.partial(rollouts.make_rows, pad_id=self.pad_id))
    self._logprobs = under_mesh(lambda p, rows, t: rollouts.token_logprobs(model, p, rows, t)[0])
    self._values = under_mesh(lambda p, rows: rollouts.state_values(model, p, rows))
    if self.reward_model is not None:
      rm_model = self.reward_model[0]
      self._rm_scores = under_mesh(
          lambda p, rows: rewards_lib.last_token_scores(rm_model, p, rows, rows['last_positions']))
    self._ppo = jax.jit(functools.partial(ppo_advantages, self.config))
    self._explained = jax.jit(explained_variance)
    self._groups = jax.jit(functools.partial(
        losses.group_advantages, group_size=int(self.config.rollout.group_size),
        normalize=self.config.grpo.normalize))

  def __call__(self, state: RLState, batch: Mapping[str, np.ndarray]):
    cfg, ro = self.config, self.config.rollout
    start = time.perf_counter()
    gen_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)
    out = rollouts.sample(self.model, state.params, batch['prompt_BP'], batch['lengths_B'],
                          gen_rng, max_new_tokens=int(ro.max_new_tokens),
                          temperature=float(ro.temperature), top_k=int(ro.top_k),
                          top_p=float(ro.top_p), stop_ids=self.stop_ids, pad_id=self.pad_id,
                          mesh=self.mesh, rules=self.rules)
    jax.block_until_ready(out.tokens)
    generation_seconds = time.perf_counter() - start
    rows = self._rows(jnp.asarray(batch['prompt_BP']), jnp.asarray(batch['lengths_B']),
                      out.tokens, out.mask)
    done_B = np.asarray(jax.device_get(out.done))
    truncated_B = ~done_B
    if self.reward_model is not None:
      scores_B = np.asarray(jax.device_get(self._rm_scores(self.reward_model[1], rows)))
    else:
      tokens_BN, mask_BN = jax.device_get((out.tokens, out.mask))
      scores_B = np.asarray(self.score({'tokens_BN': tokens_BN, 'mask_BN': mask_BN,
                                        'done_B': done_B, 'index_B': batch['index_B']}),
                            np.float32)
    rewards_B = scores_B.astype(np.float32)
    if ro.truncation == 'penalty':
      rewards_B = rewards_B - float(ro.truncation_penalty) * truncated_B
    mask_BN = out.mask.astype(jnp.float32)
    loss_mask_BN = mask_BN
    if ro.truncation == 'mask':
      loss_mask_BN = mask_BN * jnp.asarray(done_B, jnp.float32)[:, None]

    update_batch = {'tokens': rows['tokens'], 'segment_ids': rows['segment_ids'],
                    'positions': rows['positions'],
                    'response_positions': rows['response_positions'],
                    'targets': out.tokens, 'old_logp': out.logprobs, 'loss_mask': loss_mask_BN}
    ref_logp_BN = None
    if self.reference is not None:
      ref_logp_BN = self._logprobs(self.reference, rows, out.tokens)
      update_batch['ref_logp'] = ref_logp_BN
    metrics: dict[str, Any] = {}
    rewards_dev = jnp.asarray(rewards_B)
    if cfg.algorithm == 'ppo':
      values_BN = self._values(state.value_params, rows)
      advantages_BN, returns_BN, _ = self._ppo(values_BN, out.logprobs, ref_logp_BN,
                                               rewards_dev, loss_mask_BN)
      update_batch.update(advantages=advantages_BN, returns=returns_BN, old_values=values_BN)
      metrics['train/explained_variance'] = self._explained(values_BN, returns_BN, loss_mask_BN)
    else:
      update_batch['advantages'] = self._groups(rewards_dev)
      groups = rewards_B.reshape(-1, int(ro.group_size))
      metrics['rl/zero_std_groups'] = float(np.mean(groups.max(1) == groups.min(1)))
    state, update_metrics = self.update(state, update_batch)
    metrics.update(update_metrics)
    jax.block_until_ready(state.step)
    seconds = time.perf_counter() - start

    lengths_B = np.asarray(jax.device_get(out.lengths))
    if ref_logp_BN is not None:
      # KL(policy || reference) of the sampled completions, per token and per sequence (k1).
      kl_BN = np.asarray(jax.device_get((out.logprobs - ref_logp_BN) * mask_BN))
      metrics['rl/kl_per_token'] = float(kl_BN.sum() / max(lengths_B.sum(), 1))
      metrics['rl/kl_per_sequence'] = float(kl_BN.sum(1).mean())
    metrics.update({
        'rl/reward_mean': float(rewards_B.mean()), 'rl/reward_std': float(rewards_B.std()),
        'rl/score_mean': float(scores_B.mean()),
        'rl/response_length': float(lengths_B.mean()),
        'rl/truncation_rate': float(truncated_B.mean()),
        'perf/generation_seconds': generation_seconds,
        'perf/iteration_seconds': seconds,
        'perf/generation_share': generation_seconds / seconds,
        'perf/generated_tokens_per_sec': float(lengths_B.sum()) / generation_seconds,
    })
    return state, metrics


# ------------------------------------------------------------------ the prompts

def load_prompts(config, tokenizer) -> tuple[list[dict[str, Any]], list[list[int]]]:
  """The `rollout.split` prompts that fit `rollout.max_prompt_len`, rendered; skips counted."""
  records = sft_data.read_prompts(config.data.workdir, config.rollout.split)
  kept, encoded = [], []
  for record in records:
    ids = chat.render_prompt(tokenizer, record['messages']).tolist()
    if len(ids) <= config.rollout.max_prompt_len:
      kept.append(record)
      encoded.append(ids)
  skipped = len(records) - len(kept)
  if skipped:
    print(f'Skipped {skipped} of {len(records)} {config.rollout.split} prompts longer than '
          f'rollout.max_prompt_len={config.rollout.max_prompt_len} tokens.', flush=True)
  if len(kept) < config.rollout.prompts_per_iteration:
    raise cli.UserError(f'Only {len(kept)} {config.rollout.split} prompts in '
                        f'{config.data.workdir} fit rollout.max_prompt_len; fewer than '
                        f'rollout.prompts_per_iteration={config.rollout.prompts_per_iteration}.')
  return kept, encoded


def text_score(config, tokenizer, examples: Sequence[Mapping[str, Any]]) -> ScoreFn:
  """The registered `reward.function` over each rollout's decoded completion."""
  fn = rewards_lib.get(config.reward.function, config.reward)

  def score(rollout: Mapping[str, np.ndarray]) -> np.ndarray:
    texts = rollouts.completion_texts(tokenizer, rollout['tokens_BN'], rollout['mask_BN'])
    out = []
    for text, index in zip(texts, rollout['index_B']):
      example = examples[int(index)]
      out.append(fn(example['messages'][-1]['content'], text, example))
    return np.asarray(out, np.float32)
  return score


# --------------------------------------------------------------------- the run

def train(config: ml_collections.ConfigDict, workdir: str, *,
          score: ScoreFn | None = None) -> loop.LoopResult:
  """Runs RL per `config` in `workdir`, resuming from its latest checkpoint.

  `score` replaces the configured reward (tests use a reward over token ids).
  """
  rl_config.validate(config)
  workdir = run_files.check_workdir(workdir, config.data.workdir)
  with config.unlocked():
    config.data.workdir = paths.resolve_str(config.data.workdir)
    config.num_epochs = None
  tokenizer_bytes, tokenizer_source = run_files.read_tokenizer(config)
  if tokenizer_bytes is None:
    raise cli.UserError(f'data.workdir={config.data.workdir} has no tokenizer.model: give an '
                        'SFT data workdir (built by python -m train.sft).')
  init_from = stage_lib.adopt_init_from(config, tokenizer_bytes)
  rl_config.validate(config)   # again: init_from may have changed model.max_len
  model_cfg = stage_lib.model_config(config)
  fingerprint = run_files.data_fingerprint(config.data.workdir, tokenizer_bytes)
  if run_files.has_checkpoint(workdir):
    run_files.check_same_data(workdir, fingerprint)
  tokenizer = tokenizer_lib.Tokenizer.from_bytes(tokenizer_bytes, tokenizer_source)
  examples, encoded = load_prompts(config, tokenizer)

  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.logical_rules(config.mesh)
  model = transformer.Transformer(model_cfg)
  iterations = int(config.num_train_steps)
  updates = iterations * int(config.rl.epochs) * int(config.rl.minibatches)
  tx, _ = optimizer_lib.make_optimizer(config.optimizer, updates)
  abstract, shardings = abstract_rl_state(config, model, mesh, tx)

  reward_model = None
  if config.reward.model:
    rm_model, rm_params = rewards_lib.load_reward_model(config.reward.model, mesh, rules)
    rm_tokenizer = epath.Path(paths.resolve_str(config.reward.model)) / run_files.TOKENIZER_FILE
    if rm_tokenizer.exists() and rm_tokenizer.read_bytes() != tokenizer_bytes:
      raise cli.UserError(f'reward.model={config.reward.model} was trained with another '
                          'tokenizer than this data\'s.')
    reward_model = (rm_model, rm_params)
  elif score is None:
    score = text_score(config, tokenizer, examples)

  # The starting policy: the frozen reference, and (copied) the first state.
  start_params = initial_policy(config, model, mesh, abstract.params, init_from)
  reference = start_params if float(config.rl.beta) > 0 else None

  def init_state() -> RLState:
    params = _copy(start_params, shardings.params)
    value_params = value_opt = None
    if config.algorithm == 'ppo':
      value_params = initial_value(config, model, params, abstract.value_params,
                                   reward_model[1] if reward_model else None)
      value_opt = jax.jit(tx.init, out_shardings=shardings.value_opt_state)(value_params)
    rng = np.asarray(jax.device_get(jax.random.key_data(jax.random.key(config.seed))))
    return RLState(step=jnp.zeros((), jnp.int32), params=params,
                   opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
                   rng=jax.device_put(jax.random.split(rng)[1], shardings.rng),
                   value_params=value_params, value_opt_state=value_opt)

  iteration = Iteration(config=config, model=model, mesh=mesh,
                        update=make_update(config, model, mesh, tx, shardings), score=score,
                        reference=reference, reward_model=reward_model,
                        stop_ids=chat.stop_ids(tokenizer), pad_id=tokenizer.pad_id)
  stream = rollouts.PromptStream(
      encoded, prompts_per_batch=int(config.rollout.prompts_per_iteration),
      group_size=int(config.rollout.group_size), width=int(config.rollout.max_prompt_len),
      pad_id=tokenizer.pad_id, seed=int(config.seed))
  loop_cfg = dataclasses.replace(loop.LoopConfig.from_config(config), num_train_steps=iterations)
  checkpointer = checkpoint_lib.Checkpointer(
      os.fspath(epath.Path(workdir) / run_files.CHECKPOINT_DIR), keep=config.keep_checkpoints)
  try:
    return loop.run(
        workdir=workdir, loop_cfg=loop_cfg, train_step=iteration, train_loader=stream,
        to_global=lambda batch: batch, checkpointer=checkpointer, init_state=init_state,
        abstract_state=abstract, evaluate=None,
        startup_metrics={'model/num_params': sum(x.size for x in jax.tree.leaves(abstract.params)),
                         'rl/num_prompts': len(encoded)},
        on_ready=lambda: run_files.record_start(config, workdir,
                                                (tokenizer_bytes, tokenizer_source), fingerprint))
  finally:
    checkpointer.close()


main = stage_lib.entry_point(train)


if __name__ == '__main__':
  stage_lib.run_command_line(main, 'RL config file and preset, e.g. configs/rl.py:grpo_tiny.')
