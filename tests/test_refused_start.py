"""A start that is refused changes no file of the run, and says why in one line.

Each case runs `python -m train` as a user would, on a finished tiny run or a
fresh workdir, and checks: exit status 2, stderr's last line is `error: ...`
naming what is wrong, no traceback, and (for an existing run) checkpoints,
config.json, tokenizer.model, data.json and metrics.jsonl byte-identical.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import guards

from data_pipeline import shards
from data_pipeline import tokenizer as tokenizer_lib
from train import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 400
FLAGS = [
    '--config=configs/pretrain.py:tiny',
    '--config.data.preset=files',
    f'--config.model.vocab_size={VOCAB}', '--config.model.d_model=32',
    '--config.model.num_layers=2', '--config.model.num_heads=2', '--config.model.num_kv_heads=1',
    '--config.model.head_dim=16', '--config.model.mlp_dim=64', '--config.model.max_len=32',
    '--config.seq_len=32', '--config.batch_size=4', '--config.num_train_steps=6',
    '--config.eval_every=0', '--config.checkpoint_every=3', '--config.keep_checkpoints=3',
    '--config.log_every=1', '--config.optimizer.warmup_steps=2',
]


def _make_data(directory: str, text_seed: int) -> str:
  """Shards encoded with a SentencePiece model of VOCAB pieces trained on stdlib text."""
  source = [os.path.join(os.path.dirname(os.__file__), name)
            for name in ('os.py', 'argparse.py', 'json/decoder.py')][text_seed % 3]
  with open(source) as f:
    text = f.read()
  model = tokenizer_lib.train_tokenizer([text], os.path.join(directory, 'tokenizer'), VOCAB)
  tok = tokenizer_lib.Tokenizer.load(model)
  lines = [line for line in text.split('\n') if len(line) > 20]

  def docs(lo, hi, prefix):
    for i in range(lo, hi):
      chunk = '\n'.join(lines[i * 3:(i + 1) * 3])
      yield f'{prefix}{i}', tok.encode(chunk), len(chunk.encode())

  shards.write_dataset(directory, {'train': docs(0, 60, 'tr'), 'validation': docs(60, 70, 'va'),
                                   'test': docs(70, 80, 'te')})
  return directory


def _env(cache: str, **extra) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('XLA_FLAGS', None)
  env.update(extra)
  return env


def _train(workdir, data_dir, cache, *extra, env=None, timeout=300):
  cmd = [sys.executable, '-m', 'train', f'--workdir={workdir}', *FLAGS,
         f'--config.data.workdir={data_dir}', *extra]
  return subprocess.run(cmd, env=env or _env(cache), cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


def _files(directory) -> dict[str, object]:
  return guards.snapshot(directory)


def _assert_refused(result, *needles):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: '), result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  for needle in needles:
    assert needle in last, (needle, last)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  return _make_data(str(tmp_path_factory.mktemp('data')), 0)


@pytest.fixture(scope='module')
def finished(tmp_path_factory, data, cache):
  """A tiny run of 6 steps (checkpoints 3 and 6), copied fresh for each test."""
  workdir = str(tmp_path_factory.mktemp('runs') / 'run')
  result = _train(workdir, data, cache)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ('config.json', 'tokenizer.model', 'data.json', 'metrics.jsonl'):
    assert os.path.exists(os.path.join(workdir, name)), name
  return workdir


@pytest.fixture
def run(finished, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  return workdir


@pytest.mark.parametrize('extra, needles', [
    # The failed start must not leave a 2-layer config.json for generate/evaluate to load.
    (['--config.model.num_layers=1', '--config.batch_size=0'], ['batch_size=0']),
    (['--config.model.num_layers=1'], ['layers_1', 'in the checkpoint but not in this run',
                                       'checkpoints/6']),
    (['--config.model.d_model=48'], ['has shape', 'checkpoints/6']),
    (['--config.seq_len=64'], ['seq_len=64', 'model.max_len=32']),
    (['--config.dedup_typo=1'], ['--config.dedup_typo', 'valid keys']),
    (['--config.seq_len=abc'], ['seq_len', 'abc']),
    (['--config.num_train_steps=0'], ['num_train_steps=0', 'num_epochs']),
    (['--config.optimizer.b2=1.5'], ['optimizer.b2=1.5']),
    (['--config.model.num_kv_heads=3'], ['num_kv_heads']),
])
def test_a_refused_start_changes_no_file_of_the_run(run, data, cache, extra, needles):
  before = _files(run)
  _assert_refused(_train(run, data, cache, *extra), *needles)
  assert _files(run) == before


def test_rebuilt_data_with_another_tokenizer_is_refused(run, data, cache, tmp_path):
  other = _make_data(str(tmp_path / 'other'), 1)   # same vocabulary size, other pieces
  before = _files(run)
  _assert_refused(_train(run, other, cache), 'tokenizer', 'changed')
  assert _files(run) == before
  # The same data resumes; the run's tokenizer copy is the one it started with.
  result = _train(run, data, cache, '--config.num_train_steps=7')
  assert result.returncode == 0, result.stderr[-3000:]
  assert _files(run)['tokenizer.model'] == before['tokenizer.model']


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path, data, cache):
  workdir = tmp_path / 'run'
  _assert_refused(_train(workdir, data, cache, '--config.model.vocab_size=512'),
                  '400 pieces', 'model.vocab_size is 512')
  assert not os.path.exists(workdir / 'config.json')


@pytest.mark.parametrize('workdir, needle', [
    ('', '--workdir is empty'),
    ('{data}', 'data workdir'),
    ('{file}', 'existing file'),
    (os.path.join(REPO, 'train', 'my_run'), 'source folder train/'),
    (REPO, 'the repository itself'),
    ('gs://bucket/run', "pip install -e '.[tpu]'"),
])
def test_bad_workdirs_are_refused(tmp_path, data, cache, workdir, needle):
  if workdir.startswith('gs://') and importlib.util.find_spec('gcsfs') is not None:
    pytest.skip('the tpu extra is installed here')
  a_file = tmp_path / 'a_file'
  a_file.write_text('x')
  workdir = workdir.format(data=data, file=a_file)
  before = _files(data)
  _assert_refused(_train(workdir, data, cache), needle)
  assert _files(data) == before
  assert not os.path.exists(os.path.join(REPO, 'train', 'my_run'))
  assert a_file.read_text() == 'x'


def test_a_batch_the_devices_cannot_split_is_refused_before_compiling(tmp_path, data, cache):
  env = _env(cache, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  result = _train(tmp_path / 'run', data, cache, '--config.batch_size=4', env=env)
  _assert_refused(result, 'batch_size=4', 'multiple of 8')


def _wait_for_step(workdir, step, proc, timeout=180.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    records = metrics.read_metrics(workdir)
    if any(r.get('step', 0) >= step and 'train/loss' in r for r in records):
      return
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.1)
  proc.kill()
  raise AssertionError('timed out')


def _slow_run(workdir, data, cache):
  hooks = dict(STRATA_TEST_SLOW_AFTER='1', STRATA_TEST_SLEEP='0.5')
  cmd = [sys.executable, os.path.join(REPO, 'tests', 'loop_run.py'), f'--workdir={workdir}',
         *FLAGS, f'--config.data.workdir={data}', '--config.num_train_steps=200',
         '--config.checkpoint_every=0']
  return subprocess.Popen(cmd, env=_env(cache, **hooks), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tmp_path, data, cache):
  workdir = str(tmp_path / 'run')
  proc = _slow_run(workdir, data, cache)
  _wait_for_step(workdir, 3, proc)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert 'Ctrl-C received: saving a checkpoint at step' in out
  assert '"reason": "preempted"' in out
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert saved and 3 <= saved[-1] < 200


def test_a_second_ctrl_c_aborts_at_once(tmp_path, data, cache):
  workdir = str(tmp_path / 'run')
  proc = _slow_run(workdir, data, cache)
  _wait_for_step(workdir, 3, proc)
  # The second Ctrl-C goes once the first one's handler has run (it says so on
  # stderr): two signals that arrive while the process is busy in C code (a step,
  # on loaded cores) reach Python as one.
  lines: list[str] = []
  first_seen = threading.Event()

  def read_stderr():
    for line in proc.stderr:
      lines.append(line)
      if 'press Ctrl-C again to abort' in line:
        first_seen.set()

  reader = threading.Thread(target=read_stderr, daemon=True)
  reader.start()
  proc.send_signal(signal.SIGINT)
  assert first_seen.wait(timeout=60), ''.join(lines)[-3000:]
  proc.send_signal(signal.SIGINT)
  proc.wait(timeout=60)
  reader.join(timeout=10)
  err = ''.join(lines)
  assert proc.returncode != 0, err[-3000:]
  assert 'aborted' in err or proc.returncode == -signal.SIGINT, err[-3000:]


def test_another_stages_config_is_named(tmp_path, cache):
  result = subprocess.run(
      [sys.executable, '-m', 'train', '--config=configs/data.py:stdlib',
       f'--workdir={tmp_path / "run"}'], env=_env(cache), cwd=REPO, capture_output=True,
      text=True, timeout=120)
  _assert_refused(result, 'not a pre-training config', 'configs/pretrain.py')
  assert not os.path.exists(tmp_path / 'run')


def _truncate_array_files(step_dir: str) -> None:
  files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
           for n in names if f'{os.sep}d{os.sep}' in os.path.join(root, n)]
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def test_a_truncated_latest_step_falls_back_and_keeps_the_metrics(run, data, cache):
  before = metrics.read_metrics(run)
  assert [r['step'] for r in before if 'train/loss' in r] == [1, 2, 3, 4, 5, 6]
  _truncate_array_files(os.path.join(run, 'checkpoints', '6'))
  result = _train(run, data, cache)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Checkpoint step 6' in result.stderr and 'Falling back' in result.stderr
  assert 'Resumed from checkpoint step 3' in result.stdout
  after = metrics.read_metrics(run)
  # History up to the restored step is untouched; the steps after it were
  # trained again, and their first records are kept aside, not deleted.
  kept = [r for r in before if r['step'] <= 3]
  assert after[:len(kept)] == kept
  assert [r['step'] for r in after if 'train/loss' in r] == [1, 2, 3, 4, 5, 6]
  with open(os.path.join(run, 'metrics.discarded.jsonl')) as f:
    discarded = [json.loads(line) for line in f]
  assert [r for r in discarded] == [r for r in before if r['step'] > 3]
  assert os.listdir(os.path.join(run, 'checkpoints.corrupt'))


@pytest.mark.parametrize('args, needles', [
    (['--config=configs/nope.py:tiny'], ['cannot load config file configs/nope.py',
                                         'No such file']),
    (['--config=configs/pretrain.py:tiny,seq_len=abc'], ["'seq_len'", "'abc'"]),
    (['--config=configs/pretrain.py:huge'], ["Unknown preset 'huge'", 'tiny']),
    (['--config=configs/pretrain.py:tiny,model.num_layer=2'], ['num_layer', 'num_layers']),
])
def test_config_file_errors_are_one_line(tmp_path, cache, args, needles):
  result = subprocess.run(
      [sys.executable, '-m', 'train', *args, f'--workdir={tmp_path / "run"}'], env=_env(cache),
      cwd=REPO, capture_output=True, text=True, timeout=120)
  _assert_refused(result, *needles)
  assert not os.path.exists(tmp_path / 'run')


def test_a_run_whose_tokenizer_does_not_fit_its_model_is_refused_by_load_run(run):
  from configs.cli import UserError  # pylint: disable=g-import-not-at-top
  from train import run_dir  # pylint: disable=g-import-not-at-top
  other = tokenizer_lib.train_tokenizer(
      ['def parse(line):\n  return line.split()\n' * 40, 'the quick brown fox\n' * 40],
      os.path.join(run, 'other'), 300)
  shutil.copy(other, os.path.join(run, 'tokenizer.model'))
  with pytest.raises(UserError, match='300 pieces.*vocab_size 400'):
    run_dir.load_run(run)
