"""Sample completions from a trained run.

  python -m train.generate --workdir=runs/tiny --prompt='def parse(' --max_new_tokens=64
      [--temperature=0.8 --top_k=0 --top_p=0.95 --greedy --num_samples=3 --seed=0
       --step=N --prompts_file=prompts.txt]

Loads the latest (or `--step`) checkpoint's parameters and the run's
tokenizer (`train.run_dir.load_run`), encodes each prompt as [BOS] + tokens
(how training documents start), and generates all prompts x samples in one
batch with the KV-cache sampler (`model.decode.generate`) on the run's mesh.
Each sample is printed as its prompt and its completion in separate, labelled
sections; the completion stops at EOS or after `--max_new_tokens`.
"""

from __future__ import annotations

from typing import Any, Sequence

from absl import flags
from etils import epath
import jax
import numpy as np

from configs import cli
from model import decode
from train import checkpoint as checkpoint_lib
from train import console
from train import distributed
from train import mesh as mesh_lib


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
  """--prompt values, then one prompt per non-empty line of --prompts_file."""
  out = list(prompts or [])
  if prompts_file:
    path = epath.Path(prompts_file)
    if not path.is_file():
      raise cli.UserError(f'--prompts_file={prompts_file}: no such file')
    data = path.read_bytes()
    try:
      text = data.decode('utf-8')
    except UnicodeDecodeError as e:
      line = data[:e.start].count(b'\n') + 1
      raise cli.UserError(f'--prompts_file={prompts_file} is not UTF-8 text: line {line} has the '
                          f'byte {data[e.start:e.start + 1]!r} ({e.reason})') from e
    # A literal '\n' in the file stands for a newline, so multi-line prompts fit on a line.
    out += [line.replace('\\n', '\n') for line in text.split('\n') if line.strip()]
  if not out:
    raise cli.UserError('no prompt: give --prompt (repeatable) or --prompts_file'
                        + (f' ({prompts_file} has only empty lines)' if prompts_file else ''))
  return out


def completion_text(tokenizer: Any, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
  """The text the new tokens add after the prompt.

  Decoding prompt + completion together and removing the decoded prompt keeps
  SentencePiece's word-boundary spaces right; if the prompt does not decode to
  a prefix (rare byte-fallback splits), the completion is decoded alone.
  """
  prompt_text = tokenizer.decode(list(prompt_ids))
  full_text = tokenizer.decode(list(prompt_ids) + list(new_ids))
  if full_text.startswith(prompt_text):
    return full_text[len(prompt_text):]
  return tokenizer.decode(list(new_ids))


def sample_completions(config: Any, model: Any, params: Any, tokenizer: Any,
                       mesh: jax.sharding.Mesh, prompts: Sequence[str], *,
                       max_new_tokens: int, num_samples: int = 1, seed: int = 0,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       greedy: bool = False) -> list[dict[str, Any]]:
  """Generates `num_samples` completions per prompt; one dict per sample."""
  encoded = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  longest = max(len(ids) for ids in encoded)
  if longest + max_new_tokens > model.config.max_len:
    raise ValueError(f'The longest prompt ({longest} tokens with BOS) plus max_new_tokens='
                     f"{max_new_tokens} exceeds the model's max_len {model.config.max_len}.")
  rows = [ids for ids in encoded for _ in range(num_samples)]
  # Round the prompt width up so that nearby prompt lengths share one compilation.
  prompt_BP, lengths_B = decode.pad_prompts(rows, tokenizer.pad_id, multiple=16)
  if prompt_BP.shape[1] + max_new_tokens > model.config.max_len:
    prompt_BP, lengths_B = decode.pad_prompts(rows, tokenizer.pad_id)
  out = decode.generate(
      model, params, prompt_BP, lengths_B, max_new_tokens=max_new_tokens,
      rng=jax.random.key(seed), temperature=temperature, top_k=top_k, top_p=top_p,
      greedy=greedy, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
      mesh=mesh, rules=mesh_lib.logical_rules(config.mesh))
  out = jax.device_get(out)
  samples = []
  for row, ids in enumerate(rows):
    new_ids = [int(t) for t, m in zip(out.tokens[row], out.mask[row])
               if m and t != tokenizer.eos_id]
    samples.append({
        'prompt': prompts[row // num_samples],
        'sample': row % num_samples,
        'completion': completion_text(tokenizer, ids, new_ids),
        'num_tokens': int(out.lengths[row]),
        'stopped_at_eos': bool(out.done[row]),
        'mean_logprob': float(np.sum(out.logprobs[row]) / max(int(out.lengths[row]), 1)),
    })
  return samples


def format_sample(sample: dict[str, Any], index: int, total: int) -> str:
  why = 'EOS' if sample['stopped_at_eos'] else 'max_new_tokens'
  header = (f'===== sample {index + 1}/{total} | {sample["num_tokens"]} new tokens, stopped at '
            f'{why} | mean log-prob {sample["mean_logprob"]:.3f} =====')
  return '\n'.join([header, '----- prompt -----', sample['prompt'],
                    '----- completion -----', sample['completion'], ''])


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags; called only when run as a program.

  So importing this module next to other entry points never defines a flag twice.
  """
  flags.DEFINE_string('workdir', None, 'Run directory (config.json, checkpoints/).')
  flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for several.')
  flags.DEFINE_string('prompts_file', None, 'A file with one prompt per line.')
  flags.DEFINE_integer('max_new_tokens', 64, 'Tokens to generate per sample (at most).')
  flags.DEFINE_integer('num_samples', 1, 'Samples per prompt.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 means greedy.')
  flags.DEFINE_integer('top_k', 0, 'Keep the k most likely tokens; 0 keeps all.')
  flags.DEFINE_float('top_p', 0.95, 'Nucleus sampling mass; 1 keeps all.')
  flags.DEFINE_bool('greedy', False, 'Always take the most likely token.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Before anything touches a backend: on a pod every host runs this command.
  distributed.initialize_from_flags()
  console.quiet_libraries()
  prompts = read_prompts(FLAGS.prompt, FLAGS.prompts_file)
  from train import run_dir  # pylint: disable=g-import-not-at-top
  if not (epath.Path(FLAGS.workdir) / run_dir.CONFIG_FILE).exists():
    raise cli.UserError(f'--workdir={FLAGS.workdir} is not a training run directory '
                        f'(no {run_dir.CONFIG_FILE} in it)')
  try:
    config, model, params, tokenizer, mesh = run_dir.load_run(FLAGS.workdir, FLAGS.step)
  except checkpoint_lib.CheckpointError as e:  # no such --step, none saved, or unreadable
    raise cli.UserError(e) from e
  if tokenizer is None:
    raise cli.UserError(f'no tokenizer.model in {FLAGS.workdir} or its data workdir '
                        f'{config.data.workdir}')
  samples = sample_completions(
      config, model, params, tokenizer, mesh, prompts, max_new_tokens=FLAGS.max_new_tokens,
      num_samples=FLAGS.num_samples, seed=FLAGS.seed, temperature=FLAGS.temperature,
      top_k=FLAGS.top_k, top_p=FLAGS.top_p, greedy=FLAGS.greedy)
  if jax.process_index() != 0:
    return
  print(f'{FLAGS.workdir} step {config.checkpoint_step}: {len(samples)} samples '
        f'(temperature {FLAGS.temperature}, top_k {FLAGS.top_k}, top_p {FLAGS.top_p}'
        f'{", greedy" if FLAGS.greedy else ""})\n')
  for i, sample in enumerate(samples):
    print(format_sample(sample, i, len(samples)))


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('workdir')
  cli.run(main)
