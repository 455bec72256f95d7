"""Cloud TPU VMs with gcloud: create, set up, run, read logs, stop, delete.

    python -m launch.tpu_vm create --name=strata-v4 --zone=us-central2-b --accelerator_type=v4-8
    python -m launch.tpu_vm setup  --name=strata-v4 --zone=us-central2-b \
        --repo=https://github.com/ORG/strata.git --revision=main
    python -m launch.tpu_vm run    --name=strata-v4 --zone=us-central2-b --run_name=tiny-v4 \
        --workdir=gs://my-bucket/runs/tiny-v4 --data=gs://my-bucket/data -- \
        --config=configs/pretrain.py:tiny
    python -m launch.tpu_vm logs   --name=strata-v4 --zone=us-central2-b --run_name=tiny-v4 --follow
    python -m launch.tpu_vm delete --name=strata-v4 --zone=us-central2-b

Every gcloud call is an argv list run without a shell. The one string that a
shell does see, the command run on the workers (`--command=...`), is built
from argv lists with `shlex.quote` on every value, and names are checked
against GCP's rules first, so a run name or an argument cannot smuggle in a
command. `--dry_run` prints each gcloud command (`shlex.join`) instead of
running it; it and every other flag of this launcher belong before `--` (after
it they are refused, not passed on to the training command). The README section "Cloud TPU VMs" walks through it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

# Standard library only (no configs.cli): this runs on a laptop that has gcloud,
# not necessarily strata's dependencies (see launch/tpu_vm.sh).
EXIT_USAGE = 2

# GCP resource names (TPU nodes, queued resources): RFC 1035 labels.
_GCP_NAME = re.compile(r'[a-z]([-a-z0-9]{0,61}[a-z0-9])?')
_ZONE = re.compile(r'[a-z]+-[a-z]+[0-9]+-[a-z]')
_ACCELERATOR = re.compile(r'v[0-9]+[a-z]*-[0-9]+')
_RUNTIME = re.compile(r'[a-z0-9][-a-z0-9._]*')
_PROJECT = re.compile(r'[a-z][-a-z0-9:.]{4,61}[a-z0-9]')
# Git revisions and GCS paths: printable, no whitespace, never an option.
_REVISION = re.compile(r'[A-Za-z0-9][A-Za-z0-9._/@^~-]*')
_GCS = re.compile(r'gs://[a-z0-9][-a-z0-9._]{1,220}[a-z0-9](/[^\s]*)?')

# Software images for JAX on each generation (`--version` / `--runtime-version`).
RUNTIME_VERSIONS = {
    'v2': 'tpu-ubuntu2204-base',
    'v3': 'tpu-ubuntu2204-base',
    'v4': 'tpu-ubuntu2204-base',
    'v5litepod': 'v2-alpha-tpuv5-lite',
    'v5e': 'v2-alpha-tpuv5-lite',
    'v5p': 'v2-alpha-tpuv5',
    'v6e': 'v2-alpha-tpuv6e',
}
PROVISIONING = ('on-demand', 'spot', 'reserved', 'best-effort')
REMOTE_DIR = 'strata'  # relative to the login directory on each worker
VENV_PYTHON = '.venv/bin/python'
DATA_DIR = 'runs/data'  # the data workdir the configs default to


def check_name(value: str, what: str = 'name') -> str:
  """Enforces GCP's naming rule; a clear one-line error otherwise."""
  if not isinstance(value, str) or not _GCP_NAME.fullmatch(value):
    raise ValueError(
        f'Invalid {what} {value!r}: GCP names are 1-63 characters of lowercase letters, digits '
        f'and hyphens, starting with a letter and not ending with a hyphen.')
  return value


def _check(pattern: re.Pattern, value: str, what: str, rule: str) -> str:
  if not isinstance(value, str) or not pattern.fullmatch(value):
    raise ValueError(f'Invalid {what} {value!r}: expected {rule}.')
  return value


def default_runtime_version(accelerator_type: str) -> str:
  generation = accelerator_type.split('-', 1)[0]
  if generation not in RUNTIME_VERSIONS:
    raise ValueError(f'No default runtime version for {accelerator_type!r}; pass '
                     f'--runtime_version (known generations: {sorted(RUNTIME_VERSIONS)}).')
  return RUNTIME_VERSIONS[generation]


def _common(args: argparse.Namespace) -> list[str]:
  flags = [f'--zone={_check(_ZONE, args.zone, "zone", "e.g. us-central2-b")}']
  if args.project:
    flags.append(f'--project={_check(_PROJECT, args.project, "project", "a GCP project id")}')
  return flags


def create_command(args: argparse.Namespace) -> list[str]:
  """`gcloud ... create` for a TPU VM, or for a queued resource with --queued."""
  name = check_name(args.name, 'TPU name')
  accelerator = _check(_ACCELERATOR, args.accelerator_type, 'accelerator type',
                       'e.g. v4-8, v5p-32, v5litepod-16, v6e-8')
  runtime = _check(_RUNTIME, args.runtime_version or default_runtime_version(accelerator),
                   'runtime version', 'e.g. tpu-ubuntu2204-base')
  provisioning = args.provisioning
  if provisioning == 'best-effort' and not args.queued:
    raise ValueError('--provisioning=best-effort exists only for queued resources; add --queued.')
  if args.queued:
    # best-effort is an alpha-only flag of queued resources.
    track = ['gcloud', 'alpha'] if provisioning == 'best-effort' else ['gcloud']
    argv = track + ['compute', 'tpus', 'queued-resources', 'create', name, f'--node-id={name}',
                    f'--accelerator-type={accelerator}', f'--runtime-version={runtime}']
  else:
    argv = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', name,
            f'--accelerator-type={accelerator}', f'--version={runtime}']
  argv += _common(args)
  if provisioning != 'on-demand':
    argv.append('--' + provisioning)
  return argv


def ssh_command(args: argparse.Namespace, remote: str, worker: str = 'all') -> list[str]:
  """`gcloud compute tpus tpu-vm ssh NAME --worker=... --command=REMOTE`."""
  name = check_name(args.name, 'TPU name')
  if worker != 'all' and not worker.isdigit():
    raise ValueError(f'Invalid worker {worker!r}: expected "all" or a worker number.')
  return (['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', name] + _common(args) +
          [f'--worker={worker}', f'--command={remote}'])


def _script(*lines: Sequence[str] | str) -> str:
  """Joins shell lines; argv lists are quoted word by word, strings are trusted constants."""
  return '; '.join(line if isinstance(line, str) else shlex.join(line) for line in lines)


def setup_remote(repo: str, revision: str, extras: str = 'tpu', python: str = 'python3.11') -> str:
  """The script each worker runs: clone/update the repo at `revision`, venv, install."""
  if not repo or repo.startswith('-') or any(c.isspace() for c in repo):
    raise ValueError(f'Invalid repo {repo!r}: expected a git URL or path.')
  _check(_REVISION, revision, 'git revision', 'a branch, tag or commit (no spaces, no leading -)')
  _check(re.compile(r'[a-z0-9_,]+'), extras, 'extras', 'e.g. tpu')
  _check(re.compile(r'python3(\.[0-9]+)?'), python, 'python', 'e.g. python3.11')
  pip = [VENV_PYTHON, '-m', 'pip', 'install', '--quiet']
  checkout = ['git', '-c', 'advice.detachedHead=false', 'checkout', '--quiet', '--force', '--detach']
  # The TPU images are Ubuntu 22.04, whose python3 is 3.10; strata needs 3.11+.
  # `python` is validated above, so interpolating it here is safe.
  install_python = (f'if ! command -v {python} >/dev/null || ! {python} -c "import ensurepip" '
                    f'2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive '
                    f'apt-get install -y -qq {python} {python}-venv; fi')
  return _script(
      'set -euo pipefail',
      install_python,
      f'if [ ! -d {shlex.quote(REMOTE_DIR)}/.git ]; then '
      + shlex.join(['git', 'clone', '--quiet', '--', repo, REMOTE_DIR]) + '; fi',
      ['cd', REMOTE_DIR],
      ['git', 'fetch', '--quiet', '--tags', 'origin'],
      # A branch name means the freshly fetched remote branch, not a stale local one.
      'if ' + shlex.join(['git', 'rev-parse', '--verify', '--quiet', f'refs/remotes/origin/{revision}'])
      + ' >/dev/null; then ' + shlex.join(checkout + [f'origin/{revision}']) + '; else '
      + shlex.join(checkout + [revision]) + '; fi',
      [python, '-m', 'venv', '.venv'],
      pip + ['--upgrade', 'pip'],
      pip + ['-r', 'requirements.lock'],
      # The extra adds libtpu for the jax version the lock file already installed.
      pip + ['-e', f'.[{extras}]'],
      ['git', 'rev-parse', 'HEAD'],
  )


def run_remote(run_name: str, workdir: str, train_args: Sequence[str], *, module: str = 'train',
               data: str | None = None, foreground: bool = False,
               env: Sequence[str] = ()) -> str:
  """The script each worker runs: fetch the data, start `python -m MODULE` detached."""
  check_name(run_name, 'run name')
  _check(_GCS, workdir, 'workdir', 'a gs://bucket/path (every worker must see the same checkpoints)')
  _check(re.compile(r'[A-Za-z_][A-Za-z0-9_.]*'), module, 'module', 'a Python module name')
  lines: list[Sequence[str] | str] = ['set -euo pipefail', ['cd', REMOTE_DIR],
                                      ['mkdir', '-p', 'logs', DATA_DIR]]
  if data:
    _check(_GCS, data, 'data', 'a gs://bucket/path holding a prepared data workdir')
    # Every worker reads the same prepared tokenizer + shards, copied from one place.
    lines.append(['gcloud', 'storage', 'rsync', '--recursive', '--quiet', data, DATA_DIR])
  for item in env:
    key, sep, _ = item.partition('=')
    if not sep or not re.fullmatch(r'[A-Z_][A-Z0-9_]*', key):
      raise ValueError(f'Invalid --env {item!r}: expected NAME=value.')
    lines.append(['export', item])
  command = [VENV_PYTHON, '-m', module, f'--workdir={workdir}', *train_args]
  log = f'logs/{run_name}.log'
  if foreground:
    lines.append(shlex.join(command) + ' 2>&1 | tee -a ' + shlex.quote(log))
  else:
    # Detached, so a dropped ssh connection does not kill the run.
    lines.append('nohup ' + shlex.join(command) + f' >> {shlex.quote(log)} 2>&1 < /dev/null & '
                 + f'echo $! > {shlex.quote(f"logs/{run_name}.pid")}')
    lines.append(f'echo started {shlex.quote(run_name)} on "$(hostname)", log: '
                 + shlex.quote(f'{REMOTE_DIR}/{log}'))
  return _script(*lines)


def logs_remote(run_name: str, follow: bool, lines: int) -> str:
  check_name(run_name, 'run name')
  log = f'{REMOTE_DIR}/logs/{run_name}.log'
  return _script(['tail', f'--lines={int(lines)}'] + (['--follow'] if follow else []) + [log])


def stop_remote(run_name: str) -> str:
  check_name(run_name, 'run name')
  pid = shlex.quote(f'{REMOTE_DIR}/logs/{run_name}.pid')
  return f'if [ -f {pid} ]; then kill "$(cat {pid})" || true; rm -f {pid}; fi'


def delete_command(args: argparse.Namespace) -> list[str]:
  name = check_name(args.name, 'TPU name')
  if args.queued:
    # --force also deletes the TPU VM the queued resource holds.
    return (['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', name] + _common(args) +
            ['--force', '--quiet'])
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', name] + _common(args) + ['--quiet']


def fetch_commands(args: argparse.Namespace) -> list[list[str]]:
  """One scp per worker: `DEST/<run_name>.w<i>.log`."""
  name = check_name(args.name, 'TPU name')
  run_name = check_name(args.run_name, 'run name')
  return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp',
           f'{name}:{REMOTE_DIR}/logs/{run_name}.log',
           os.path.join(args.fetch_to, f'{run_name}.w{i}.log')] + _common(args) + [f'--worker={i}']
          for i in range(args.num_workers)]


def check_no_launcher_flags(args: argparse.Namespace, train_args: Sequence[str]) -> None:
  """Refuses a flag of this launcher among the arguments passed on to the module.

  `run ... -- --config=... --dry_run` would otherwise hand `--dry_run` to the
  training command and really call gcloud; `--workdir` there would silently
  override the launcher's own.
  """
  own = {name for name in vars(args) if name not in ('action', 'train_args')}
  for arg in train_args:
    name = arg[2:].split('=', 1)[0] if arg.startswith('--') else ''
    if name in own:
      raise ValueError(
          f'--{name} is a flag of `python -m launch.tpu_vm {args.action}`, but it comes after '
          f'the arguments for `python -m {args.module}` begin; put it before `--`: '
          f'`python -m launch.tpu_vm {args.action} ... {arg} -- <arguments for {args.module}>`.')


def commands(args: argparse.Namespace) -> list[list[str]]:
  """The gcloud argv lists a parsed command line stands for, in order."""
  check_name(args.name, 'TPU name')
  if args.action == 'create':
    return [create_command(args)]
  if args.action == 'setup':
    return [ssh_command(args, setup_remote(args.repo, args.revision, args.extras, args.python))]
  if args.action == 'run':
    train_args = list(args.train_args)
    if train_args[:1] == ['--']:
      train_args = train_args[1:]
    check_no_launcher_flags(args, train_args)
    remote = run_remote(args.run_name, args.workdir, train_args, module=args.module,
                        data=args.data, foreground=args.foreground, env=args.env)
    return [ssh_command(args, remote)]
  if args.action == 'logs':
    if args.fetch_to:
      return fetch_commands(args)
    return [ssh_command(args, logs_remote(args.run_name, args.follow, args.lines),
                        worker=args.worker)]
  if args.action == 'stop':
    return [ssh_command(args, stop_remote(args.run_name))]
  if args.action == 'delete':
    return [delete_command(args)]
  raise ValueError(f'Unknown action {args.action!r}.')


class _Parser(argparse.ArgumentParser):
  """argparse with its usage errors as one `error:` line (status 2), like every entry point."""

  def error(self, message: str):
    self.exit(EXIT_USAGE, f'error: {message} (see `{self.prog} --help`)\n')


def parser() -> argparse.ArgumentParser:
  top = _Parser(prog='python -m launch.tpu_vm', description=__doc__.split('\n')[0])
  sub = top.add_subparsers(dest='action', required=True)

  def add(name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    p.add_argument('--name', required=True, help='TPU VM (and queued resource) name.')
    p.add_argument('--zone', required=True, help='e.g. us-central2-b (v4), us-east5-a (v5p).')
    p.add_argument('--project', default=None, help='GCP project (default: gcloud config).')
    p.add_argument('--dry_run', action='store_true', help='Print the gcloud commands only.')
    return p

  p = add('create', 'Create a TPU VM or a queued resource.')
  p.add_argument('--accelerator_type', required=True, help='e.g. v4-8, v5p-32.')
  p.add_argument('--runtime_version', default=None,
                 help='Software image (default per generation: ' +
                 ', '.join(f'{k}: {v}' for k, v in RUNTIME_VERSIONS.items()) + ').')
  p.add_argument('--provisioning', choices=PROVISIONING, default='on-demand',
                 help='spot: cheaper, can be preempted; reserved: your reservation; '
                 'best-effort: queued resources only.')
  p.add_argument('--queued', action='store_true',
                 help='Request a queued resource (waits for capacity) instead of a TPU VM.')

  p = add('setup', 'On every worker: clone the repo at a revision, make a venv, install.')
  p.add_argument('--repo', required=True, help='git URL of strata.')
  p.add_argument('--revision', default='main', help='Branch, tag or commit to install.')
  p.add_argument('--extras', default='tpu', help='setup.py extras to install (tpu brings libtpu).')
  p.add_argument('--python', default='python3.11',
                 help='Interpreter for the venv; installed with apt if missing.')

  p = add('run', 'On every worker, the same training command with a GCS workdir.')
  p.add_argument('--run_name', required=True, help='Names the log and pid files.')
  p.add_argument('--workdir', required=True, help='gs://bucket/path: checkpoints, metrics.')
  p.add_argument('--data', default=None,
                 help=f'gs:// copy of a prepared data workdir, synced to {DATA_DIR} first.')
  p.add_argument('--module', default='train', help='python -m MODULE (default: train).')
  p.add_argument('--env', action='append', default=[], help='NAME=value to export; repeatable.')
  p.add_argument('--foreground', action='store_true',
                 help='Stay attached and stream output (the run dies with the ssh session).')
  p.add_argument('train_args', nargs=argparse.REMAINDER,
                 help='After --: arguments for the module, e.g. --config=configs/pretrain.py:7b.')

  p = add('logs', 'Show, follow or fetch the log of a run.')
  p.add_argument('--run_name', required=True)
  p.add_argument('--worker', default='0', help='Worker to read ("all" interleaves them).')
  p.add_argument('--follow', action='store_true', help='Keep streaming (tail --follow).')
  p.add_argument('--lines', type=int, default=100)
  p.add_argument('--fetch_to', default=None, help='Copy each worker\'s log into this folder.')
  p.add_argument('--num_workers', type=int, default=1, help='With --fetch_to: how many workers.')

  p = add('stop', 'Stop a detached run on every worker.')
  p.add_argument('--run_name', required=True)

  p = add('delete', 'Delete the TPU VM (or the queued resource with --queued).')
  p.add_argument('--queued', action='store_true')
  return top


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  try:
    argvs = commands(args)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return EXIT_USAGE
  for command in argvs:
    print(shlex.join(command), flush=True)
    if args.dry_run:
      continue
    if args.action == 'logs' and args.fetch_to:
      os.makedirs(args.fetch_to, exist_ok=True)
    try:
      status = subprocess.run(command, check=False).returncode
    except FileNotFoundError:
      print('error: gcloud is not on PATH: install the Google Cloud CLI '
            '(https://cloud.google.com/sdk/docs/install), or see the commands with --dry_run',
            file=sys.stderr)
      return 127  # what a shell returns for a command it cannot find
    if status != 0:
      print(f'error: gcloud exited with status {status}; its message and the command are above',
            file=sys.stderr)
      return status
  return 0


if __name__ == '__main__':
  sys.exit(main())
