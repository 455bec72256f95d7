"""Scores preference pairs or single responses with a reward-model run or a DPO run.

  python -m train.score --workdir=runs/rm --pairs=runs/pref_data/pairs_test.jsonl
  python -m train.score --workdir=runs/dpo --pairs=runs/pref_data/pairs_test.jsonl
  python -m train.score --workdir=runs/rm --responses=FILE.jsonl --output=OUT.jsonl

The score of a response is, for a reward-model run (`train.reward`), the
model's scalar at the response's last real token (its `<|end|>`); for a DPO
run (`train.dpo`), the implicit reward beta * (log pi(y|x) - log pi_ref(y|x))
summed over the response's tokens, with pi_ref the run's `init_from`.

`--pairs`: JSONL pairs or rankings in the formats of
data_pipeline/preferences.py (a preference data workdir's
`pairs_<split>.jsonl` is one). Prints JSON: pairwise accuracy (chosen scored
above rejected), per-kind accuracy when records have a `kind`, the mean
margin and the reward mean and spread, and the records skipped by reason;
`--output` also writes each pair with both scores.

`--responses`: JSONL records with a `prompt` (text or messages) and a
`response` (or `completion`); `--output` gets each record with `score` added.
Records are read with the chat template of the run; one that cannot be used
is skipped and counted. Nothing here generates or executes code.
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Any, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import cli
from data_pipeline import chat
from data_pipeline import preferences
from train import console
from train import losses
from train import mesh as mesh_lib
from train import objectives
from train import paths
from train import reward
from train import run_dir
from train import stage as stage_lib
from train import state as state_lib
from train import steps as steps_lib


class Scorer:
  """Scores rows of (tokens, response mask) with a reward-model or DPO run.

  `__call__(rows)` takes a list of (ids, mask) numpy pairs, each at most
  `length` long, and returns one float per row.
  """

  def __init__(self, workdir: str, step: int | None = None, batch_size: int = 16):
    config = run_dir.load_config(paths.resolve_str(workdir))
    self.kind = 'reward' if reward.is_reward_run(config) else 'dpo' if 'dpo' in config else None
    if self.kind is None:
      raise cli.UserError(f'{workdir} is neither a reward-model run (train.reward) nor a DPO '
                          'run (train.dpo): nothing to score with.')
    if self.kind == 'reward':
      config, model, params, tokenizer, mesh = reward.load_reward_model(workdir, step)
    else:
      config, model, params, tokenizer, mesh = run_dir.open_run(workdir, step)
      source = paths.resolve_str(config.init_from)
      if not os.path.exists(os.path.join(source, run_dir.CONFIG_FILE)):
        raise cli.UserError(f'The DPO run {workdir} started from init_from={config.init_from}, '
                            'its reference, which is not there any more.')
      abstract, _ = state_lib.abstract_state(config, model, mesh)
      _, self.reference = stage_lib.params_from_run(source, abstract.params)
    if tokenizer is None:
      raise cli.UserError(f'{workdir} has no tokenizer.model to render the records with.')
    self.config, self.model, self.params, self.tokenizer = config, model, params, tokenizer
    self.length = int(config.seq_len)
    self.batch_size = batch_size
    rules = mesh_lib.logical_rules(config.mesh)
    beta = float(config.dpo.beta) if self.kind == 'dpo' else 0.0

    def score(params, reference, batch):
      with steps_lib.sharding_context(mesh, rules):
        slots = jnp.arange(batch['tokens'].shape[0]) * batch['tokens'].shape[1] + 1
        if reference is None:
          score_BL = objectives.forward(model, params, batch, None, head='scalar')
          values_P, _ = losses.last_token_values(score_BL, batch['chosen_mask'],
                                                 batch['segment_ids'])
          return values_P[slots]
        policy_P, _ = objectives.response_log_probs(model, params, batch, None, 'tokens',
                                                    'chosen_mask')
        reference_P, _ = objectives.response_log_probs(model, reference, batch, None, 'tokens',
                                                       'chosen_mask')
        return beta * (policy_P - reference_P)[slots]

    self._score = jax.jit(score)

  def __call__(self, rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[float]:
    out = []
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      shape = (self.batch_size, self.length)
      batch = {k: np.zeros(shape, np.int32) for k in ('tokens', 'chosen_mask', 'segment_ids')}
      batch['positions'] = np.broadcast_to(np.arange(self.length, dtype=np.int32), shape).copy()
      for i, (ids, mask) in enumerate(chunk):
        batch['tokens'][i, :len(ids)] = ids
        batch['chosen_mask'][i, :len(ids)] = mask
        batch['segment_ids'][i, :len(ids)] = 1   # one sequence per row; padding is segment 0
      reference = getattr(self, 'reference', None)
      scores = jax.device_get(self._score(self.params, reference, batch))
      out.extend(float(s) for s in scores[:len(chunk)])
    return out


def _read_jsonl(path: str) -> list[tuple[int, Any]]:
  if not os.path.exists(path):
    raise cli.UserError(f'{path} does not exist.')
  records = []
  with open(path, 'rb') as f:
    for lineno, raw in enumerate(f, start=1):
      if raw.strip():
        records.append((lineno, raw))
  return records


def score_pairs(scorer: Scorer, path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(summary, per-pair results) of the pairs in `path` (see the module docstring)."""
  skipped: collections.Counter = collections.Counter()
  pairs, rows = [], []
  for lineno, raw in _read_jsonl(path):
    try:
      record = json.loads(raw.decode('utf-8'))
      found = preferences.record_pairs(record)
    except (UnicodeDecodeError, json.JSONDecodeError):
      skipped['bad_json'] += 1
      continue
    except chat.ChatFormatError as e:
      skipped[e.reason] += 1
      continue
    for pair in found:
      try:
        fields = preferences.render_pair(scorer.tokenizer, pair)
      except chat.ChatFormatError as e:
        skipped[e.reason] += 1
        continue
      if len(fields['tokens']) > scorer.length:
        skipped['too_long'] += 1
        continue
      pairs.append(dict(pair, id=record.get('id', f'{path}:{lineno}')))
      n_c = int(np.max(np.nonzero(fields['chosen_mask'])[0])) + 2
      n_r = int(np.max(np.nonzero(fields['rejected_mask'])[0])) + 2
      rows.append((fields['tokens'][:n_c], fields['chosen_mask'][:n_c]))
      rows.append((fields['rejected'][:n_r], fields['rejected_mask'][:n_r]))
  if not pairs:
    raise cli.UserError(f'No usable pair in {path} (skipped: {dict(skipped)}).')
  scores = scorer(rows)
  results = []
  for k, pair in enumerate(pairs):
    chosen, rejected = scores[2 * k], scores[2 * k + 1]
    results.append({'id': pair['id'], 'kind': pair.get('kind'), 'chosen_score': chosen,
                    'rejected_score': rejected, 'correct': chosen > rejected})
  summary = _summary(results, scores)
  summary.update(skipped=dict(sorted(skipped.items())), run_kind=scorer.kind, pairs_file=path)
  return summary, results


def _summary(results: list[dict[str, Any]], scores: list[float]) -> dict[str, Any]:
  accuracy = lambda rs: sum(r['correct'] for r in rs) / len(rs)
  by_kind = collections.defaultdict(list)
  for r in results:
    if r['kind']:
      by_kind[r['kind']].append(r)
  mean = sum(scores) / len(scores)
  return {
      'pairs': len(results),
      'accuracy': accuracy(results),
      'per_kind': {kind: {'pairs': len(rs), 'accuracy': accuracy(rs)}
                   for kind, rs in sorted(by_kind.items())},
      'margin_mean': sum(r['chosen_score'] - r['rejected_score'] for r in results) / len(results),
      'reward_mean': mean,
      'reward_std': math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores)),
  }


def score_responses(scorer: Scorer, path: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
  """Each usable record of `path` with `score` added, and the skipped ones by reason."""
  skipped: collections.Counter = collections.Counter()
  records, rows = [], []
  for _, raw in _read_jsonl(path):
    try:
      record = json.loads(raw.decode('utf-8'))
      if not isinstance(record, dict):
        raise chat.ChatFormatError('wrong_type', 'a record is a JSON object')
      answer = record.get('response', record.get('completion'))
      if 'prompt' not in record or answer is None:
        raise chat.ChatFormatError('missing_field', "needs 'prompt' and 'response'")
      prompt = preferences.parse_prompt(record['prompt'])
      answer, _ = preferences.parse_answer(answer, 'response', prompt)
      prompt_ids = chat.render_prompt(scorer.tokenizer, prompt)
      ids, mask = preferences.render_response(scorer.tokenizer, prompt_ids, prompt, answer)
    except (UnicodeDecodeError, json.JSONDecodeError):
      skipped['bad_json'] += 1
      continue
    except chat.ChatFormatError as e:
      skipped[e.reason] += 1
      continue
    if len(ids) > scorer.length:
      skipped['too_long'] += 1
      continue
    records.append(record)
    rows.append((ids, mask))
  for record, score in zip(records, scorer(rows) if rows else []):
    record['score'] = score
  return records, dict(sorted(skipped.items()))


FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'A reward-model or DPO run directory.')
  flags.DEFINE_string('pairs', None, 'JSONL preference pairs to score (accuracy).')
  flags.DEFINE_string('responses', None, 'JSONL prompt/response records to score one by one.')
  flags.DEFINE_string('output', None, 'JSONL output: the scored pairs or responses.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_integer('batch_size', 16, 'Rows per forward pass.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if bool(FLAGS.pairs) == bool(FLAGS.responses):
    raise cli.UserError('give exactly one of --pairs=FILE.jsonl and --responses=FILE.jsonl.')
  if FLAGS.responses and not FLAGS.output:
    raise cli.UserError('--responses needs --output=OUT.jsonl for the scores.')
  console.quiet_libraries()
  scorer = Scorer(FLAGS.workdir, FLAGS.step, FLAGS.batch_size)
  if FLAGS.pairs:
    summary, results = score_pairs(scorer, FLAGS.pairs)
    summary.update(workdir=FLAGS.workdir, step=int(scorer.config.checkpoint_step))
    lines = results
    print(json.dumps(summary, indent=2))
  else:
    lines, skipped = score_responses(scorer, FLAGS.responses)
    print(json.dumps({'workdir': FLAGS.workdir, 'run_kind': scorer.kind,
                      'scored': len(lines), 'skipped': skipped}, indent=2))
  if FLAGS.output:
    with open(FLAGS.output, 'w', encoding='utf-8') as f:
      for line in lines:
        f.write(json.dumps(line) + '\n')


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('workdir')
  cli.run(main)
