"""Device mesh, logical-axis rules, and the shardings of state and batches.

The mesh has three axes, outermost first: `data` (replicas that split the
batch), `fsdp` (splits the batch too, and shards parameters and optimizer
state) and `tensor` (splits attention heads and the MLP).
Their sizes come from `config.mesh`, one of them -1 (what the others leave).
Across TPU slices (`mesh.dcn_data` > 1) the data axis is split into an ICI
part inside each slice and a DCN part across slices, as MaxText does.

Parameters and activations name their axes logically (`batch, length, embed,
heads, kv, mlp, vocab`); RULES, the one table, maps those names to mesh
axes. A dimension that its mesh axes do not divide is replicated (logged),
except the ones that matter, which fail at start-up with the numbers.
"""
import math

from absl import logging
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

AXES = ('data', 'fsdp', 'tensor')
# logical axis -> mesh axes (None: replicated). Parameters use embed, heads,
# kv, mlp, vocab (and `layers` under scan_layers); activations use batch,
# length and the same feature names.
RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv', None),
    ('mlp', 'tensor'),
    # Not 'tensor': with the tied embedding split over vocab (tensor) and
    # embed (fsdp) at once, jax 0.10.2 on CPU gave a right loss but wrong
    # gradients (tests/test_sharding.py would catch it); cause not found.
    ('vocab', None),
    ('layers', None),
)
_RULES = dict(RULES)


def mesh_shape(config, num_devices: int) -> dict:
  """{axis: size} of the whole mesh (DCN part folded into `data`)."""
  m = config.mesh
  if m.dcn_data < 1 or num_devices % m.dcn_data:
    raise ValueError(f'mesh.dcn_data={m.dcn_data} does not divide the '
                     f'{num_devices} devices.')
  per_slice = num_devices // m.dcn_data
  sizes = {a: m[a] for a in AXES}
  free = [a for a in AXES if sizes[a] == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f'mesh sizes {sizes}: each must be positive, with at most '
                     'one -1 (filled with what the others leave).')
  known = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if per_slice % known:
      raise ValueError(
          f'mesh {sizes}: the fixed axes ({known} devices) do not divide the '
          f'{per_slice} devices per slice ({num_devices} devices / '
          f'dcn_data={m.dcn_data}).')
    sizes[free[0]] = per_slice // known
  if math.prod(sizes.values()) != per_slice:
    raise ValueError(
        f'mesh data={sizes["data"]} x fsdp={sizes["fsdp"]} x '
        f'tensor={sizes["tensor"]} = {math.prod(sizes.values())} devices, but '
        f'there are {per_slice} per slice ({num_devices} devices / dcn_data='
        f'{m.dcn_data}); set one axis to -1 to take the rest.')
  sizes['data'] *= m.dcn_data
  return sizes


def make_mesh(config, devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh` over `devices` (all)."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(config, len(devices))
  dcn = config.mesh.dcn_data
  ici = (sizes['data'] // dcn, sizes['fsdp'], sizes['tensor'])
  if dcn > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1), devices)
  elif devices[0].platform in ('tpu', 'gpu'):
    # Lays the axes on the physical interconnect (tensor innermost).
    grid = mesh_utils.create_device_mesh(ici, devices)
  else:
    # Process-major order: each host's devices hold a contiguous block of
    # rows, the rows it reads (pipeline.py).
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.asarray(devices).reshape(ici)
  return Mesh(grid, AXES)


def data_parallel_size(mesh: Mesh) -> int:
  """How many ways the batch is split (data x fsdp)."""
  return mesh.shape['data'] * mesh.shape['fsdp']


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum_steps: int = 1):
  """Fails with the numbers unless every micro-batch splits evenly."""
  n = data_parallel_size(mesh)
  procs = jax.process_count()
  if batch_size % n or batch_size % procs:
    raise ValueError(
        f'batch_size={batch_size} must be divisible by the {n} data-parallel '
        f'devices (mesh data={mesh.shape["data"]} x fsdp={mesh.shape["fsdp"]})'
        f' and the {procs} processes; try '
        f'--config.batch_size={max(n, (batch_size // n) * n)}.')
  if grad_accum_steps < 1 or batch_size % (grad_accum_steps * n):
    raise ValueError(
        f'batch_size={batch_size} must split into grad_accum_steps='
        f'{grad_accum_steps} micro-batches each divisible by the {n} '
        f'data-parallel devices (a multiple of {grad_accum_steps * n}).')


def check_model(mcfg, mesh: Mesh):
  """Tensor parallelism must split whole heads and the MLP evenly."""
  t = mesh.shape['tensor']
  for name, size in (('num_heads', mcfg.num_heads),
                     ('mlp_dim', mcfg.mlp_dim),
                     ('hidden_dim', mcfg.hidden_dim)):
    if size % t:
      raise ValueError(f'model {name}={size} is not divisible by mesh '
                       f'tensor={t}.')


def _mesh_axes(name):
  axes = _RULES.get(name) if name else None
  if axes is None:
    return ()
  return axes if isinstance(axes, tuple) else (axes,)


def logical_to_mesh(spec, shape=None, mesh=None) -> P:
  """A logical PartitionSpec -> a mesh one (dims that do not divide: None)."""
  out = []
  for i, name in enumerate(spec):
    axes = _mesh_axes(name)
    if axes and shape is not None and mesh is not None:
      n = math.prod(mesh.shape[a] for a in axes)
      if shape[i] % n:
        logging.warning('Dimension %d (%s) of a %s parameter is not divisible '
                        'by mesh %s=%d: replicated along it.', i, name,
                        tuple(shape), '*'.join(axes), n)
        axes = ()
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def param_shardings(mesh: Mesh, logical_specs, abstract_params):
  """NamedShardings for a tree of logical PartitionSpecs and its shapes."""
  is_spec = lambda x: isinstance(x, P)
  return jax.tree.map(
      lambda s, x: NamedSharding(mesh, logical_to_mesh(s, x.shape, mesh)),
      logical_specs, abstract_params, is_leaf=is_spec)


def constrain(x, *names):
  """Pins an activation's sharding by logical names, under `jax.set_mesh`.

  Outside a (data, fsdp, tensor) mesh (eager, pmap, a plain jit) it does
  nothing, so the model runs anywhere.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_mesh(names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, logical_to_mesh(('batch', 'length')))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's rows -> global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


# pmap: a data-parallel wrapper over the same pure step.
PMAP_AXIS = 'devices'


def pmap_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Global [n, B/n, L] arrays, one slice per device, for the pmapped step."""
  n_local = len(mesh.local_devices)
  sharding = NamedSharding(mesh, P(AXES))
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(
        sharding, v.reshape(n_local, v.shape[0] // n_local, *v.shape[1:]))
  return out


def pmap_step(step_fn):
  """pmap of `step_fn(state, batch, axis_name=...)`: state in and out replicated.

  The batch carries a leading device axis (`pmap_batch`); the step psums
  gradients and metrics over PMAP_AXIS, so what comes out is the same on
  every device and is returned once.
  """
  return jax.pmap(lambda s, b: step_fn(s, b, axis_name=PMAP_AXIS),
                  axis_name=PMAP_AXIS, in_axes=(None, 0),
                  out_axes=(None, None), donate_argnums=0)
