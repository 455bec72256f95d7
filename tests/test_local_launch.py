"""Multi-process training on one machine: launch.local + train.distributed.

The main tests run the real entry point (`python -m train`) as one process
that owns 8 CPU devices and as two JAX processes with 4 devices each (one
global mesh of 8, collectives over gloo). The loader plans the global batch
independently of the process count, so both log the same losses; and a run
checkpointed by two processes resumes in one (and the reverse) with the losses
of the uninterrupted run. The schedule is constant after warm-up, so a run's
`num_train_steps` does not change its first steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import local
from train import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 10
CONFIG = ('configs/pretrain.py:tiny,model.vocab_size=256,model.d_model=64,model.num_layers=2,'
          'model.num_heads=4,model.num_kv_heads=2,model.head_dim=16,model.mlp_dim=128,'
          f'seq_len=32,model.max_len=32,batch_size=16,num_train_steps={NUM_STEPS},log_every=1,'
          'eval_every=5,checkpoint_every=5,optimizer.warmup_steps=1,'
          'optimizer.end_lr_factor=1.0,data.preset=files')


def _env(cache: str | None = None, **extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAX_', 'XLA_FLAGS'))}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=REPO, **extra)
  if cache:
    # Shared by the runs: a later run of the same topology skips compiling.
    env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  return env


def _write_data(data_dir: str) -> None:
  from data_pipeline import shards  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  docs = [rng.integers(4, 256, size=int(n)).tolist() for n in rng.integers(5, 80, size=80)]
  shards.write_dataset(data_dir, {
      'train': [(f'd{i}', d, len(d)) for i, d in enumerate(docs)],
      'validation': [(f'v{i}', d, len(d)) for i, d in enumerate(docs[:8])]})
  with open(os.path.join(data_dir, 'DONE'), 'w') as f:
    f.write('test data\n')


def _train(run_dir: str, data_dir: str, cache: str, num_processes: int) -> str:
  """`python -m train` on 8 CPU devices: 1 process, or 2 through launch.local."""
  train = [sys.executable, '-m', 'train', f'--config={CONFIG}',
           f'--config.data.workdir={data_dir}', f'--workdir={run_dir}']
  if num_processes == 1:
    command, env = train, _env(cache, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  else:
    command = [sys.executable, '-m', 'launch.local', f'--num_processes={num_processes}',
               f'--devices_per_process={8 // num_processes}', '--', *train]
    env = _env(cache)
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  output = done.stdout + done.stderr
  assert done.returncode == 0, output[-6000:]
  return output


def _logged(workdir: str, key: str) -> dict[int, float]:
  losses = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if key in record:
        losses[int(record['step'])] = float(record[key])
  return losses


def _assert_same(got: dict[int, float], expected: dict[int, float], steps) -> None:
  for step in steps:
    assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got, expected)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Uninterrupted runs: {'data', 'cache', 1: one process's workdir, 2: two processes'}."""
  root = tmp_path_factory.mktemp('launch')
  out = {'data': str(root / 'data'), 'cache': str(root / 'cache')}
  _write_data(out['data'])
  for n in (1, 2):
    out[n] = str(root / f'run{n}')
    output = _train(out[n], out['data'], out['cache'], n)
    if n == 2:
      lines = output.splitlines()
      assert any(l.startswith('[p0] ') for l in lines) and any(l.startswith('[p1] ') for l in lines)
  return out


def test_two_processes_log_the_losses_of_one(runs):
  one, two = _logged(runs[1], 'train/loss'), _logged(runs[2], 'train/loss')
  assert sorted(two) == sorted(one) == list(range(1, NUM_STEPS + 1)), (one, two)
  _assert_same(two, one, range(1, NUM_STEPS + 1))
  _assert_same(_logged(runs[2], 'eval/loss'), _logged(runs[1], 'eval/loss'), (5, 10))
  # The loss moved, so the steps really trained (not a constant compared with itself).
  assert abs(one[1] - one[NUM_STEPS]) > 1e-3


@pytest.mark.parametrize('saved_by, resumed_by', [(2, 1), (1, 2)])
def test_resume_on_another_process_count_continues_the_run(runs, tmp_path, saved_by, resumed_by):
  # The uninterrupted run's workdir as it was at step 5 (its checkpoint there).
  run_dir = str(tmp_path / 'run')
  shutil.copytree(runs[saved_by], run_dir)
  shutil.rmtree(os.path.join(run_dir, 'checkpoints', str(NUM_STEPS)))
  output = _train(run_dir, runs['data'], runs['cache'], resumed_by)
  assert 'Resumed from checkpoint step 5' in output
  _assert_same(_logged(run_dir, 'train/loss'), _logged(runs[1], 'train/loss'),
               range(6, NUM_STEPS + 1))


def test_two_processes_fall_back_together_from_a_truncated_step(runs, tmp_path):
  """Every process sees the damage; they agree, move the step aside once, and go on."""
  run_dir = str(tmp_path / 'run')
  shutil.copytree(runs[2], run_dir)
  step_dir = os.path.join(run_dir, 'checkpoints', str(NUM_STEPS))
  for root, _, names in os.walk(os.path.join(step_dir, 'state')):
    for name in names:
      path = os.path.join(root, name)
      if f'{os.sep}d{os.sep}' in path:
        with open(path, 'r+b') as f:
          f.truncate(os.path.getsize(path) // 2)
  output = _train(run_dir, runs['data'], runs['cache'], 2)
  assert 'Falling back to the previous checkpoint' in output
  assert 'Resumed from checkpoint step 5' in output
  assert len(os.listdir(os.path.join(run_dir, 'checkpoints.corrupt'))) == 1
  _assert_same(_logged(run_dir, 'train/loss'), _logged(runs[1], 'train/loss'),
               range(6, NUM_STEPS + 1))


def test_launcher_stops_the_others_when_one_fails(tmp_path):
  # Process 1 fails only once process 0 has printed (a marker file), so a slow
  # start of process 0 on a loaded machine cannot hide its line.
  marker = str(tmp_path / 'p0_printed')
  code = ('import os, sys, time\n'
          'pid = int(os.environ["JAX_PROCESS_ID"])\n'
          'print("devices", os.environ["JAX_NUM_CPU_DEVICES"], "of", os.environ["JAX_NUM_PROCESSES"],'
          ' "at", os.environ["JAX_COORDINATOR_ADDRESS"], flush=True)\n'
          f'marker = {marker!r}\n'
          'if pid == 0:\n'
          '  open(marker, "w").close(); time.sleep(120)\n'
          'deadline = time.monotonic() + 20\n'
          'while not os.path.exists(marker) and time.monotonic() < deadline:\n'
          '  time.sleep(0.05)\n'
          'sys.exit(3)\n')
  start = time.monotonic()
  proc = subprocess.run([sys.executable, '-m', 'launch.local', '--num_processes=2',
                         '--devices_per_process=3', '--grace_seconds=2', '--', sys.executable,
                         '-c', code], cwd=REPO, env=_env(), capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 3, proc.stdout + proc.stderr
  assert time.monotonic() - start < 30  # the sleeping process was stopped, not waited for
  lines = proc.stdout.splitlines()
  assert any(l.startswith('[p0] devices 3 of 2 at 127.0.0.1:') for l in lines), lines
  assert any(l.startswith('[p1] devices 3 of 2 at 127.0.0.1:') for l in lines), lines
  assert any('process 1 exited with status 3' in l for l in lines), lines


def test_launcher_success_and_usage():
  proc = subprocess.run([sys.executable, '-m', 'launch.local', '--num_processes=3', '--',
                         sys.executable, '-c', 'import os; print("hi", os.environ["JAX_PROCESS_ID"])'],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0
  assert sorted(proc.stdout.splitlines()) == ['[p0] hi 0', '[p1] hi 1', '[p2] hi 2']
  with pytest.raises(ValueError, match='after `--`'):
    local.launch([], num_processes=2, devices_per_process=1)


# A stand-in for a training process: on SIGTERM/SIGINT it records the signal,
# takes a moment (as a checkpoint would) and then records that it finished.
_SLEEPER = '''
import os, signal, sys, time
out = os.path.join(sys.argv[1], 'p' + os.environ['JAX_PROCESS_ID'])

def stop(signum, frame):
  with open(out + '.signal', 'a') as f:
    f.write(signal.Signals(signum).name + '\\n')
  time.sleep(1.0)
  with open(out + '.done', 'w') as f:
    f.write('saved')
  sys.exit(0)

signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
with open(out + '.pid', 'w') as f:
  f.write(str(os.getpid()))
time.sleep(120)
'''


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_launcher_forwards_a_signal_to_every_process_and_waits(tmp_path, signum):
  launcher = subprocess.Popen(
      [sys.executable, '-m', 'launch.local', '--num_processes=2', '--devices_per_process=1',
       '--', sys.executable, '-c', _SLEEPER, str(tmp_path)],
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  pid_files = [tmp_path / f'p{i}.pid' for i in range(2)]
  deadline = time.monotonic() + 60
  while not all(p.exists() and p.read_text() for p in pid_files):
    assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()
    time.sleep(0.05)
  pids = [int(p.read_text()) for p in pid_files]
  launcher.send_signal(signum)
  try:
    output, _ = launcher.communicate(timeout=30)
  finally:
    for pid in pids:   # never leave a sleeper behind, whatever the outcome
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)
  # Each process got the launcher's signal once, and the launcher waited for it to finish.
  for i in range(2):
    assert (tmp_path / f'p{i}.signal').read_text() == signum.name + '\n', output
    assert (tmp_path / f'p{i}.done').read_text() == 'saved', output
  assert not any(_alive(pid) for pid in pids)
  assert launcher.returncode == 128 + signum, output
  assert f'got {signum.name}' in output


def test_launcher_usage_errors_are_one_line():
  for argv, expected in ((['--num_processes=0', '--', 'true'], '--num_processes (0)'),
                         (['--num_processes=x', '--', 'true'], "invalid int value: 'x'"),
                         (['--num_processes=1'], 'give the command after `--`'),
                         (['--', 'no-such-program-xyz'], "cannot start 'no-such-program-xyz'")):
    proc = subprocess.run([sys.executable, '-m', 'launch.local', *argv], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, (argv, proc.stderr)
    [line] = proc.stderr.splitlines()
    assert line.startswith('error: ') and expected in line, (argv, line)


def test_process_env_sets_coordinator_and_devices():
  env = local.process_env({'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
                          coordinator='127.0.0.1:1234', num_processes=2, process_id=1,
                          devices_per_process=4)
  assert env['JAX_COORDINATOR_ADDRESS'] == '127.0.0.1:1234'
  assert (env['JAX_NUM_PROCESSES'], env['JAX_PROCESS_ID']) == ('2', '1')
  assert env['JAX_NUM_CPU_DEVICES'] == '4' and env['JAX_PLATFORMS'] == 'cpu'


def test_distributed_plan_from_flags_and_environment():
  env = {'JAX_COORDINATOR_ADDRESS': '10.0.0.1:8476', 'JAX_NUM_PROCESSES': '4',
         'JAX_PROCESS_ID': '3'}
  assert distributed.plan(environ=env, tpu_vm=False) == distributed.Plan(
      'explicit', '10.0.0.1:8476', 4, 3)
  # Flags win over the environment.
  assert distributed.plan('h:1', 2, 0, environ=env, tpu_vm=False) == distributed.Plan(
      'explicit', 'h:1', 2, 0)
  # Nothing given: a single process, unless this is a TPU VM (the runtime finds its peers).
  assert distributed.plan(environ={}, tpu_vm=False).mode == 'single'
  assert distributed.plan(environ={}, tpu_vm=True).mode == 'detect'
  assert distributed.plan(environ=env, mode='off', tpu_vm=True).mode == 'single'
  assert distributed.plan('h:1', 1, 0, environ={}, tpu_vm=False).mode == 'single'


def test_distributed_plan_rejects_partial_or_bad_settings():
  with pytest.raises(ValueError, match='missing num_processes, process_id'):
    distributed.plan(environ={'JAX_COORDINATOR_ADDRESS': 'h:1'}, tpu_vm=False)
  with pytest.raises(ValueError, match='JAX_PROCESS_ID must be an integer'):
    distributed.plan(environ={'JAX_PROCESS_ID': 'x'}, tpu_vm=False)
  with pytest.raises(ValueError, match=r'process_id=2 is not in \[0, num_processes=2\)'):
    distributed.plan('h:1', 2, 2, environ={}, tpu_vm=False)
  with pytest.raises(ValueError, match='host:port'):
    distributed.plan('h', 2, 0, environ={}, tpu_vm=False)
