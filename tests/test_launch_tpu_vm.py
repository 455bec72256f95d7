"""The gcloud commands launch.tpu_vm builds: exact argv, quoting, and no injection."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from launch import tpu_vm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTILE = ['x; rm -rf ~', '$(reboot)', '`reboot`', 'a b', 'ok\nreboot', 'UPPER', '-rf', 'x' * 64,
           'ends-']


def dry_run(*argv: str) -> tuple[int, list[str], str]:
  """Runs the CLI's main with --dry_run; returns (status, printed lines, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    # Right after the subcommand: anything after `--` belongs to the training command.
    status = tpu_vm.main([argv[0], '--dry_run', *argv[1:]])
  return status, out.getvalue().splitlines(), err.getvalue()


def command_arg(argv: list[str]) -> str:
  [command] = [a for a in argv if a.startswith('--command=')]
  return command[len('--command='):]


def test_create_tpu_vm_v4():
  status, lines, _ = dry_run('create', '--name=strata-v4', '--zone=us-central2-b',
                             '--accelerator_type=v4-8')
  assert status == 0
  assert lines == ['gcloud compute tpus tpu-vm create strata-v4 --accelerator-type=v4-8 '
                   '--version=tpu-ubuntu2204-base --zone=us-central2-b']


def test_create_queued_spot_v5p_and_best_effort():
  status, lines, _ = dry_run('create', '--name=strata-v5p', '--zone=us-east5-a',
                             '--accelerator_type=v5p-32', '--queued', '--provisioning=spot',
                             '--project=my-project')
  assert status == 0
  assert shlex.split(lines[0]) == [
      'gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'strata-v5p',
      '--node-id=strata-v5p', '--accelerator-type=v5p-32', '--runtime-version=v2-alpha-tpuv5',
      '--zone=us-east5-a', '--project=my-project', '--spot']
  status, lines, _ = dry_run('create', '--name=q1', '--zone=us-east5-a',
                             '--accelerator_type=v5p-8', '--queued', '--provisioning=best-effort')
  assert status == 0 and shlex.split(lines[0])[:2] == ['gcloud', 'alpha']
  assert shlex.split(lines[0])[-1] == '--best-effort'
  # best-effort exists only for queued resources.
  status, _, err = dry_run('create', '--name=q1', '--zone=us-east5-a',
                           '--accelerator_type=v5p-8', '--provisioning=best-effort')
  assert status == 2 and '--queued' in err


def test_create_reserved_and_explicit_runtime():
  status, lines, _ = dry_run('create', '--name=r1', '--zone=us-central2-b',
                             '--accelerator_type=v4-32', '--provisioning=reserved',
                             '--runtime_version=tpu-ubuntu2204-base')
  assert status == 0
  assert shlex.split(lines[0])[-1] == '--reserved'


def test_setup_installs_repo_at_revision_on_all_workers():
  status, lines, _ = dry_run('setup', '--name=strata-v4', '--zone=us-central2-b',
                             '--repo=https://github.com/example/strata.git', '--revision=v0.1.0')
  assert status == 0
  argv = shlex.split(lines[0])
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'strata-v4']
  assert '--worker=all' in argv
  script = command_arg(argv)
  assert 'git clone --quiet -- https://github.com/example/strata.git strata' in script
  assert 'checkout --quiet --force --detach origin/v0.1.0; else' in script
  assert 'checkout --quiet --force --detach v0.1.0; fi' in script
  assert 'python3.11 -m venv .venv' in script
  assert 'apt-get install -y -qq python3.11 python3.11-venv' in script
  assert "pip install --quiet -e '.[tpu]'" in script
  subprocess.run(['bash', '-n', '-c', script], check=True)


def test_setup_rejects_option_like_revision():
  status, _, err = dry_run('setup', '--name=a1', '--zone=us-central2-b', '--repo=r',
                           '--revision=--upload-pack=touch /tmp/x')
  assert status == 2 and 'git revision' in err


def test_run_command_on_all_workers():
  status, lines, _ = dry_run('run', '--name=strata-v5p', '--zone=us-east5-a', '--run_name=r7b',
                             '--workdir=gs://my-bucket/runs/r7b', '--data=gs://my-bucket/data',
                             '--', '--config=configs/pretrain.py:7b', '--config.seed=3')
  assert status == 0
  argv = shlex.split(lines[0])
  assert '--worker=all' in argv
  script = command_arg(argv)
  assert 'gcloud storage rsync --recursive --quiet gs://my-bucket/data runs/data' in script
  assert ('nohup .venv/bin/python -m train --workdir=gs://my-bucket/runs/r7b '
          '--config=configs/pretrain.py:7b --config.seed=3 >> logs/r7b.log') in script
  subprocess.run(['bash', '-n', '-c', script], check=True)


def test_run_requires_gcs_workdir():
  status, _, err = dry_run('run', '--name=a1', '--zone=us-east5-a', '--run_name=r1',
                           '--workdir=/home/me/runs/r1')
  assert status == 2 and 'gs://' in err


@pytest.mark.parametrize('hostile', HOSTILE)
def test_hostile_names_are_rejected(hostile):
  for argv in (['run', f'--name={hostile}', '--run_name=ok', '--workdir=gs://bkt/x'],
               ['run', '--name=ok', f'--run_name={hostile}', '--workdir=gs://bkt/x'],
               ['create', f'--name={hostile}', '--accelerator_type=v4-8'],
               ['delete', f'--name={hostile}']):
    status, lines, err = dry_run(*argv, '--zone=us-central2-b')
    assert status == 2, (argv, lines)
    assert lines == [] and 'Invalid' in err and 'GCP names' in err


def test_check_name_accepts_gcp_names():
  for name in ('a', 'strata-v4', 'run-2026-11-23', 'a' * 63):
    assert tpu_vm.check_name(name) == name


def test_hostile_training_args_reach_python_verbatim(tmp_path):
  """Executes the remote run script with a fake venv python: argv arrives intact, nothing runs."""
  hostile_args = ['--config=configs/pretrain.py:tiny', '--config.note=$(touch pwned1)',
                  "--x=`touch pwned2`; touch pwned3", "--y='; touch pwned4; '", 'a b\nc']
  script = tpu_vm.run_remote('r1', 'gs://bkt/runs/r1', hostile_args)
  venv_bin = tmp_path / 'strata' / '.venv' / 'bin'
  venv_bin.mkdir(parents=True)
  fake = venv_bin / 'python'
  fake.write_text('#!/usr/bin/env python3\nimport json, sys\n'
                  'open("argv.json", "w").write(json.dumps(sys.argv[1:]))\n')
  fake.chmod(0o755)
  subprocess.run(['bash', '-c', script], cwd=tmp_path, check=True, timeout=30,
                 capture_output=True)
  out = tmp_path / 'strata' / 'argv.json'
  for _ in range(100):  # the run is detached
    if out.exists() and out.read_text():
      break
    time.sleep(0.05)
  assert json.loads(out.read_text()) == ['-m', 'train', '--workdir=gs://bkt/runs/r1',
                                         *hostile_args]
  assert (tmp_path / 'strata' / 'logs' / 'r1.pid').exists()
  assert not list(tmp_path.rglob('pwned*'))


def test_logs_stop_delete():
  status, lines, _ = dry_run('logs', '--name=a1', '--zone=us-central2-b', '--run_name=r1',
                             '--follow')
  assert status == 0
  assert command_arg(shlex.split(lines[0])) == 'tail --lines=100 --follow strata/logs/r1.log'
  assert '--worker=0' in shlex.split(lines[0])
  status, lines, _ = dry_run('logs', '--name=a1', '--zone=us-central2-b', '--run_name=r1',
                             '--fetch_to=out', '--num_workers=2')
  assert [shlex.split(line)[5:7] for line in lines] == [
      ['a1:strata/logs/r1.log', 'out/r1.w0.log'], ['a1:strata/logs/r1.log', 'out/r1.w1.log']]
  status, lines, _ = dry_run('stop', '--name=a1', '--zone=us-central2-b', '--run_name=r1')
  assert status == 0 and 'kill' in command_arg(shlex.split(lines[0]))
  status, lines, _ = dry_run('delete', '--name=a1', '--zone=us-central2-b')
  assert lines == ['gcloud compute tpus tpu-vm delete a1 --zone=us-central2-b --quiet']
  status, lines, _ = dry_run('delete', '--name=a1', '--zone=us-central2-b', '--queued')
  assert lines == ['gcloud compute tpus queued-resources delete a1 --zone=us-central2-b '
                   '--force --quiet']


def test_gcloud_gets_argv_without_a_shell(tmp_path):
  """A fake gcloud on PATH records its argv: the hostile value arrives as one argument."""
  fake = tmp_path / 'gcloud'
  fake.write_text('#!/usr/bin/env python3\nimport json, os, sys\n'
                  'open(os.environ["ARGV_OUT"], "a").write(json.dumps(sys.argv[1:]) + "\\n")\n')
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f'{tmp_path}:{os.environ["PATH"]}',
             ARGV_OUT=str(tmp_path / 'argv.jsonl'))
  proc = subprocess.run(
      [sys.executable, '-m', 'launch.tpu_vm', 'run', '--name=a1', '--zone=us-central2-b',
       '--run_name=r1', '--workdir=gs://bkt/r1', '--', '--note=$(touch pwned)'],
      cwd=tmp_path, env=dict(env, PYTHONPATH=REPO), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  [argv] = [json.loads(line) for line in (tmp_path / 'argv.jsonl').read_text().splitlines()]
  assert argv[:5] == ['compute', 'tpus', 'tpu-vm', 'ssh', 'a1']
  assert "'--note=$(touch pwned)'" in command_arg(argv)
  assert not list(tmp_path.rglob('pwned*'))


def test_shell_wrapper_matches_python():
  proc = subprocess.run([os.path.join(REPO, 'launch', 'tpu_vm.sh'), 'delete', '--name=a1',
                         '--zone=us-central2-b', '--dry_run'], capture_output=True, text=True,
                        timeout=60, check=True)
  assert proc.stdout.strip() == 'gcloud compute tpus tpu-vm delete a1 --zone=us-central2-b --quiet'


def test_setup_script_checks_out_the_revision(tmp_path):
  """Runs the worker setup script against a local git repo with fake python/pip."""
  origin = tmp_path / 'origin'
  origin.mkdir()
  git = lambda *a, cwd=origin: subprocess.run(['git', *a], cwd=cwd, check=True,
                                              capture_output=True, text=True).stdout.strip()
  git('init', '--quiet', '-b', 'main')
  git('config', 'user.email', 't@example.com')
  git('config', 'user.name', 't')
  (origin / 'requirements.lock').write_text('')
  git('add', '.')
  git('commit', '--quiet', '-m', 'one')
  first = git('rev-parse', 'HEAD')
  (origin / 'two.txt').write_text('2')
  git('add', '.')
  git('commit', '--quiet', '-m', 'two')
  second = git('rev-parse', 'HEAD')
  # A fake interpreter: `-m venv DIR` makes DIR/bin/python, which logs pip calls.
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  fake = bin_dir / 'python3.11'
  fake.write_text(
      '#!/usr/bin/env bash\n'
      'if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then mkdir -p "$3/bin";'
      ' printf \'#!/usr/bin/env bash\\necho "$@" >> pip.log\\n\' > "$3/bin/python";'
      ' chmod +x "$3/bin/python"; fi\n')
  fake.chmod(0o755)
  home = tmp_path / 'home'
  home.mkdir()
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', HOME=str(home))
  for revision, expected in ((first, first), ('main', second)):
    script = tpu_vm.setup_remote(str(origin), revision)
    proc = subprocess.run(['bash', '-c', script], cwd=home, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == expected
  pip_log = (home / 'strata' / 'pip.log').read_text()
  assert '-m pip install --quiet -r requirements.lock' in pip_log
  assert '-m pip install --quiet -e .[tpu]' in pip_log


def _fake_gcloud(tmp_path, status: int = 0) -> dict[str, str]:
  """PATH with a gcloud that records its argv (and exits with `status`); the env to use."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  fake = bin_dir / 'gcloud'
  fake.write_text('#!/usr/bin/env python3\nimport json, os, sys\n'
                  'open(os.environ["ARGV_OUT"], "a").write(json.dumps(sys.argv[1:]) + "\\n")\n'
                  f'print("ERROR: (gcloud) fake failure", file=sys.stderr) if {status} else None\n'
                  f'sys.exit({status})\n')
  fake.chmod(0o755)
  return dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', PYTHONPATH=REPO,
              ARGV_OUT=str(tmp_path / 'argv.jsonl'))


def _cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'launch.tpu_vm', *argv], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize('misplaced', ['--dry_run', '--workdir=gs://bkt/other', '--zone=us-east5-a'])
def test_launcher_flag_after_the_separator_is_refused_before_gcloud_runs(tmp_path, misplaced):
  env = _fake_gcloud(tmp_path)
  proc = _cli(env, 'run', '--name=a1', '--zone=us-central2-b', '--run_name=r1',
              '--workdir=gs://bkt/r1', '--', '--config=configs/pretrain.py:tiny', misplaced)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  [line] = proc.stderr.splitlines()
  name = misplaced.split('=')[0]
  assert line.startswith(f'error: {name} is a flag of `python -m launch.tpu_vm run`'), line
  assert 'put it before `--`' in line
  assert not (tmp_path / 'argv.jsonl').exists()   # gcloud never ran
  # Without `--`, the module's arguments start at the first one argparse does not know.
  proc = _cli(env, 'run', '--name=a1', '--zone=us-central2-b', '--run_name=r1',
              '--workdir=gs://bkt/r1', 'extra', misplaced)
  assert proc.returncode == 2 and f'error: {name} is a flag of' in proc.stderr
  assert not (tmp_path / 'argv.jsonl').exists()


def test_module_flags_that_look_alike_pass_through():
  # --config.name and --workdir_suffix are not launcher flags.
  status, lines, err = dry_run('run', '--name=a1', '--zone=us-central2-b', '--run_name=r1',
                               '--workdir=gs://bkt/r1', '--', '--config.name=x',
                               '--workdir_suffix=y')
  assert status == 0, err
  assert "--config.name=x --workdir_suffix=y" in command_arg(shlex.split(lines[0]))


def test_usage_errors_are_one_line(tmp_path):
  env = _fake_gcloud(tmp_path)
  for argv, expected in ((['run', '--name=a1', '--zone=us-central2-b'], 'required'),
                         (['launch', '--name=a1'], 'invalid choice'),
                         (['logs', '--name=a1', '--zone=z', '--run_name=r', '--lines=x'],
                          "invalid int value: 'x'")):
    proc = _cli(env, *argv)
    assert proc.returncode == 2, (argv, proc.stderr)
    [line] = proc.stderr.splitlines()
    assert line.startswith('error: ') and expected in line and '--help' in line, (argv, line)
  assert not (tmp_path / 'argv.jsonl').exists()


def test_gcloud_failures_are_clear(tmp_path):
  failing = _fake_gcloud(tmp_path, status=1)
  proc = _cli(failing, 'delete', '--name=a1', '--zone=us-central2-b')
  assert proc.returncode == 1
  assert proc.stderr.splitlines()[-1].startswith('error: gcloud exited with status 1')
  # No gcloud at all: say so, instead of a FileNotFoundError traceback.
  no_gcloud = dict(failing, PATH=str(tmp_path / 'empty'))
  proc = _cli(no_gcloud, 'delete', '--name=a1', '--zone=us-central2-b')
  assert proc.returncode == 127
  [line] = proc.stderr.splitlines()
  assert line.startswith('error: gcloud is not on PATH') and '--dry_run' in line
