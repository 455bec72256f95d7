"""Run and data workdirs on Cloud Storage (`gs://bucket/run`) are not mangled.

`gs://` is served here by an in-memory fsspec filesystem registered under the
`gs`/`gcs` protocols, the route epath takes without TensorFlow, so every byte
the run modules write under a `gs://` workdir lands in memory and can be read
back. Meanwhile `os.path.abspath`, `os.makedirs` and `open` fail the test if a
`gs:` path reaches them, and the working directory must not grow a local
`gs:` folder.
"""

from __future__ import annotations

import builtins
import json
import os
import re

from etils import epath
import fsspec
from fsspec.implementations import memory
import jax.numpy as jnp
import ml_collections
import pytest

from data_pipeline import tokenizer as tokenizer_lib
from train import checkpoint
from train import evaluate
from train import generate
from train import metrics
from train import paths
from train import plot
from train import pretrain
from train import stage as stage_lib
from train import run_dir
from train import run_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ('train/pretrain.py', 'train/stage.py', 'train/checkpoint.py', 'train/metrics.py', 'train/run_dir.py',
           'train/evaluate.py', 'train/generate.py', 'train/plot.py', 'train/run_files.py')


class _MemoryGCS(memory.MemoryFileSystem):
  """`gs://bucket/key` kept in a dict of its own (not shared with `memory://`)."""
  protocol = ('gs', 'gcs')
  store = {}
  pseudo_dirs = ['']

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ('gs://', 'gcs://'):
      if path.startswith(prefix):
        path = path[len(prefix):]
    path = path.strip('/')
    return '/' + path if path else ''


def _is_gs(path) -> bool:
  try:
    return 'gs:' in os.fspath(path)
  except TypeError:  # a file descriptor
    return False


@pytest.fixture
def gcs(monkeypatch, tmp_path):
  """In-memory gs://; local-path functions refuse gs: paths."""
  _MemoryGCS.store.clear()
  _MemoryGCS.pseudo_dirs[:] = ['']
  for name in _MemoryGCS.protocol:
    fsspec.register_implementation(name, _MemoryGCS, clobber=True)
  epath.backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  # Orbax asks the real GCS API whether a bucket has a hierarchical namespace.
  from orbax.checkpoint._src.path import gcs_utils  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)

  def guard(name, fn):
    def wrapped(path, *args, **kwargs):
      if _is_gs(path):
        raise AssertionError(f'{name}({os.fspath(path)!r}) got a Cloud Storage path')
      return fn(path, *args, **kwargs)
    return wrapped

  monkeypatch.setattr(os.path, 'abspath', guard('os.path.abspath', os.path.abspath))
  monkeypatch.setattr(os, 'makedirs', guard('os.makedirs', os.makedirs))
  monkeypatch.setattr(builtins, 'open', guard('open', builtins.open))
  monkeypatch.chdir(tmp_path)
  yield epath.Path('gs://bucket')
  assert not (tmp_path / 'gs:').exists(), 'a gs:// path became a local folder'
  epath.backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def _log(writer: metrics.MetricsWriter, steps) -> None:
  for step in steps:
    writer.write(step, {'train/loss': 1.0 / step, 'eval/loss': float('nan')}, print_line=False)


def test_paths_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve_str('gs://bucket/run') == 'gs://bucket/run'
  assert paths.resolve_str('runs/x') == os.path.join(str(tmp_path), 'runs', 'x')
  assert paths.is_remote('gs://b') and not paths.is_remote('gs_local/b')


def test_metrics_on_gcs_match_local_file_and_truncate_on_resume(gcs, tmp_path):
  local = tmp_path / 'local_run'
  remote = os.fspath(gcs / 'run')
  for workdir in (str(local), remote):
    writer = metrics.MetricsWriter(workdir, start_step=0, console=False)
    _log(writer, range(1, 6))
    writer.close()
    # Resumed from step 3: steps 4 and 5 of the interrupted run are dropped.
    writer = metrics.MetricsWriter(workdir, start_step=3, console=False)
    _log(writer, [4])
    writer.close()
  remote_text = (gcs / 'run' / metrics.METRICS_FILE).read_text()
  assert remote_text == (local / metrics.METRICS_FILE).read_text()
  assert [r['step'] for r in metrics.read_metrics(remote)] == [1, 2, 3, 4]
  assert len(remote_text.splitlines()) == 4  # one JSON line per logged step
  # TensorBoard events were written locally and copied to the bucket.
  events = list((gcs / 'run' / metrics.TENSORBOARD_DIR).iterdir())
  assert events and all(e.name.startswith('events.out.tfevents') for e in events)
  assert all(e.stat().length > 0 for e in events)


def test_metrics_on_gcs_are_rewritten_while_running(gcs):
  writer = metrics.MetricsWriter(os.fspath(gcs / 'run'), console=False, tensorboard=False,
                                 remote_sync_seconds=0)
  _log(writer, [1, 2])
  # Visible before close: the object is rewritten whole once the interval has passed.
  assert [r['step'] for r in metrics.read_metrics(os.fspath(gcs / 'run'))] == [1, 2]
  writer.close()


def test_config_and_tokenizer_on_gcs(gcs, tmp_path):
  prefix = tokenizer_lib.train_tokenizer(
      ['def parse(line):\n  return line.split()\n'] * 50 + ['the quick brown fox\n'] * 50,
      str(tmp_path / 'tok'), vocab_size=300)
  data = gcs / 'data'
  data.mkdir(parents=True)
  (data / 'DONE').write_text('')
  (data / 'tfds').mkdir()
  (data / 'tfds' / 'marker').write_text('')
  with builtins.open(prefix, 'rb') as f:
    model_bytes = f.read()
  (data / 'tokenizer.model').write_bytes(model_bytes)
  (data / 'tokenizer.vocab').write_text('vocab')

  run = os.fspath(gcs / 'run')
  config = ml_collections.ConfigDict({
      'data': {'workdir': os.fspath(data), 'preset': 'files'},
      'model': {'vocab_size': 512}, 'seq_len': 8})
  with config.unlocked():
    config.data.workdir = paths.resolve_str(config.data.workdir)
  pretrain.ensure_data(config)  # DONE is found in the bucket: nothing to build
  config.model.vocab_size = 300
  tokenizer = run_files.read_tokenizer(config)
  run_files.record_start(config, run, tokenizer, {'tokenizer_sha256': 'x'})
  assert (gcs / 'run' / 'tokenizer.model').read_bytes() == model_bytes
  assert (gcs / 'run' / 'tokenizer.vocab').read_text() == 'vocab'

  assert json.loads((gcs / 'run' / 'data.json').read_text()) == {'tokenizer_sha256': 'x'}
  # A changed config on resume keeps the previous one as config.1.json.
  config.seq_len = 16
  run_files.write_config(config, run)
  assert json.loads((gcs / 'run' / 'config.1.json').read_text())['seq_len'] == 8
  loaded = run_dir.load_config(run)
  assert loaded.seq_len == 16 and loaded.data.workdir == 'gs://bucket/data'
  path = run_dir.tokenizer_path(loaded, run)
  assert path == run + '/tokenizer.model'
  tok = tokenizer_lib.Tokenizer.from_bytes(epath.Path(path).read_bytes(), path)
  assert tok.decode(tok.encode('def parse(x)')) == 'def parse(x)'
  data_dir = evaluate._data_dir(loaded, run, None)  # pylint: disable=protected-access
  assert data_dir == 'gs://bucket/data'

  config.model.vocab_size = 100
  with pytest.raises(ValueError, match='model.vocab_size'):
    run_files.read_tokenizer(config)

  # Unprepared stdlib data in a bucket: a clear error, not a local gs: folder.
  config.data.workdir = 'gs://bucket/nodata'
  config.data.preset = 'stdlib'
  with pytest.raises(ValueError, match='gs://bucket/nodata'):
    pretrain.ensure_data(config)


def test_pretrain_start_keeps_gcs_workdirs(gcs, tmp_path, monkeypatch):
  from configs import pretrain as pretrain_configs  # pylint: disable=g-import-not-at-top
  prefix = tokenizer_lib.train_tokenizer(
      ['def parse(line):\n  return line.split()\n'] * 50 + ['the quick brown fox\n'] * 50,
      str(tmp_path / 'tok'), vocab_size=300)
  data = gcs / 'data'
  (data / 'tfds').mkdir(parents=True)
  (data / 'tfds' / 'marker').write_text('')
  with builtins.open(prefix, 'rb') as f:
    (data / 'tokenizer.model').write_bytes(f.read())
  config = pretrain_configs.get_config('tiny')
  with config.unlocked():
    config.data.workdir = 'gs://bucket/data'
    config.data.preset = 'files'
    config.model.vocab_size = 300

  class Stop(Exception):
    pass

  loaders = []

  def make_loader(data_dir, *args, **kwargs):
    del args, kwargs
    assert data_dir == 'gs://bucket/data'
    loaders.append(data_dir)

  def run(**kwargs):   # the loop's start: the run's files are written once it is ready
    kwargs['on_ready']()
    raise Stop()

  monkeypatch.setattr(stage_lib.loader_lib, 'make_loader', make_loader)
  monkeypatch.setattr(stage_lib.loop, 'run', run)
  with pytest.raises(Stop):
    pretrain.train(config, 'gs://bucket/run')
  saved = json.loads((gcs / 'run' / 'config.json').read_text())
  assert saved['data']['workdir'] == 'gs://bucket/data'
  assert (gcs / 'run' / 'tokenizer.model').exists()


def test_checkpointer_files_on_gcs(gcs, tmp_path):
  # Orbax writes arrays through TensorStore, whose gs:// driver needs the real
  # service; so the step is written locally and uploaded, and what is tested on
  # gs:// is the Checkpointer's own file handling.
  local = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), async_save=False)
  local.save(1, {'w': jnp.ones(2)}, {'position': 3}, {'eval/loss': 1.5})
  local.save(2, {'w': jnp.ones(2)}, {'position': 5}, {'eval/loss': 1.0})
  local.close()
  for root, _, names in os.walk(tmp_path / 'checkpoints'):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), tmp_path)
      (gcs / 'run' / rel).parent.mkdir(parents=True, exist_ok=True)
      with builtins.open(os.path.join(root, name), 'rb') as f:
        (gcs / 'run' / rel).write_bytes(f.read())

  ckpt = checkpoint.Checkpointer(os.fspath(gcs / 'run' / 'checkpoints'), async_save=False)
  assert ckpt.directory == 'gs://bucket/run/checkpoints'
  assert ckpt.all_steps() == [1, 2]
  assert ckpt.metadata(2)['metrics']['eval/loss'] == 1.0
  assert ckpt.best_step() == 2
  ckpt.check_step(2)
  handler = checkpoint.LoaderStateHandler()
  assert handler.restore(gcs / 'run' / 'checkpoints' / '2' / 'loader') == {'position': 5}
  handler.save(gcs / 'run' / 'loader_copy', checkpoint.LoaderSave({'position': 7}))
  assert handler.restore(gcs / 'run' / 'loader_copy') == {'position': 7}

  # A truncated step is named, then moved aside inside the bucket.
  (gcs / 'run' / 'checkpoints' / '2' / 'state' / '_METADATA').write_text('')
  with pytest.raises(checkpoint.CheckpointError, match=r'step 2 at gs://bucket/run/checkpoints/2'):
    ckpt.check_step(2)
  ckpt._quarantine(2)  # pylint: disable=protected-access
  assert ckpt.all_steps() == [1]
  moved = list((gcs / 'run' / 'checkpoints.corrupt').iterdir())
  assert [p.name.split('-')[0] for p in moved] == ['2']
  assert (moved[0] / 'loader').is_dir()


def test_plot_reads_and_writes_gcs(gcs):
  writer = metrics.MetricsWriter(os.fspath(gcs / 'run'), console=False, tensorboard=False)
  for step in range(1, 11):
    writer.write(step, {'train/loss': 3.0 / step, 'tokens': 64 * step,
                        'train/learning_rate': 1e-3, 'perf/tokens_per_sec': 100.0},
                 print_line=False)
  writer.write(10, {'eval/loss': 0.5}, print_line=False)
  writer.close()
  written = plot.plot_run(os.fspath(gcs / 'run'))
  assert written and all(p.startswith('gs://bucket/run/plots/') for p in written)
  for p in written:
    assert epath.Path(p).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('module', [evaluate, generate])
def test_entry_points_join_the_distributed_runtime_first(module, monkeypatch):
  class Joined(Exception):
    pass

  def initialize():
    raise Joined()

  monkeypatch.setattr(module.distributed, 'initialize_from_flags', initialize)
  with pytest.raises(Joined):
    module.main(['prog'])


def test_run_modules_do_file_io_through_epath():
  """A guard beside the tests above: no bare local-only file calls come back."""
  banned = re.compile(r'(?<![\w.])open\(|os\.makedirs\(|os\.path\.(exists|isdir|isfile|abspath)\('
                      r'|os\.replace\(|os\.listdir\(|shutil\.(copy|move)')
  for rel in MODULES:
    with builtins.open(os.path.join(REPO, rel)) as f:
      for number, line in enumerate(f, 1):
        code = line.split('#')[0]
        assert not banned.search(code), f'{rel}:{number}: {line.strip()}'
