"""Which platform the model is being traced for: the mesh in context, else the default backend.

A train step traced on a CPU host for a TPU topology (`jax.experimental.topologies`,
benchmarks/compile.py) has a TPU mesh in context, so the model picks the TPU
code paths (attention kernels in model/attention.py, the plain matmul gradient
in model/layers.py) even though `jax.default_backend()` is 'cpu'.
"""

from __future__ import annotations

import jax

GPU_PLATFORMS = ('gpu', 'cuda', 'rocm')


def context_mesh() -> jax.sharding.Mesh | jax.sharding.AbstractMesh | None:
  """The mesh in context, None without one.

  The abstract mesh (set by `jax.set_mesh` or `jax.sharding.use_abstract_mesh`;
  it is what is visible inside jit) first, then the legacy `with mesh:`.
  """
  abstract = jax.sharding.get_abstract_mesh()
  if not abstract.empty:
    return abstract
  try:  # `with mesh:` is deprecated but still common; it is not public API.
    from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    legacy = mesh_lib.thread_resources.env.physical_mesh
    if not legacy.empty:
      return legacy
  except (ImportError, AttributeError):
    pass
  return None


def mesh_platform(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None) -> str:
  """'tpu' | 'gpu' | 'cpu' | ... of the devices the model will run on."""
  platform = None
  if isinstance(mesh, jax.sharding.Mesh):
    platform = mesh.devices.flat[0].platform
  elif mesh is not None:
    platform = getattr(getattr(mesh, 'abstract_device', None), 'platform', None)
  platform = (platform or jax.default_backend()).lower()
  return 'gpu' if platform in GPU_PLATFORMS else platform


def current_platform() -> str:
  """The platform of the mesh in context (the default backend without one)."""
  return mesh_platform(context_mesh())
