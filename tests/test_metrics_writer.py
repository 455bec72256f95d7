"""The metrics writer's start-up: TensorBoard without PyTorch."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tensorboard_writer_does_not_import_torch(tmp_path):
  """tensorboardX imports torch when it can (2-3 s of every start); the writer hides it."""
  code = ('import sys\n'
          'from train import metrics\n'
          f'w = metrics.MetricsWriter({str(tmp_path)!r}, console=False)\n'
          'w.write(1, {"train/loss": 1.5})\n'
          'w.close()\n'
          'assert "tensorboardX" in sys.modules and "torch" not in sys.modules, sorted(sys.modules)\n'
          'import importlib.util\n'
          'if importlib.util.find_spec("torch"):\n'
          '  import torch  # still importable afterwards\n')
  subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True,
                 env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert any((tmp_path / 'tensorboard').iterdir())
