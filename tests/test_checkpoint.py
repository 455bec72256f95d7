"""Checkpointer: round trip, retention (latest N + best), corrupt steps, other meshes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import guards

from train import checkpoint


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict
  opt_state: dict
  rng: jax.Array


def _state(step: int) -> _State:
  params = {'w': jnp.arange(2048.0).reshape(32, 64) + step, 'b': jnp.ones((64,)) * step}
  return _State(step=jnp.array(step, jnp.int32), params=params,
                opt_state={'mu': jax.tree.map(jnp.zeros_like, params)},
                rng=jax.random.key(step))


def _abstract() -> _State:
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      _state(0))


def _assert_state_equal(a: _State, b: _State) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_loader_state(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), keep=2)
  ckpt.save(3, _state(3), {'epoch': 1, 'index': 17}, {'train/loss': 2.5})
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), keep=2)
  state, loader_state = ckpt.restore_latest(_abstract())
  _assert_state_equal(state, _state(3))
  assert loader_state == {'epoch': 1, 'index': 17}
  assert ckpt.metadata(3)['metrics'] == {'train/loss': 2.5}
  assert ckpt.save(3, _state(3)) is False  # An existing step is never overwritten.


def test_empty_directory_restores_nothing(tmp_path):
  assert checkpoint.Checkpointer(str(tmp_path / 'ckpt')).restore_latest(_abstract()) is None


def test_keeps_latest_n_plus_best_eval_loss(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), keep=2)
  evals = {10: 3.0, 20: 1.5, 30: None, 40: 2.0, 50: None, 60: None}
  for step, loss in evals.items():
    ckpt.save(step, _state(step), {}, {'train/loss': 1.0, 'eval/loss': loss})
    ckpt.wait()
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'), keep=2)
  assert ckpt.all_steps() == [20, 50, 60]
  assert ckpt.best_step() == 20


def _truncate_largest_array_file(step_dir: str) -> None:
  files = []
  for root, _, names in os.walk(os.path.join(step_dir, 'state')):
    # Array data lives in the OCDBT `d/` folders.
    files += [os.path.join(root, n) for n in names if os.path.basename(root) == 'd']
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)


@pytest.mark.parametrize('damage', ['truncate', 'commit_marker', 'loader_file'])
def test_corrupt_latest_falls_back_to_previous(tmp_path, capsys, damage):
  directory = str(tmp_path / 'ckpt')
  ckpt = checkpoint.Checkpointer(directory, keep=3)
  ckpt.save(1, _state(1), {'index': 1})
  ckpt.save(2, _state(2), {'index': 2})
  ckpt.close()
  step_dir = os.path.join(directory, '2')
  if damage == 'truncate':
    _truncate_largest_array_file(step_dir)
  elif damage == 'commit_marker':
    os.remove(os.path.join(step_dir, 'commit_success.txt'))
  else:
    os.remove(os.path.join(step_dir, 'loader', 'process_0-of-1.json'))

  ckpt = checkpoint.Checkpointer(directory, keep=3)
  state, loader_state = ckpt.restore_latest(_abstract())
  _assert_state_equal(state, _state(1))
  assert loader_state == {'index': 1}
  err = capsys.readouterr().err
  assert f'Checkpoint step 2 at {step_dir}' in err
  assert 'Falling back to the previous checkpoint' in err
  # The bad step is moved aside, so training can write step 2 again.
  assert ckpt.all_steps() == [1]
  assert os.listdir(directory + '.corrupt')
  assert ckpt.save(2, _state(2), {'index': 2})
  ckpt.close()


def test_loader_state_of_another_process_count_is_applied(tmp_path):
  # The loader state is the same on every process, so any process's file will do.
  directory = str(tmp_path / 'ckpt')
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(4, _state(4), {'index': 4})
  ckpt.close()
  loader_dir = os.path.join(directory, '4', 'loader')
  assert 'process_0-of-1.json' in os.listdir(loader_dir)
  os.rename(os.path.join(loader_dir, 'process_0-of-1.json'),
            os.path.join(loader_dir, 'process_1-of-2.json'))
  state, loader_state = checkpoint.Checkpointer(directory).restore_latest(_abstract())
  _assert_state_equal(state, _state(4))
  assert loader_state == {'index': 4}


def test_restore_params_only(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'ckpt'))
  ckpt.save(5, _state(5), {})
  ckpt.close()
  abstract_params = _abstract().params
  reader = checkpoint.Checkpointer(str(tmp_path / 'ckpt'))
  step, params = reader.restore_params(None, abstract_params)
  assert step == 5
  np.testing.assert_array_equal(np.asarray(params['w']), np.asarray(_state(5).params['w']))


_CROSS_MESH = textwrap.dedent('''
  import sys
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from train import checkpoint
  directory = sys.argv[1]
  devices = np.array(jax.devices())
  assert devices.size == 8
  mesh_a = Mesh(devices.reshape(8, 1), ('fsdp', 'tensor'))
  w = jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32)
  state = {'w': jax.device_put(w, NamedSharding(mesh_a, P('fsdp', 'tensor'))),
           'step': jnp.array(7)}
  ckpt = checkpoint.Checkpointer(directory)
  ckpt.save(7, state, {'index': 7})
  ckpt.close()
  mesh_b = Mesh(devices.reshape(2, 4), ('fsdp', 'tensor'))
  shardings = {'w': NamedSharding(mesh_b, P('tensor', 'fsdp')), 'step': NamedSharding(mesh_b, P())}
  restored, loader_state = checkpoint.Checkpointer(directory).restore_latest(
      checkpoint.abstract_like(state, shardings))
  assert restored['w'].sharding == shardings['w'], restored['w'].sharding
  np.testing.assert_array_equal(np.asarray(restored['w']), np.asarray(w))
  assert int(restored['step']) == 7 and loader_state == {'index': 7}
  one = jax.sharding.SingleDeviceSharding(jax.devices()[3])
  restored, _ = checkpoint.Checkpointer(directory).restore_latest(
      checkpoint.abstract_like(state, {'w': one, 'step': one}))
  assert restored['w'].sharding == one
  np.testing.assert_array_equal(np.asarray(restored['w']), np.asarray(w))
  print('OK')
''')


def test_restores_onto_a_different_mesh(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _CROSS_MESH, str(tmp_path / 'ckpt')],
                          env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0 and 'OK' in result.stdout, result.stderr[-3000:]


def _two_steps(directory: str) -> None:
  ckpt = checkpoint.Checkpointer(directory, keep=3)
  ckpt.save(1, _state(1), {'index': 1})
  ckpt.save(2, _state(2), {'index': 2})
  ckpt.close()


def _step_files(directory) -> dict[str, object]:
  return guards.snapshot(directory)


@pytest.mark.parametrize('change', ['shape', 'extra_key', 'missing_key'])
def test_a_state_tree_mismatch_names_the_keys_and_moves_nothing(tmp_path, change):
  directory = str(tmp_path / 'ckpt')
  _two_steps(directory)
  before = _step_files(directory)
  abstract = _abstract()
  params = dict(abstract.params)
  if change == 'shape':
    params['w'] = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=params['w'].sharding)
    expected = r'params/w has shape \(32, 64\) in the checkpoint but \(16, 64\) in this run'
  elif change == 'extra_key':
    params['new'] = params['b']
    expected = 'params/new is in this run but not in the checkpoint'
  else:
    del params['b']
    expected = 'params/b is in the checkpoint but not in this run'
  abstract = abstract.replace(params=params)
  ckpt = checkpoint.Checkpointer(directory, keep=3)
  with pytest.raises(checkpoint.CheckpointMismatchError, match=expected) as info:
    ckpt.restore_latest(abstract)
  assert f'{directory}/2' in str(info.value)
  # Restoring only the params (generate / evaluate / init_from) checks the same.
  with pytest.raises(checkpoint.CheckpointMismatchError, match=expected):
    ckpt.restore_params(None, abstract.params)
  ckpt.close()
  assert not os.path.exists(directory + '.corrupt')
  assert _step_files(directory) == before


def _failing_restore(ckpt, errors):
  """Makes the manager's restore raise `errors` in turn, then work."""
  real = ckpt._manager.restore
  calls = []

  def restore(step, args=None):
    calls.append(step)
    if errors:
      raise errors.pop(0)
    return real(step, args=args)

  ckpt._manager.restore = restore
  return calls


def test_transient_read_errors_are_retried(tmp_path, monkeypatch):
  monkeypatch.setattr(checkpoint, 'RETRY_SECONDS', 0.0)
  directory = str(tmp_path / 'ckpt')
  _two_steps(directory)
  ckpt = checkpoint.Checkpointer(directory, keep=3)
  calls = _failing_restore(ckpt, [TimeoutError('read timed out'),
                                  ValueError('UNAVAILABLE: backend error 503')])
  state, loader_state = ckpt.restore_latest(_abstract())
  _assert_state_equal(state, _state(2))
  assert calls == [2, 2, 2] and loader_state == {'index': 2}
  ckpt.close()


@pytest.mark.parametrize('error', [
    TimeoutError('read timed out'),                       # transient, but it persists
    RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to allocate'),
    ValueError('some error nobody foresaw'),
])
def test_other_restore_errors_fail_loudly_and_move_nothing(tmp_path, monkeypatch, error):
  monkeypatch.setattr(checkpoint, 'RETRY_SECONDS', 0.0)
  directory = str(tmp_path / 'ckpt')
  _two_steps(directory)
  before = _step_files(directory)
  ckpt = checkpoint.Checkpointer(directory, keep=3)
  _failing_restore(ckpt, [error] * checkpoint.RESTORE_ATTEMPTS)
  with pytest.raises(checkpoint.CheckpointError, match=f'{directory}/2.*left in place'):
    ckpt.restore_latest(_abstract())
  ckpt.close()
  assert not os.path.exists(directory + '.corrupt')
  assert _step_files(directory) == before
