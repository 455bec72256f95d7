"""One table over the post-training stages: loss, parse_and_name_rate, RM score, KL to SFT.

  python -m train.posttrain --runs=sft=runs/sft,dpo=runs/dpo,ppo=runs/ppo,grpo=runs/grpo \\
      --reference=runs/sft --reward_model=runs/rm --split=test

Every row is measured on the same held-out data: `--split` of the SFT data
workdir `--data_dir`, by default the `--reference` run's data (else the first
run's). A DPO run's own data is preference pairs, an RL run's only prompts,
so neither is used for its row. On that split's prompts (prompts_<split>.jsonl;
generated code is parsed, never run):

  response_loss        the held-out response loss (train.evaluate's loss on
                       the SFT data's split);
  parse_and_name_rate  greedy answers that parse and define the requested
                       function (parse_rate beside it);
  rm_score             the reward model's mean score of those greedy answers,
                       read at each answer's last token (empty without
                       --reward_model);
  kl_to_reference      KL(run || reference) in nats per answer, estimated on
                       one answer per prompt sampled from the run at
                       temperature 1: mean over prompts of
                       sum_t log pi(y_t) - log pi_ref(y_t).

Prints a Markdown table, and the rows as JSON with --output.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import cli
from data_pipeline import chat
from data_pipeline import sft_data
from model import decode
from train import code_checks
from train import console
from train import evaluate as evaluate_lib
from train import mesh as mesh_lib
from train import rewards as rewards_lib
from train import rollouts
from train import run_dir

FLAGS = flags.FLAGS


def _parse_runs(text: str) -> list[tuple[str, str]]:
  runs = []
  for item in text.split(','):
    if '=' not in item:
      raise cli.UserError(f'--runs: {item!r} is not NAME=WORKDIR')
    name, workdir = item.split('=', 1)
    runs.append((name.strip(), workdir.strip()))
  return runs


def _generate(model, params, prompts, tokenizer, mesh, rules, *, max_new_tokens, greedy, seed):
  prompt_BP, lengths_B = decode.pad_prompts(prompts, tokenizer.pad_id, multiple=16)
  out = decode.generate(model, params, prompt_BP, lengths_B, max_new_tokens=max_new_tokens,
                        rng=jax.random.key(seed), greedy=greedy, temperature=1.0,
                        eos_id=chat.stop_ids(tokenizer), pad_id=tokenizer.pad_id, mesh=mesh,
                        rules=rules)
  rows = rollouts.make_rows(jnp.asarray(prompt_BP), jnp.asarray(lengths_B), out.tokens, out.mask,
                            pad_id=tokenizer.pad_id)
  return out, rows


def held_out_data(runs: Sequence[tuple[str, str]], reference: str | None,
                  data_dir: str | None) -> str:
  """The SFT data workdir every row is measured on: `data_dir`, else the reference
  run's (the SFT run the others started from), else the first run's."""
  if data_dir:
    return data_dir
  return run_dir.load_config(reference or runs[0][1]).data.workdir


def stage_row(workdir: str, reference, reward_model, *, data_dir: str, split: str,
              max_new_tokens: int, limit: int | None) -> dict[str, Any]:
  config, model, params, tokenizer, mesh = run_dir.open_run(workdir)
  rules = mesh_lib.logical_rules(config.mesh)
  records = [p for p in sft_data.read_prompts(data_dir, split) if p.get('function_name')]
  if not records:
    raise cli.UserError(f'{data_dir} has no {split} instruction with a function name to '
                        'check; give --data_dir an SFT data workdir of the embedded default.')
  records = records[:limit] if limit else records
  loss = evaluate_lib.evaluate_split(config, model, params, mesh, data_dir=data_dir, split=split,
                                     progress=False)['loss']
  prompts = [chat.render_prompt(tokenizer, r['messages']).tolist() for r in records]
  new = min(max_new_tokens, model.config.max_len - max(len(p) for p in prompts) - 16)
  out, rows = _generate(model, params, prompts, tokenizer, mesh, rules, max_new_tokens=new,
                        greedy=True, seed=0)
  texts = rollouts.completion_texts(tokenizer, np.asarray(out.tokens), np.asarray(out.mask))
  checks = [code_checks.check_completion(t, r['function_name']) for t, r in zip(texts, records)]
  row = {'response_loss': loss,
         'parse_rate': float(np.mean([c.parses for c in checks])),
         'parse_and_name_rate': float(np.mean([c.defines_name for c in checks])),
         'rm_score': None, 'kl_to_reference': None}
  if reward_model is not None:
    rm_model, rm_params = reward_model
    row['rm_score'] = float(jnp.mean(rewards_lib.last_token_scores(
        rm_model, rm_params, rows, rows['last_positions'])))
  if reference is not None:
    out, rows = _generate(model, params, prompts, tokenizer, mesh, rules, max_new_tokens=new,
                          greedy=False, seed=1)
    ref_logp, _ = rollouts.token_logprobs(model, reference, rows, out.tokens)
    kl_BN = (out.logprobs - ref_logp) * out.mask
    row['kl_to_reference'] = float(jnp.mean(jnp.sum(kl_BN, axis=1)))
  return row


def table(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
  def fmt(value, digits):
    return '' if value is None else f'{value:.{digits}f}'
  lines = ['| stage | response loss | parse_rate | parse_and_name_rate | RM score | KL to SFT |',
           '|---|---|---|---|---|---|']
  for name, row in rows:
    lines.append(f'| {name} | {fmt(row["response_loss"], 3)} | {fmt(row["parse_rate"], 3)} | '
                 f'{fmt(row["parse_and_name_rate"], 3)} | {fmt(row["rm_score"], 3)} | '
                 f'{fmt(row["kl_to_reference"], 2)} |')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  console.quiet_libraries()
  runs = _parse_runs(FLAGS.runs)
  reference = None
  if FLAGS.reference:
    reference = run_dir.open_run(FLAGS.reference)[2]
  reward_model = None
  if FLAGS.reward_model:
    _, _, _, _, mesh = run_dir.open_run(runs[0][1])
    config = run_dir.load_config(runs[0][1])
    reward_model = rewards_lib.load_reward_model(FLAGS.reward_model, mesh,
                                                 mesh_lib.logical_rules(config.mesh),
                                                 key='--reward_model')
  data_dir = held_out_data(runs, FLAGS.reference, FLAGS.data_dir)
  print(f'Held-out data: the {FLAGS.split} split of {data_dir}', flush=True)
  rows = []
  for name, workdir in runs:
    rows.append((name, stage_row(workdir, reference, reward_model, data_dir=data_dir,
                                 split=FLAGS.split, max_new_tokens=FLAGS.max_new_tokens,
                                 limit=FLAGS.limit)))
    print(f'{name}: {json.dumps(rows[-1][1])}', flush=True)
  print(table(rows))
  if FLAGS.output:
    with open(FLAGS.output, 'w') as f:
      json.dump([dict(stage=name, **row) for name, row in rows], f, indent=2)


if __name__ == '__main__':
  flags.DEFINE_string('runs', None, 'NAME=WORKDIR,... in table order.')
  flags.DEFINE_string('reference', None, 'The run KL is measured to (the SFT run).')
  flags.DEFINE_string('reward_model', None, 'A reward-model run to score the answers.')
  flags.DEFINE_string('split', 'test', 'Held-out split of the SFT data.')
  flags.DEFINE_string('data_dir', None, 'The SFT data workdir every row is measured on '
                      '(default: the --reference run\'s data.workdir, else the first run\'s).')
  flags.DEFINE_integer('max_new_tokens', 160, 'Tokens per answer at most.')
  flags.DEFINE_integer('limit', None, 'Score only the first N prompts.')
  flags.DEFINE_string('output', None, 'Also write the rows as JSON here.')
  flags.mark_flag_as_required('runs')
  cli.run(main)
