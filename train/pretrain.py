"""Pre-training: next-token prediction on a prepared corpus, with the shared loop.

`train(config, workdir)` is what `python -m train` runs: the shared stage
runner (train/stage.py) with pre-training's config checks, its data (the
embedded `stdlib` corpus is built first if its `DONE` marker is missing) and
the default next-token loss. config.json holds a local `data.workdir` made
absolute, so generate and evaluate find the data from any directory.

The run and data workdirs may be Cloud Storage URLs (`gs://bucket/run`, as
on a TPU pod): every file here goes through `etils.epath` and a URL is never
made "absolute" (see `train.paths`).
"""

from __future__ import annotations

from etils import epath
import ml_collections

from configs import pretrain as pretrain_config
from configs.cli import UserError
from train import loop
from train import paths
from train import stage as stage_lib


def ensure_data(config: ml_collections.ConfigDict) -> None:
  """Builds the embedded corpus if it is the configured one and is missing."""
  data_workdir = config.data.workdir
  if (epath.Path(data_workdir) / 'DONE').exists():
    return
  if config.data.get('preset', None) == 'stdlib' and paths.is_remote(data_workdir):
    # The data pipeline writes local files only; building "into" a URL would
    # leave a local folder named gs:.
    raise UserError(
        f'No prepared data in data.workdir={data_workdir} (no DONE). Build it locally and copy '
        f'it there: python -m data_pipeline --config=configs/data.py:stdlib --workdir=runs/data '
        f'&& gcloud storage rsync --recursive runs/data {data_workdir}')
  if config.data.get('preset', None) == 'stdlib':
    from data_pipeline import pipeline  # pylint: disable=g-import-not-at-top
    print(f'Data in {data_workdir} is not prepared; building the stdlib corpus first.',
          flush=True)
    pipeline.ensure_prepared(data_workdir, preset='stdlib')
    return
  if not (epath.Path(data_workdir) / 'tfds').is_dir():
    raise UserError(
        f'No prepared data in data.workdir={data_workdir} (no tfds/ and no DONE); run '
        f'`python -m data_pipeline --config=configs/data.py:{config.data.get("preset", "files")} '
        f'--workdir={data_workdir}` first.')


STAGE = stage_lib.Stage(name='pretrain', validate=pretrain_config.validate,
                        prepare_data=ensure_data)


def train(config: ml_collections.ConfigDict, workdir: str) -> loop.LoopResult:
  """Pre-trains per `config` in `workdir`, resuming from its latest checkpoint.

  Everything that can be checked is checked before the first file of the run
  is written, and config.json / tokenizer.model / data.json are written only
  once the state is restored or initialised (train/stage.py, train/run_files.py).
  """
  return stage_lib.run(STAGE, config, workdir)


summary = stage_lib.summary
