"""Sample completions from a trained run.

  python -m train.generate --workdir=runs/tiny --prompt='def parse(' --max_new_tokens=64
      [--temperature=0.8 --top_k=0 --top_p=0.95 --greedy --num_samples=3 --seed=0
       --step=N --prompts_file=prompts.txt]

  python -m train.generate --workdir=runs/sft --prompts_file=FILE.jsonl --output=OUT.jsonl

Loads the latest (or `--step`) checkpoint's parameters and the run's
tokenizer (`train.run_dir.load_run`), encodes each prompt as [BOS] + tokens
(how training documents start) or, for a chat-tuned run (SFT and later
stages), through the chat template (data_pipeline/chat.py: each JSONL line's
`prompt` as one user turn, or its `messages`), and generates all prompts x
samples in batches with the KV-cache sampler (`model.decode.generate`) on the
run's mesh. The completion stops at EOS (`<|end|>` for a chat run) or after
`--max_new_tokens`. Samples are printed as labelled prompt / completion
sections, or written with `--output` as JSONL: each prompt's record plus
`completion`.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from absl import flags
from etils import epath
import jax
import numpy as np

from configs import cli
from data_pipeline import chat
from model import decode
from train import console
from train import distributed
from train import mesh as mesh_lib


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[dict[str, Any]]:
  """--prompt values, then --prompts_file: one prompt per line, or JSONL records.

  A `.jsonl` file holds one JSON object per line with `prompt` (text) or
  `messages` (a chat conversation ending with a user turn); its other fields
  are kept and written back with the completion. Returns one dict per prompt.
  """
  out = [{'prompt': p} for p in prompts or []]
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
    if prompts_file.lower().endswith('.jsonl'):
      out += _jsonl_prompts(prompts_file, text)
    else:
      # A literal '\n' in the file stands for a newline, so multi-line prompts fit on a line.
      out += [{'prompt': line.replace('\\n', '\n')} for line in text.split('\n')
              if line.strip()]
  if not out:
    raise cli.UserError('no prompt: give --prompt (repeatable) or --prompts_file'
                        + (f' ({prompts_file} has only empty lines)' if prompts_file else ''))
  return out


def _jsonl_prompts(path: str, text: str) -> list[dict[str, Any]]:
  records = []
  for number, line in enumerate(text.split('\n'), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise cli.UserError(f'{path}:{number}: not JSON ({e.msg})') from None
    if not isinstance(record, dict) or not (
        isinstance(record.get('prompt'), str) or isinstance(record.get('messages'), list)):
      raise cli.UserError(f'{path}:{number}: a record needs "prompt" (text) or "messages" '
                          '(a list of {"role", "content"})')
    records.append(record)
  return records


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


def encode_prompt(config: Any, tokenizer: Any, item: dict[str, Any]) -> list[int]:
  """Token ids of one prompt: the chat template for a chat-tuned run, else [BOS] + text."""
  if config.get('chat', False):
    messages = item.get('messages') or [{'role': 'user', 'content': item['prompt']}]
    try:
      return chat.render_prompt(tokenizer, messages).tolist()
    except chat.ChatFormatError as e:
      raise cli.UserError(f'prompt {item.get("id", "")}: {e}') from None
  if 'prompt' not in item:
    raise cli.UserError('this run is not chat-tuned: give "prompt" text, not "messages"')
  return [tokenizer.bos_id] + tokenizer.encode(item['prompt'])


def sample_completions(config: Any, model: Any, params: Any, tokenizer: Any,
                       mesh: jax.sharding.Mesh, prompts: Sequence[str | dict[str, Any]], *,
                       max_new_tokens: int, num_samples: int = 1, seed: int = 0,
                       temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       greedy: bool = False, batch_rows: int = 256) -> list[dict[str, Any]]:
  """Generates `num_samples` completions per prompt; one dict per sample.

  A chat-tuned run (`config.chat`) gets its prompts through the chat template
  and stops at `<|end|>` (or EOS); others get [BOS] + text and stop at EOS.
  Rows are generated `batch_rows` at a time. Each dict is the prompt's record
  (text prompts: {'prompt'}) plus 'sample', 'completion', 'num_tokens',
  'stopped' (reached a stop token) and 'mean_logprob'.
  """
  items = [p if isinstance(p, dict) else {'prompt': p} for p in prompts]
  encoded = [encode_prompt(config, tokenizer, item) for item in items]
  longest = max(len(ids) for ids in encoded)
  if longest + max_new_tokens > model.config.max_len:
    raise cli.UserError(f'The longest prompt ({longest} tokens) plus max_new_tokens='
                        f"{max_new_tokens} exceeds the model's max_len {model.config.max_len}.")
  is_chat = bool(config.get('chat', False))
  stops = chat.stop_ids(tokenizer) if is_chat else tokenizer.eos_id
  rows = [(i, k) for i in range(len(items)) for k in range(num_samples)]
  rng = jax.random.key(seed)
  samples = []
  for start in range(0, len(rows), batch_rows):
    chunk = rows[start:start + batch_rows]
    ids = [encoded[i] for i, _ in chunk]
    # Round the prompt width up so that nearby prompt lengths share one compilation.
    prompt_BP, lengths_B = decode.pad_prompts(ids, tokenizer.pad_id, multiple=16)
    if prompt_BP.shape[1] + max_new_tokens > model.config.max_len:
      prompt_BP, lengths_B = decode.pad_prompts(ids, tokenizer.pad_id)
    out = jax.device_get(decode.generate(
        model, params, prompt_BP, lengths_B, max_new_tokens=max_new_tokens,
        rng=jax.random.fold_in(rng, start), temperature=temperature, top_k=top_k, top_p=top_p,
        greedy=greedy, eos_id=stops, pad_id=tokenizer.pad_id,
        mesh=mesh, rules=mesh_lib.logical_rules(config.mesh)))
    for row, (i, k) in enumerate(chunk):
      new_ids = [int(t) for t, m in zip(out.tokens[row], out.mask[row]) if m]
      if is_chat:
        text, _ = chat.parse_completion(tokenizer, new_ids)
      else:
        text = completion_text(tokenizer, encoded[i],
                               [t for t in new_ids if t != tokenizer.eos_id])
      samples.append(dict(items[i], sample=k, completion=text,
                          num_tokens=int(out.lengths[row]), stopped=bool(out.done[row]),
                          mean_logprob=float(np.sum(out.logprobs[row])
                                             / max(int(out.lengths[row]), 1))))
  return samples


def format_sample(sample: dict[str, Any], index: int, total: int) -> str:
  why = 'a stop token' if sample['stopped'] else 'max_new_tokens'
  header = (f'===== sample {index + 1}/{total} | {sample["num_tokens"]} new tokens, stopped at '
            f'{why} | mean log-prob {sample["mean_logprob"]:.3f} =====')
  prompt = sample.get('prompt') or '\n'.join(
      f'[{m["role"]}] {m["content"]}' for m in sample.get('messages', []))
  return '\n'.join([header, '----- prompt -----', prompt,
                    '----- completion -----', sample['completion'], ''])


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags; called only when run as a program.

  So importing this module next to other entry points never defines a flag twice.
  """
  flags.DEFINE_string('workdir', None, 'Run directory (config.json, checkpoints/).')
  flags.DEFINE_multi_string('prompt', [], 'A prompt; repeat the flag for several.')
  flags.DEFINE_string('prompts_file', None, 'A file with one prompt per line, or .jsonl records '
                      'with "prompt" or "messages".')
  flags.DEFINE_string('output', None, 'Write the samples here as JSONL (each prompt record plus '
                      '"completion"), instead of printing them.')
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
  config, model, params, tokenizer, mesh = run_dir.open_run(FLAGS.workdir, FLAGS.step)
  if tokenizer is None:
    raise cli.UserError(f'no tokenizer.model in {FLAGS.workdir} or its data workdir '
                        f'{config.data.workdir}')
  samples = sample_completions(
      config, model, params, tokenizer, mesh, prompts, max_new_tokens=FLAGS.max_new_tokens,
      num_samples=FLAGS.num_samples, seed=FLAGS.seed, temperature=FLAGS.temperature,
      top_k=FLAGS.top_k, top_p=FLAGS.top_p, greedy=FLAGS.greedy)
  if jax.process_index() != 0:
    return
  if FLAGS.output:
    epath.Path(FLAGS.output).write_text(
        ''.join(json.dumps(sample) + '\n' for sample in samples))
    print(f'wrote {len(samples)} samples to {FLAGS.output}')
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
