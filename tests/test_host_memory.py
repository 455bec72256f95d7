"""train.host_memory: `python -m` commands re-execute with glibc's huge-page tunable on CPU hosts."""

import os
import subprocess
import sys
import textwrap

import pytest

from train import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = dict(system='Linux', glibc_ok=True)


def test_cpu_only_reads_jax_platforms_then_the_device_files(tmp_path):
  none = (str(tmp_path / 'accel*'),)
  (tmp_path / 'nvidia0').touch()
  gpu = (str(tmp_path / 'nvidia[0-9]*'),)
  assert host_memory.cpu_only({}, none)
  assert not host_memory.cpu_only({}, gpu)
  assert host_memory.cpu_only({'JAX_PLATFORMS': 'cpu'}, gpu)
  assert not host_memory.cpu_only({'JAX_PLATFORMS': 'tpu,cpu'}, none)


def test_the_environment_adds_the_tunable_only_where_it_should(tmp_path, capsys):
  none = (str(tmp_path / 'nothing*'),)
  (tmp_path / 'accel0').touch()
  tpu = (str(tmp_path / 'accel*'),)
  env = host_memory.huge_pages_environment({'HOME': '/h'}, none, **LINUX)
  assert env == {'HOME': '/h', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  # Other tunables are kept; a hugetlb setting of the user's (or of the re-executed
  # process itself) stops it.
  env = host_memory.huge_pages_environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'},
                                           none, **LINUX)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  assert host_memory.huge_pages_environment({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'},
                                            none, **LINUX) is None
  assert host_memory.huge_pages_environment({}, tpu, **LINUX) is None  # an accelerator host
  assert host_memory.huge_pages_environment({'STRATA_HUGE_PAGES': '1'}, tpu, **LINUX)
  assert host_memory.huge_pages_environment({'STRATA_HUGE_PAGES': '0'}, none, **LINUX) is None
  assert host_memory.huge_pages_environment({}, none, system='Darwin', glibc_ok=False) is None
  assert host_memory.huge_pages_environment({}, none, system='Linux', glibc_ok=False) is None
  assert host_memory.huge_pages_environment({'STRATA_HUGE_PAGES': 'yes'}, none, **LINUX) is None
  assert "STRATA_HUGE_PAGES='yes' is not 0 or 1" in capsys.readouterr().err


def _show_env(tmp_path, **env):
  """Runs `python -m pkg.show` for a package that imports train first; its stdout."""
  pkg = tmp_path / 'pkg'
  pkg.mkdir(exist_ok=True)
  (pkg / '__init__.py').write_text('import train\n')
  (pkg / 'show.py').write_text(textwrap.dedent("""
      import os, sys
      print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:], sys.stdin.read().strip())
  """))
  environ = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'STRATA_HUGE_PAGES')}
  environ.update(PYTHONPATH=f'{tmp_path}:{REPO}', JAX_PLATFORMS='cpu', **env)
  out = subprocess.run([sys.executable, '-m', 'pkg.show', '--flag=1'], input='from stdin',
                       capture_output=True, text=True, env=environ, check=True, cwd=tmp_path)
  return out.stdout.strip()


@pytest.mark.skipif(host_memory.huge_pages_environment({'JAX_PLATFORMS': 'cpu'}) is None,
                    reason='not Linux with glibc >= 2.35')
def test_a_dash_m_command_reexecutes_once_with_its_arguments_and_stdin(tmp_path):
  assert _show_env(tmp_path) == "glibc.malloc.hugetlb=1 ['--flag=1'] from stdin"
  assert _show_env(tmp_path, STRATA_HUGE_PAGES='0') == "['--flag=1'] from stdin"


def test_importing_train_outside_dash_m_changes_nothing():
  out = subprocess.run([sys.executable, '-c', 'import os, train; '
                        "print(repr(os.environ.get('GLIBC_TUNABLES', '')))"],
                       capture_output=True, text=True, check=True, cwd=REPO,
                       env={**{k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'},
                            'JAX_PLATFORMS': 'cpu'})
  assert out.stdout.strip() == "''"


def _thp_mode() -> str:
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      return f.read().split('[')[1].split(']')[0]
  except (OSError, IndexError):
    return 'never'


FAULTS = """
import resource, jax, jax.numpy as jnp
def loss(w, x):  # the gradient keeps the 64 MiB x @ w in XLA's scratch buffer
  return jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w.T) ** 2)
f = jax.jit(jax.grad(loss))
# x is narrow: the activations are what fault, and 1/8 of the FLOPs of a square w
# (3 s instead of 13 per run here, with 52k faults instead of 79k).
x, w = jnp.ones((16384, 128), jnp.float32), jnp.full((128, 1024), 0.01, jnp.float32)
f(w, x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(w, x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


@pytest.mark.skipif(_thp_mode() == 'never' or host_memory.huge_pages_environment(
    {'JAX_PLATFORMS': 'cpu'}) is None, reason='no transparent huge pages or glibc < 2.35')
def test_the_tunable_cuts_the_page_faults_of_xla_scratch_memory():
  """What the re-execution is for: XLA:CPU's scratch buffer no longer faults in 4 KiB at a time."""
  def faults(tunables):
    env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
    env.update(JAX_PLATFORMS='cpu', **({'GLIBC_TUNABLES': tunables} if tunables else {}))
    out = subprocess.run([sys.executable, '-c', FAULTS], capture_output=True, text=True,
                         env=env, check=True)
    return int(out.stdout.split()[-1])

  plain, huge = faults(''), faults('glibc.malloc.hugetlb=1')
  assert plain > 30_000  # each 64 MiB in 4 KiB pages is 16k faults per call
  assert huge < plain / 10, (plain, huge)
