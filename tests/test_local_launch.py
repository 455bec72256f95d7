"""Multi-process training on one machine: launch.local + train.distributed.

The main test starts the real entry point (`python -m train`) as two JAX
processes with 4 CPU devices each (one global mesh of 8, collectives over
gloo) and compares its logged losses with one process that owns all 8 devices
and is fed the same global batches.

Why the reference builds its batches from two loaders: the loader shards
documents per process (process p reads documents p, p+2, ... and packs them
itself), so a one-process run reads a different global batch by construction.
The reference therefore calls the loader as process 0 and as process 1 of 2
and concatenates their batches in process order, which is exactly the global
array `jax.make_array_from_process_local_data` assembles in the two-process
run. Equal losses then show that the distributed runtime, the global mesh over
two processes, the batch assembly and the cross-process gradient reduction
compute the same step as a single process would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import local
from train import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 4
CONFIG = ('configs/pretrain.py:tiny,model.vocab_size=256,model.d_model=64,model.num_layers=2,'
          'model.num_heads=4,model.num_kv_heads=2,model.head_dim=16,model.mlp_dim=128,'
          f'seq_len=32,model.max_len=32,batch_size=16,num_train_steps={NUM_STEPS},log_every=1,'
          'eval_every=0,checkpoint_every=100,optimizer.warmup_steps=1,data.preset=files')


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAX_', 'XLA_FLAGS'))}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=REPO, **extra)
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


def _reference_losses(data_dir: str) -> dict[int, float]:
  """Runs in a subprocess with 8 devices: one process, the two-process global batches."""
  import jax  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,unused-import

  from configs import pretrain  # pylint: disable=g-import-not-at-top
  from data_pipeline import loader as loader_lib  # pylint: disable=g-import-not-at-top
  from model import config as model_config_lib  # pylint: disable=g-import-not-at-top
  from model import transformer  # pylint: disable=g-import-not-at-top
  from train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from train import state as state_lib  # pylint: disable=g-import-not-at-top
  from train import steps as steps_lib  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == 1 and jax.device_count() == 8
  config = pretrain.get_config(CONFIG.split(':', 1)[1])
  with config.unlocked():
    config.data.workdir = data_dir
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.logical_rules(config.mesh)
  model = transformer.Transformer(model_config_lib.ModelConfig.from_config(config.model))
  _, shardings = state_lib.abstract_state(config, model, mesh)
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  step = steps_lib.make_train_step(config, model, mesh, shardings, batch_sharding)
  state, _ = state_lib.create_sharded_state(config, model, mesh, jax.random.key(config.seed))
  loaders = [loader_lib.make_loader(data_dir, 'train', seq_len=config.seq_len,
                                    batch_size=config.batch_size // 2, seed=config.seed,
                                    num_epochs=config.num_epochs, shuffle=True,
                                    process_index=p, process_count=2) for p in range(2)]
  losses = {}
  for i in range(NUM_STEPS):
    parts = [next(loader) for loader in loaders]
    batch = {k: jax.device_put(np.concatenate([p[k] for p in parts]), batch_sharding)
             for k in parts[0]}
    state, metrics = step(state, batch)
    losses[i + 1] = float(metrics['train/loss'])
  return losses


def _logged_losses(workdir: str) -> dict[int, float]:
  losses = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'train/loss' in record:
        losses[int(record['step'])] = float(record['train/loss'])
  return losses


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
  data_dir, run_dir = str(tmp_path / 'data'), str(tmp_path / 'run')
  _write_data(data_dir)
  start = time.time()
  launched = subprocess.run(
      [sys.executable, '-m', 'launch.local', '--num_processes=2', '--devices_per_process=4',
       '--', sys.executable, '-m', 'train', f'--config={CONFIG}',
       f'--config.data.workdir={data_dir}', f'--workdir={run_dir}'],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
  output = launched.stdout + launched.stderr
  assert launched.returncode == 0, output[-6000:]
  lines = output.splitlines()
  assert any(line.startswith('[p0] ') for line in lines)
  assert any(line.startswith('[p1] ') for line in lines)
  two_process = _logged_losses(run_dir)
  assert sorted(two_process) == list(range(1, NUM_STEPS + 1)), two_process

  reference = subprocess.run(
      [sys.executable, os.path.abspath(__file__), data_dir], cwd=REPO,
      env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'),
      capture_output=True, text=True, timeout=300)
  assert reference.returncode == 0, reference.stderr[-5000:]
  [result] = [l for l in reference.stdout.splitlines() if l.startswith('RESULT ')]
  one_process = {int(k): v for k, v in json.loads(result[len('RESULT '):]).items()}
  for step in range(1, NUM_STEPS + 1):
    assert one_process[step] == pytest.approx(two_process[step], rel=2e-5), (
        step, one_process, two_process)
  # The loss moved, so the steps really trained (not a constant compared with itself).
  assert abs(one_process[1] - one_process[NUM_STEPS]) > 1e-3
  del start


def test_launcher_stops_the_others_when_one_fails():
  code = ('import os, sys, time\n'
          'pid = int(os.environ["JAX_PROCESS_ID"])\n'
          'print("devices", os.environ["JAX_NUM_CPU_DEVICES"], "of", os.environ["JAX_NUM_PROCESSES"],'
          ' "at", os.environ["JAX_COORDINATOR_ADDRESS"], flush=True)\n'
          'sys.exit(3) if pid == 1 else time.sleep(120)\n')
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


if __name__ == '__main__':
  print('RESULT ' + json.dumps(_reference_losses(sys.argv[1])), flush=True)
