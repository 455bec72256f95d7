"""DPO: the policy learns from preference pairs directly, against a frozen reference.

  python -m train.dpo --config=configs/dpo.py:tiny --workdir=runs/dpo \\
      --config.init_from=runs/sft

The shared stage runner (train/stage.py) with the preference data of the
reward model (data_pipeline/preference_data.py). The policy starts from
`init_from` (an SFT run); the reference is the same weights, restored once
more and passed to every step as the frozen tree {'reference': params}
(never donated, never trained). With LoRA (`lora.rank > 0`) no copy is
loaded: the LoRA runner's frozen['base'] (the weights without adapters) is
the reference (`objectives.reference_params`).

Each pair's chosen and rejected rows are two forward passes of the policy
and two of the reference; log-probs are summed over each response's tokens
(its answer and `<|end|>`, never the prompt) and the loss is
train/losses.py `dpo`: sigmoid DPO with beta (cDPO with label smoothing), or
IPO. Metrics (train/ and eval/), as TRL names them: rewards_chosen,
rewards_rejected, rewards_margin, rewards_accuracy (the implicit reward
beta * log(pi / pi_ref) of chosen above rejected's), logps_chosen,
logps_rejected; in eval/ also accuracy/<kind> and count/<kind>, that
accuracy per kind of pair when the data has kinds. The best checkpoint has
the highest held-out rewards_accuracy. The run is an ordinary LM run:
generate and evaluate (`--functional`) read it as they read an SFT run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from configs import dpo as dpo_config
from configs.cli import UserError
from data_pipeline import preference_data
from data_pipeline import shards
from train import checkpoint as checkpoint_lib
from train import loop
from train import mesh as mesh_lib
from train import objectives
from train import paths
from train import reward
from train import run_files
from train import stage as stage_lib
from train import steps as steps_lib

REFERENCE_DATA = 'reference_data'
_DONE = 'DONE'


def reference(built: stage_lib.Built) -> tuple[dict[str, Any], dict[str, Any]]:
  """The frozen trees: {'reference': init_from's params}; {} under LoRA (the base serves)
  or with `dpo.precompute_reference` (the data carries the reference's log-probs)."""
  if built.lora is not None or built.config.dpo.precompute_reference:
    return {}, {}
  _, params = stage_lib.params_from_run(built.init_from, built.abstract_params)
  return {'reference': params}, {'reference': built.param_shardings}


def _source_key(built: stage_lib.Built) -> dict[str, Any]:
  """What the precomputed log-probs depend on: the pairs and the reference's weights."""
  config = built.config
  with open(os.path.join(shards.dataset_dir(config.data.workdir), 'dataset_info.json')) as f:
    info = json.load(f)
  reader = checkpoint_lib.Checkpointer(
      os.path.join(built.init_from, run_files.CHECKPOINT_DIR), read_only=True)
  try:
    step = reader.latest_step()
  finally:
    reader.close()
  return {'data': config.data.workdir, 'splits': info.get('splits'),
          'reference': built.init_from, 'reference_step': step,
          'model': {k: v for k, v in config.model.to_dict().items()
                    if k in stage_lib.RUNTIME_MODEL_KEYS and k != 'dropout_rate'}}


def precompute_reference(built: stage_lib.Built) -> str | None:
  """With `dpo.precompute_reference`: the pairs plus the reference's per-token log-probs.

  One pass of the reference (`init_from`'s params) over every split of
  `config.data.workdir`, a batch of whole pairs at a time; each pair's
  chosen and rejected per-token log-probs (objectives.response_token_log_probs,
  which do not depend on packing) become two more aligned fields
  (objectives.REFERENCE_FIELDS) of a copy of the dataset in
  `<workdir>/reference_data`, which the run then trains and evaluates on. It
  is made once and reused while the data, the reference and its checkpoint
  step are the same. Returns None when the option is off.
  """
  config = built.config
  if not config.dpo.precompute_reference:
    return None
  if jax.process_count() > 1:
    raise UserError('config key dpo.precompute_reference=True runs on one process for now; '
                    'set it to False on a multi-host slice (the reference is then held in '
                    'memory and run at every step).')
  if paths.is_remote(built.workdir):
    raise UserError(f'config key dpo.precompute_reference=True writes the reference data in '
                    f'the run directory, which must be local (got {built.workdir}).')
  out_dir = os.path.join(built.workdir, REFERENCE_DATA)
  key = _source_key(built)
  done = os.path.join(out_dir, _DONE)
  if os.path.exists(done):
    with open(done) as f:
      if json.load(f) == key:
        print(f'Reference log-probs: {out_dir} (made earlier).', flush=True)
        return out_dir
  start = time.perf_counter()
  shutil.rmtree(out_dir, ignore_errors=True)
  _, params = stage_lib.params_from_run(built.init_from, built.abstract_params)
  model, seq_len, batch_size = built.model, config.seq_len, config.batch_size
  rules = mesh_lib.logical_rules(config.mesh)
  sharding = mesh_lib.batch_sharding(built.mesh, rules)

  @jax.jit
  def log_probs(params, batch):
    with steps_lib.sharding_context(built.mesh, rules):
      return tuple(objectives.response_token_log_probs(model, params, batch, None, tokens,
                                                       mask)[0]
                   for tokens, mask in (('tokens', 'chosen_mask'), ('rejected', 'rejected_mask')))

  framing, fields = shards.layout(config.data.workdir)
  splits, counts = {}, {}
  sources = {split: shards.data_source(config.data.workdir, split)
             for split in shards.split_names(config.data.workdir)}
  total = sum(len(source) for source in sources.values())
  print(f'Reference log-probs of {total} pairs ({", ".join(sources)}), '
        f'{batch_size} at a time...', flush=True)
  done_pairs, next_report = 0, 0.1
  for split, source in sources.items():
    records = []
    for first in range(0, len(source), batch_size):
      if done_pairs >= next_report * total:
        print(f'  {done_pairs}/{total} pairs, {time.perf_counter() - start:.0f} s', flush=True)
        next_report += 0.1
      done_pairs += min(batch_size, len(source) - first)
      docs = [source[i] for i in range(first, min(first + batch_size, len(source)))]
      batch = {name: np.zeros((batch_size, seq_len), np.int32)
               for name in ('tokens', 'segment_ids', 'positions') + fields}
      for row, doc in enumerate(docs):
        length = len(doc['tokens'])
        for name in ('tokens',) + fields:
          batch[name][row, :length] = doc[name]
        batch['segment_ids'][row, :length] = 1
        batch['positions'][row, :length] = np.arange(length)
      chosen, rejected = jax.device_get(log_probs(params, jax.device_put(batch, sharding)))
      for row, doc in enumerate(docs):
        length = len(doc['tokens'])
        record = {name: np.asarray(doc[name]) for name in ('tokens',) + fields}
        doc_id = doc['id']
        record.update(id=doc_id.decode() if isinstance(doc_id, bytes) else str(doc_id),
                      num_bytes=int(doc['num_bytes']))
        for name, values in zip(objectives.REFERENCE_FIELDS, (chosen, rejected)):
          record[name] = np.asarray(values[row, :length], np.float32).view(np.int32)
        records.append(record)
    splits[split], counts[split] = records, len(records)
  del params
  shards.write_dataset(out_dir, splits, fields=fields + objectives.REFERENCE_FIELDS,
                       framing=framing)
  with open(done, 'w') as f:
    json.dump(key, f)
  print(f'Reference log-probs of {", ".join(f"{n} {s}" for s, n in counts.items())} pairs '
        f'in {time.perf_counter() - start:.0f} s: {out_dir}', flush=True)
  return out_dir


def _loss(config: ml_collections.ConfigDict, model: Any, dropout: bool,
          kinds: tuple[str, ...] = ()) -> objectives.LossFn:
  return objectives.dpo(model, beta=float(config.dpo.beta),
                        label_smoothing=float(config.dpo.label_smoothing),
                        loss_type=config.dpo.loss_type, dropout=dropout, kinds=kinds)


def _eval_loss(config: ml_collections.ConfigDict, model: Any) -> objectives.LossFn:
  """The loss without dropout, and the implicit reward's accuracy per kind of pair."""
  return _loss(config, model, False, preference_data.kind_names(config.data.workdir))


STAGE = stage_lib.Stage(
    name='dpo', validate=dpo_config.validate, prepare_data=reward.prepare_data,
    loss=lambda config, model: _loss(config, model, float(config.model.dropout_rate) > 0.0),
    eval_loss=_eval_loss, frozen=reference,
    derive_data=precompute_reference)


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.LoopResult:
  """Trains the policy with DPO per `config` in `workdir`, resuming from its latest checkpoint."""
  return stage_lib.run(STAGE, config, workdir)


main = stage_lib.entry_point(train)


if __name__ == '__main__':
  stage_lib.run_command_line(main, 'DPO config file and preset, e.g. configs/dpo.py:tiny.')
