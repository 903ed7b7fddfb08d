"""Device mesh, logical-axis rules, and the shardings of state and batches.

Parameters name their axes logically (`vocab, embed, heads, kv, mlp`); one
rules table maps those names to mesh axes. With the default rules the mesh
has one `data` axis over all devices: the batch is split over it and the
state is replicated (data parallelism).
"""
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

# logical axis -> mesh axis (None: replicated).
RULES = (
    ('batch', 'data'),
    ('length', None),
    ('vocab', None),
    ('embed', None),
    ('heads', None),
    ('kv', None),
    ('mlp', None),
)


def make_mesh(config) -> Mesh:
  """A mesh with a `data` axis of `config.mesh.data` devices (-1: all)."""
  devices = jax.devices()
  size = config.mesh.data if config.mesh.data != -1 else len(devices)
  if size != len(devices):
    raise ValueError(f'mesh.data={config.mesh.data} does not match the '
                     f'{len(devices)} devices; use -1 to take them all.')
  return Mesh(np.asarray(devices).reshape(size), ('data',))


def check_batch_size(batch_size: int, mesh: Mesh):
  n = mesh.shape['data']
  if batch_size % n or batch_size % jax.process_count():
    raise ValueError(
        f'batch_size={batch_size} must be divisible by the {n} data-parallel '
        f'devices and the {jax.process_count()} processes; try '
        f'--config.batch_size={max(n, (batch_size // n) * n)}.')


def logical_to_mesh(spec: P) -> P:
  rules = dict(RULES)
  return P(*(rules.get(name) if name else None for name in spec))


def param_shardings(mesh: Mesh, logical_specs):
  """NamedShardings for a tree of logical PartitionSpecs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh(s)),
                      logical_specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh(P('batch', 'length')))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's rows -> global arrays sharded over the data axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}
