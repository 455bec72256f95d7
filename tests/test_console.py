"""What the entry points print: results and warnings, not library INFO logs; one-line errors.

Runs the real programs (`python -m train.generate`, `train.evaluate`,
`train.plot`, `benchmarks.loader`) as subprocesses on a tiny run trained here
by `python -m train`, and reads their console.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = ('configs/pretrain.py:tiny,model.vocab_size=320,model.d_model=32,'
                'model.num_layers=1,model.num_heads=2,model.num_kv_heads=1,model.head_dim=16,'
                'model.mlp_dim=64,model.max_len=64,seq_len=32,batch_size=4,num_train_steps=2,'
                'eval_every=2,eval_steps=1,checkpoint_every=2,log_every=1,data.preset=files')
# What Orbax and TFDS print at INFO through absl (`I1203 12:16:51.796024 ... file.py:701] ...`).
ABSL_INFO = re.compile(r'^I\d{4} \d\d:\d\d:\d\d', re.MULTILINE)
LIBRARY_NOISE = ('CheckpointManager', 'Closing _NonBlockingMetadataStore', 'dataset_info.py',
                 'read_only=True', 'is read only')


def _env() -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('JAX_', 'XLA_FLAGS'))}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  return env


def _run(*argv: str, timeout: float = 180) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', *argv], cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory) -> tuple[str, str]:
  """(data_dir, run_dir): a real tokenizer and shards, and 2 steps of `python -m train`."""
  from data_pipeline import shards  # pylint: disable=g-import-not-at-top
  from data_pipeline import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('console')
  data_dir, run_dir = str(root / 'data'), str(root / 'run')
  os.makedirs(data_dir)
  texts = ([f'def parse_{i}(line):\n  return line.split({i})\n' for i in range(60)] +
           [f'the quick brown fox {i} jumps\n' for i in range(60)])
  model_path = tokenizer_lib.train_tokenizer(texts, os.path.join(data_dir, 'tokenizer'), 320)
  with open(model_path, 'rb') as f:
    tokenizer = tokenizer_lib.Tokenizer.from_bytes(f.read(), model_path)
  records = lambda name, part: [(f'{name}{i}', tokenizer.encode(t), len(t.encode()))
                                for i, t in enumerate(part)]
  shards.write_dataset(data_dir, {'train': records('tr', texts),
                                  'validation': records('va', texts[:10]),
                                  'test': records('te', texts[10:20])})
  with open(os.path.join(data_dir, 'DONE'), 'w') as f:
    f.write('test data\n')
  trained = _run('train', f'--config={TRAIN_CONFIG}', f'--config.data.workdir={data_dir}',
                 f'--workdir={run_dir}', timeout=300)
  assert trained.returncode == 0, trained.stderr[-4000:]
  return data_dir, run_dir


def _assert_quiet(proc: subprocess.CompletedProcess) -> None:
  output = proc.stdout + proc.stderr
  assert not ABSL_INFO.search(output), output
  for noise in LIBRARY_NOISE:
    assert noise not in output, (noise, output)


def test_generate_prints_samples_not_library_logs(tiny_run):
  _, run_dir = tiny_run
  proc = _run('train.generate', f'--workdir={run_dir}', '--prompt=def parse(',
              '--max_new_tokens=4')
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f'{run_dir} step 2: 1 samples' in proc.stdout
  assert '----- completion -----' in proc.stdout
  _assert_quiet(proc)


def test_evaluate_prints_results_not_library_logs_unless_asked(tiny_run):
  _, run_dir = tiny_run
  proc = _run('train.evaluate', f'--workdir={run_dir}', '--split=test')
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert re.search(r'step 2, split test: loss \d+\.\d+ \| perplexity', proc.stdout), proc.stdout
  assert 'wrote ' in proc.stdout
  _assert_quiet(proc)
  # --verbosity=0 (absl's INFO) brings the libraries' logs back.
  proc = _run('train.evaluate', f'--workdir={run_dir}', '--split=test', '--verbosity=0')
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert ABSL_INFO.search(proc.stderr) and 'CheckpointManager' in proc.stderr


def test_benchmark_stdout_is_json_and_quiet(tiny_run):
  data_dir, _ = tiny_run
  proc = _run('benchmarks.loader', f'--data_dir={data_dir}', '--seq_len=32', '--batch_size=4',
              '--num_batches=3')
  assert proc.returncode == 0, proc.stderr[-4000:]
  report = json.loads(proc.stdout)
  assert report['train']['batches'] == 3 and report['state_restore_exact'] is True
  _assert_quiet(proc)


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == 2, proc.stdout + proc.stderr
  [line] = proc.stderr.strip().splitlines()
  assert line.startswith('error: '), line
  return line


def test_bad_input_is_one_line(tiny_run, tmp_path):
  _, run_dir = tiny_run
  not_a_run = str(tmp_path)
  for module in ('train.generate', 'train.evaluate'):
    line = _one_line_error(_run(module, f'--workdir={not_a_run}', '--prompt=x'
                                if module == 'train.generate' else '--split=test'))
    assert f'--workdir={not_a_run} is not a training run directory' in line
  line = _one_line_error(_run('train.evaluate', f'--workdir={run_dir}', '--step=7'))
  assert 'No checkpoint step 7' in line and 'saved steps: [2]' in line
  line = _one_line_error(_run('train.plot', f'--workdir={not_a_run}'))
  assert line == f'error: nothing to plot: no metrics.jsonl in {not_a_run}'



def test_prompts_file_errors_name_the_file(tmp_path):
  from configs import cli  # pylint: disable=g-import-not-at-top
  from train import generate  # pylint: disable=g-import-not-at-top
  missing = str(tmp_path / 'prompts.txt')
  with pytest.raises(cli.UserError, match=f'^--prompts_file={re.escape(missing)}: no such file$'):
    generate.read_prompts([], missing)
  with open(missing, 'wb') as f:
    f.write(b'def parse(\nbad \xff byte\n')
  with pytest.raises(cli.UserError, match=f'--prompts_file={re.escape(missing)} is not UTF-8 '
                     r"text: line 2 has the byte b'\\xff'"):
    generate.read_prompts([], missing)
  with open(missing, 'w') as f:
    f.write('def parse(\n\nreturn a\\nb\n')
  assert [p['prompt'] for p in generate.read_prompts(['x'], missing)] == [
      'x', 'def parse(', 'return a\nb']
  with pytest.raises(cli.UserError, match='give --prompt'):
    generate.read_prompts([], None)
