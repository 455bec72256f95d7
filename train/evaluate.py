"""Loss, perplexity and bits per byte of a trained model over a whole data split.

  python -m train.evaluate --workdir=runs/tiny --split=test [--step=N]

restores the run's parameters (`train.run_dir.load_run`), reads the split once
in stored order (every document, the last batch padded) and scores it with
`train.steps.make_eval_step` + `evaluate_batches`, the evaluation the training
loop runs on the validation split. Prints the result and writes it to
`<workdir>/eval_<split>.json` (the workdir may be a `gs://` URL; files go
through `etils.epath`).

What is counted. Each document is [BOS] + tokens + [EOS]; the targets are the
document's tokens and its EOS (BOS is never predicted), so a document of n
tokens contributes n + 1 predictions. A document longer than `seq_len` is cut
into pieces that are scored without each other's context, and the first token
of every later piece is not predicted at all (nothing precedes it in its
segment). Those tokens are counted in `unpredicted_tokens`; `loss`,
`perplexity` and `bits_per_byte` cover the predicted tokens only, so with
cuts they are slightly optimistic. `bits_per_byte_extrapolated` charges each
unpredicted token the mean loss. Pass a longer `--seq_len` to avoid cuts.

Every run also gets a copying probe (`copy_probe`): the loss on random tokens
and on the same tokens repeated; a model with induction heads is near 0 on
the repeat, one without scores both alike.

`unigram_loss` is the baseline: the loss of token frequencies fitted on the
train split (add-one smoothed), over the same split; a model that has learnt
anything from context is well below it.

Bits per byte = total nats / total UTF-8 bytes of the split's documents / ln 2.
It does not depend on the tokenizer, so runs with different vocabularies
compare directly.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any, Sequence

from absl import flags
from etils import epath
import jax
import numpy as np
import tqdm

from configs import cli
from data_pipeline import loader as loader_lib
from data_pipeline import sft_data
from data_pipeline import shards
from data_pipeline import tokenizer as tokenizer_lib
from train import code_checks
from train import console
from train import distributed
from train import losses
from train import mesh as mesh_lib
from train import paths
from train import state as state_lib
from train import steps as steps_lib


def evaluate_split(config: Any, model: Any, params: Any, mesh: jax.sharding.Mesh, *,
                   data_dir: str, split: str, seq_len: int | None = None,
                   batch_size: int | None = None, progress: bool = True) -> dict[str, Any]:
  """Scores every document of `split`; returns the metrics (see the module docstring).

  seq_len, batch_size: default the run's; batch_size is global (all processes).
  """
  seq_len = int(seq_len or config.seq_len)
  batch_size = int(batch_size or config.batch_size)
  rules = mesh_lib.logical_rules(config.mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  param_shardings = state_lib.param_shardings(config, model, mesh)
  params = jax.device_put(params, param_shardings)  # no copy when already placed so
  eval_step = steps_lib.make_eval_step(config, model, mesh, param_shardings, batch_sharding)

  stats = shards.split_stats(data_dir, split)
  total_bytes = loader_lib.num_bytes(data_dir, split)
  loader = loader_lib.make_loader(
      data_dir, split, seq_len=seq_len, batch_size=batch_size, num_epochs=1, shuffle=False,
      drop_remainder=False, sharding=batch_sharding)

  # With finite epochs every process yields the same number of batches (the
  # loader pads), so the collective eval step runs equally often everywhere.
  bar = tqdm.tqdm(total=getattr(loader, 'num_batches', None), unit='batch',
                  desc=f'eval {split}', disable=not progress or jax.process_index() != 0)
  in_flight = []

  def step_and_count(params, batch):
    # Dispatch is asynchronous: count a batch when it is computed, keeping one
    # batch in flight so the host never idles the device.
    out = eval_step(params, batch)
    if in_flight:
      jax.block_until_ready(in_flight.pop())
      bar.update()
    in_flight.append(out)
    return out

  def batches():
    for local in loader:
      yield loader_lib.global_batch(local, batch_sharding, batch_size)

  start = time.perf_counter()
  with bar:
    result = steps_lib.evaluate_batches(step_and_count, params, batches())
    bar.update(len(in_flight))
  seconds = time.perf_counter() - start

  nats, num_tokens = result['nats'], int(result['num_tokens'])
  framing, _ = shards.layout(data_dir)
  if framing == 'sequence':
    # Conversations: only the masked-in (response) tokens are targets and the
    # bytes are the responses' (data_pipeline/sft_data.py), so loss, perplexity
    # and bits per byte are the response's; examples are never cut.
    expected, unigram = num_tokens, None
  else:
    expected = stats['tokens'] + stats['documents']  # every token plus each EOS
    unigram = unigram_baseline(data_dir, split, model.config.vocab_size)
  unpredicted = expected - num_tokens
  bits_per_byte = nats / total_bytes / math.log(2) if total_bytes else float('nan')
  return {
      'split': split,
      'loss': result['loss'],
      'perplexity': result['perplexity'],
      'bits_per_byte': bits_per_byte,
      'bits_per_byte_extrapolated': (result['loss'] * expected / total_bytes / math.log(2)
                                     if total_bytes else float('nan')),
      'unigram_loss': unigram,
      'nats': nats,
      'num_tokens': num_tokens,
      'unpredicted_tokens': unpredicted,
      'num_documents': stats['documents'],
      'num_bytes': total_bytes,
      'seq_len': seq_len,
      'batch_size': batch_size,
      'seconds': seconds,
  }


def functional_metrics(config: Any, model: Any, params: Any, tokenizer: Any,
                       mesh: jax.sharding.Mesh, *, data_dir: str, split: str,
                       max_new_tokens: int = 256, limit: int | None = None) -> dict[str, Any]:
  """Generates (greedy) an answer to every held-out instruction and checks it with `ast`.

  `parse_rate`: the fraction whose answer parses; `parse_and_name_rate`: the
  fraction that parse and define the requested function at top level. The
  code is never executed. The prompts are the SFT data's (`prompts_<split>.jsonl`).
  """
  from train import generate  # pylint: disable=g-import-not-at-top
  prompts = [p for p in sft_data.read_prompts(data_dir, split) if p.get('function_name')]
  if limit:
    prompts = prompts[:limit]
  if not prompts:
    raise cli.UserError(f'{data_dir} has no {split} instruction with a function name to check.')
  room = model.config.max_len - max(
      len(generate.encode_prompt(config, tokenizer, p)) for p in prompts)
  start = time.perf_counter()
  samples = generate.sample_completions(
      config, model, params, tokenizer, mesh, prompts,
      max_new_tokens=max(1, min(max_new_tokens, room)), greedy=True)
  checks = [code_checks.check_completion(s['completion'], s['function_name']) for s in samples]
  copying = name_token_loss(config, model, params, tokenizer, mesh, prompts)
  return {
      **copying,
      'functional_split': split,
      'num_prompts': len(samples),
      'parse_rate': sum(c.parses for c in checks) / len(checks),
      'parse_and_name_rate': sum(c.defines_name for c in checks) / len(checks),
      'stopped_rate': sum(s['stopped'] for s in samples) / len(samples),
      'functional_seconds': time.perf_counter() - start,
      'examples': [{'function_name': s['function_name'], 'completion': s['completion'][:400],
                    'parses': c.parses, 'defines_name': c.defines_name}
                   for s, c in list(zip(samples, checks))[:5]],
  }


def _name_positions(tokenizer: Any, answer_ids: Sequence[int], name: str,
                    answer: str) -> list[int]:
  """Indices of the answer tokens that spell the requested `def` name (empty if not found)."""
  match = re.search(r'def\s+(' + re.escape(name) + r')\s*\(', answer)
  if match is None:
    return []
  start, stop = match.span(1)
  out, previous = [], 0
  for j in range(len(answer_ids)):
    end = len(tokenizer.decode([int(t) for t in answer_ids[:j + 1]]))
    if end > start and previous < stop:
      out.append(j)
    if end >= stop:
      break
    previous = end
  return out


def _token_nll_fn(config: Any, model: Any, mesh: jax.sharding.Mesh):
  """jitted (params, tokens [B, L]) -> loss (nats) of each next token [B, L - 1]."""
  rules = mesh_lib.logical_rules(config.mesh)

  @jax.jit
  def token_nll(params, tokens):
    with steps_lib.sharding_context(mesh, rules):
      logits = model.apply({'params': params}, tokens)
    return -losses.token_log_probs(logits[:, :-1], tokens[:, 1:])

  return token_nll


def copy_probe(config: Any, model: Any, params: Any, tokenizer: Any, mesh: jax.sharding.Mesh,
               *, length: int = 60, rows: int = 16, seed: int = 0) -> dict[str, Any]:
  """Can the model copy? Its loss on random tokens, then on the same tokens repeated.

  Each row is BOS, `length` ids drawn uniformly from the ordinary pieces,
  then the same ids again. Nothing predicts the first occurrence (its loss
  is about ln of the vocabulary or worse); a model with induction heads
  predicts the repeat almost surely (near 0 nats). Equal losses mean the
  model does not look back for what followed the current token last time,
  which is what copying a name from a prompt needs.
  """
  length = min(length, (model.config.max_len - 1) // 2)
  ordinary = tokenizer.ordinary_ids()
  rng = np.random.default_rng(seed)
  first = ordinary[rng.integers(0, len(ordinary), size=(rows, length))]
  bos = np.full((rows, 1), max(tokenizer.bos_id, 0))
  tokens = np.concatenate([bos, first, first], axis=1).astype(np.int32)
  nll = np.asarray(jax.device_get(_token_nll_fn(config, model, mesh)(params, tokens)))
  # Position t predicts token t + 1 (token 0 is BOS). Left out: each half's
  # first token, which no look-back predicts (nothing before it recurs).
  return {'copy_first_loss': float(nll[:, 1:length].mean()),
          'copy_repeat_loss': float(nll[:, length + 1:].mean()), 'copy_length': length}


def name_token_loss(config: Any, model: Any, params: Any, tokenizer: Any,
                    mesh: jax.sharding.Mesh, prompts: Sequence[dict[str, Any]],
                    batch_size: int = 16) -> dict[str, Any]:
  """Does the model read the request? Its loss on the requested name in the reference answer.

  Teacher-forced on each prompt's reference `answer`: the mean loss (nats)
  on the answer tokens that spell the requested `def` name, which the
  prompt states verbatim (a model that copies from the prompt predicts
  them almost surely), beside the mean loss on the answer's other tokens.
  """
  from data_pipeline import chat  # pylint: disable=g-import-not-at-top
  rows = []
  for prompt in prompts:
    if not prompt.get('answer'):
      continue
    prompt_ids = list(chat.render_prompt(tokenizer, prompt['messages']))
    answer_ids = chat.encode_text(tokenizer, prompt['answer'])
    names = _name_positions(tokenizer, answer_ids,
                            code_checks.requested_def(prompt['function_name']), prompt['answer'])
    ids = (prompt_ids + answer_ids)[:model.config.max_len]
    if names and len(prompt_ids) + names[-1] < len(ids):
      rows.append((ids, len(prompt_ids), names))
  if not rows:
    return {'name_token_loss': None, 'name_tokens': 0, 'other_answer_token_loss': None}
  token_nll = _token_nll_fn(config, model, mesh)
  name_nll, other_nll = [], []
  length = model.config.max_len
  for first in range(0, len(rows), batch_size):
    chunk = rows[first:first + batch_size]
    tokens = np.zeros((batch_size, length), np.int32)
    for i, (ids, _, _) in enumerate(chunk):
      tokens[i, :len(ids)] = ids
    nll = np.asarray(jax.device_get(token_nll(params, tokens)))
    for i, (ids, prompt_len, names) in enumerate(chunk):
      # Position t predicts token t + 1: answer token j is predicted at prompt_len + j - 1.
      answer = range(prompt_len - 1, len(ids) - 1)
      named = {prompt_len + j - 1 for j in names}
      name_nll += [nll[i, t] for t in sorted(named)]
      other_nll += [nll[i, t] for t in answer if t not in named]
  return {'name_token_loss': float(np.mean(name_nll)), 'name_tokens': len(name_nll),
          'other_answer_token_loss': float(np.mean(other_nll))}


def _target_counts(data_dir: str, split: str, vocab_size: int) -> np.ndarray:
  """How often each id is a prediction target in `split`: every token plus one EOS per document.

  From the counts stored with the shards, so no record is read.
  """
  stored = shards.token_counts(data_dir, split)[:vocab_size]
  counts = np.zeros(vocab_size, np.int64)
  counts[:len(stored)] = stored
  counts[tokenizer_lib.EOS_ID] += shards.split_stats(data_dir, split)['documents']
  return counts


def unigram_baseline(data_dir: str, split: str, vocab_size: int) -> float | None:
  """Loss (nats per token) of a unigram model fitted on the train split, on `split`.

  The context-free baseline a language model must beat: with add-one smoothing,
  -mean log p(token) over the same targets the model predicts. None when the
  dataset has no train split.
  """
  try:
    train = _target_counts(data_dir, 'train', vocab_size)
  except ValueError:
    return None
  probs = (train + 1) / (train.sum() + vocab_size)
  counts = train if split == 'train' else _target_counts(data_dir, split, vocab_size)
  return float(-(counts * np.log(probs)).sum() / counts.sum())


def _data_dir(config: Any, workdir: str, override: str | None) -> str:
  run = paths.resolve(workdir)
  candidates = [override] if override else [
      config.data.workdir,
      # A relative data.workdir is relative to where training ran; try next to the run too.
      os.fspath(run.parent / epath.Path(config.data.workdir).name)]
  for path in candidates:
    if (epath.Path(path) / 'tfds').is_dir():
      return path
  raise FileNotFoundError(f'No prepared data (a tfds/ folder) at {candidates}; the run\'s '
                          'config.json names data.workdir, or pass --data_dir.')


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags; called only when run as a program.

  So importing this module next to other entry points never defines a flag twice.
  """
  flags.DEFINE_string('workdir', None, 'Run directory (config.json, checkpoints/).')
  flags.DEFINE_string('split', 'test', 'Split to evaluate: train, validation or test.')
  flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
  flags.DEFINE_string('data_dir', None, 'Data workdir (default: the run\'s data.workdir).')
  flags.DEFINE_integer('seq_len', None, 'Row length (default: the run\'s seq_len).')
  flags.DEFINE_integer('batch_size', None, 'Global batch size (default: the run\'s).')
  flags.DEFINE_bool('functional', False, 'Also generate an answer to every held-out instruction '
                    '(a chat-tuned run) and report parse_rate and parse_and_name_rate (the code '
                    'is parsed with ast, never run).')
  flags.DEFINE_integer('max_new_tokens', 256, 'With --functional: tokens per answer at most.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Before anything touches a backend: on a pod every host runs this command.
  distributed.initialize_from_flags()
  console.quiet_libraries()
  from train import run_dir  # pylint: disable=g-import-not-at-top
  config, model, params, tokenizer, mesh = run_dir.open_run(FLAGS.workdir, FLAGS.step)
  try:
    data_dir = _data_dir(config, FLAGS.workdir, FLAGS.data_dir)
  except FileNotFoundError as e:  # its message names the places it looked and --data_dir
    raise cli.UserError(e) from e
  result = evaluate_split(config, model, params, mesh, data_dir=data_dir, split=FLAGS.split,
                          seq_len=FLAGS.seq_len, batch_size=FLAGS.batch_size)
  result['step'] = int(config.checkpoint_step)
  result['data_dir'] = paths.resolve_str(data_dir)
  result.update(copy_probe(config, model, params, tokenizer, mesh))
  if FLAGS.functional:
    if not config.get('chat', False):
      raise cli.UserError(f'--functional needs a chat-tuned run (SFT or later); {FLAGS.workdir} '
                          'is not one.')
    result.update(functional_metrics(config, model, params, tokenizer, mesh,
                                     data_dir=data_dir, split=FLAGS.split,
                                     max_new_tokens=FLAGS.max_new_tokens))
  if jax.process_index() != 0:
    return
  print(f'{FLAGS.workdir} step {result["step"]}, split {FLAGS.split}: '
        f'loss {result["loss"]:.4f} | perplexity {result["perplexity"]:.2f} | '
        f'bits/byte {result["bits_per_byte"]:.4f} | {result["num_tokens"]:,} tokens, '
        f'{result["num_documents"]:,} documents, {result["num_bytes"]:,} bytes')
  if result['unpredicted_tokens']:
    print(f'{result["unpredicted_tokens"]} tokens were not predicted (first token of a piece of a '
          f'document longer than seq_len={result["seq_len"]}); with them at the mean loss: '
          f'{result["bits_per_byte_extrapolated"]:.4f} bits/byte.')
  print(f'copies a repeated random sequence: loss {result["copy_first_loss"]:.2f} nats on '
        f'{result["copy_length"]} random tokens, {result["copy_repeat_loss"]:.2f} on the same '
        f'tokens repeated (a model that copies: near 0)')
  if FLAGS.functional:
    print(f'functional, {result["num_prompts"]} held-out instructions: parse_rate '
          f'{result["parse_rate"]:.3f} | parse_and_name_rate {result["parse_and_name_rate"]:.3f}'
          f' | stopped at <|end|> {result["stopped_rate"]:.3f}')
    if result['name_token_loss'] is not None:
      print(f'reads the request: loss {result["name_token_loss"]:.2f} nats on the requested '
            f'name\'s {result["name_tokens"]} tokens in the reference answers, '
            f'{result["other_answer_token_loss"]:.2f} on their other tokens')
  path = epath.Path(FLAGS.workdir) / f'eval_{FLAGS.split}.json'
  path.write_text(json.dumps(result, indent=2))
  print(f'wrote {path}')


if __name__ == '__main__':
  define_flags()
  flags.mark_flag_as_required('workdir')
  cli.run(main)
