"""Checkpoints: the only module that imports Orbax.

A training checkpoint holds the train state (params, optimizer state, step,
RNG) and the data iterator's position, so a run resumes exactly where it
stopped. Saves are asynchronous; an error in a background save is raised in
the training loop at the next `check`, `save` or `finish`.

Orbax writes each step under a temporary name and renames it when complete,
so a run killed mid-save leaves no checkpoint that `restore_latest` would
choose. A complete checkpoint that cannot be read (a truncated or missing
file) is moved aside to `checkpoints.corrupt/` with a warning, never deleted,
and the previous one is restored instead. A checkpoint of a different model
(other shapes or parameter names) is an error that names the differences and
leaves the checkpoint untouched.

Params-only checkpoints (`save_params`/`restore_params`) carry weights
between runs, e.g. from a converted Hugging Face model (`init_from`).
"""
import contextlib
import logging as std_logging
import os
import shutil
import time

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

CORRUPT_DIR = 'checkpoints.corrupt'


class IncompatibleCheckpointError(ValueError):
  """A checkpoint whose tree or shapes differ from the model being trained."""


def _not_orbax_info(record) -> bool:
  return (record.levelno >= std_logging.WARNING or
          '/orbax/' not in record.pathname)


def quiet_orbax_logs():
  """Orbax logs every stage of every save at INFO; keep its warnings only."""
  logging.get_absl_logger().addFilter(_not_orbax_info)


def manager(workdir: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      enable_async_checkpointing=async_save,
      create=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': ocp.JsonCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict):
  """Starts saving `state` at `step`; raises an earlier save's error first."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=True)


def check(mngr: ocp.CheckpointManager):
  """Raises the error of a background save that failed, if any."""
  mngr.check_for_errors()


def _tree_of(metadata):
  """The tree of array metadata inside Orbax's metadata wrappers."""
  metadata = getattr(metadata, 'item_metadata', metadata)
  return getattr(metadata, 'tree', metadata)


def _describe(leaf) -> str:
  return f'{tuple(leaf.shape)} {leaf.dtype}'


def _path_name(path) -> str:
  """'a/b/0/value' for a tree path of dict keys, attributes or indices alike.

  Orbax's metadata tree is plain dicts where the state has dataclasses and
  NNX Variables, so paths are compared by their names only.
  """
  names = (getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
           for k in path)
  return '/'.join(str(n) for n in names)


def _differences(saved_tree, abstract_tree, limit: int = 8) -> list[str]:
  """Human-readable differences between two trees of shaped leaves."""
  flat = lambda t: {_path_name(p): leaf for p, leaf in
                    jax.tree_util.tree_flatten_with_path(t)[0]}
  saved, expected = flat(saved_tree), flat(abstract_tree)
  # Shallow names first (embeddings before the blocks' many layers).
  order = lambda keys: sorted(keys, key=lambda k: (k.count('/'), k))
  lines = [f'{k}: checkpoint has {_describe(saved[k])}, the model needs '
           f'{_describe(expected[k])}' for k in order(saved.keys() & expected)
           if (tuple(saved[k].shape) != tuple(expected[k].shape) or
               saved[k].dtype != expected[k].dtype)]
  lines += [f'{k}: only in the checkpoint' for k in order(saved.keys() -
                                                          expected.keys())]
  lines += [f'{k}: only in the model' for k in order(expected.keys() -
                                                     saved.keys())]
  if len(lines) > limit:
    lines = lines[:limit] + [f'... and {len(lines) - limit} more']
  return lines


def _quarantine(mngr: ocp.CheckpointManager, step: int) -> str:
  """Moves an unreadable step out of the manager's sight; returns where to."""
  src = os.path.join(str(mngr.directory), str(step))
  dst_root = os.path.join(os.path.dirname(str(mngr.directory)), CORRUPT_DIR)
  dst = os.path.join(dst_root, f'{step}-{int(time.time())}')
  if jax.process_index() == 0:
    os.makedirs(dst_root, exist_ok=True)
    shutil.move(src, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'quarantine checkpoint {step}')
  mngr.reload()
  return dst


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """(state, data_state) of the newest readable checkpoint, or None.

  `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings: the
  state is read straight into that layout. Raises IncompatibleCheckpointError
  if the newest checkpoint was made by a different model.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      saved_tree = _tree_of(mngr.item_metadata(step)['state'])
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Checkpoint %d is unreadable (%s: %s).', step,
                      type(e).__name__, str(e)[:300])
    else:
      # Parameters first: the optimizer state mirrors them.
      differences = (_differences(saved_tree.get('params', {}),
                                  abstract_state.params) or
                     _differences(saved_tree, abstract_state))
      if differences:
        raise IncompatibleCheckpointError(
            f'The checkpoint at step {step} in {mngr.directory} was made by '
            'a different model:\n  ' + '\n  '.join(differences) +
            '\nUse a new --workdir for this model, or the config that made '
            'the checkpoint. The checkpoint was left untouched.')
      logging.info('Restoring checkpoint at step %d from %s', step,
                   mngr.directory)
      try:
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
        return restored['state'], restored['data']
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint %d could not be restored (%s: %s).', step,
                        type(e).__name__, str(e)[:300])
    where = _quarantine(mngr, step)
    logging.warning('Moved the unreadable checkpoint %d to %s (kept for '
                    'inspection) and trying the previous one.', step, where)
  return None


def finish(mngr: ocp.CheckpointManager):
  """Waits for pending saves (raising their errors) and closes the manager."""
  try:
    mngr.wait_until_finished()
  finally:
    mngr.close()


def abandon(mngr: ocp.CheckpointManager):
  """On an error in the loop: lets saves in flight finish, logs their errors."""
  try:
    mngr.wait_until_finished()
  except Exception as e:  # pylint: disable=broad-except
    logging.error('A checkpoint save failed too: %s: %s', type(e).__name__, e)
  finally:
    mngr.close()


def save_params(directory: str, params):
  """Writes a params-only checkpoint (e.g. an imported model) at DIRECTORY."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(directory), params)


def restore_params(directory: str, abstract_params):
  """Reads a `save_params` checkpoint into the layout of `abstract_params`."""
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as ckptr:
    saved_tree = _tree_of(ckptr.metadata(directory))
    differences = _differences(saved_tree, abstract_params)
    if differences:
      raise IncompatibleCheckpointError(
          f'The params checkpoint {directory} does not fit the model:\n  ' +
          '\n  '.join(differences) + '\nSet the model config to the one that '
          'made it (a converted model writes its config beside it).')
    return ckptr.restore(directory, abstract_params)


@contextlib.contextmanager
def _newest_of_run(workdir: str):
  """(manager, step) of a run's newest checkpoint, or None; closes after."""
  directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not os.path.isdir(directory):
    yield None
    return
  mngr = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(),
                     'data': ocp.JsonCheckpointHandler()})
  try:
    step = mngr.latest_step()
    yield None if step is None else (mngr, step)
  finally:
    mngr.close()


def latest_params(workdir: str, abstract_params):
  """(step, params) of the newest checkpoint of a training run, or None.

  Reads only the params (not the optimizer state) of WORKDIR/checkpoints.
  """
  with _newest_of_run(workdir) as newest:
    if newest is None:
      return None
    mngr, step = newest
    saved_tree = _tree_of(mngr.item_metadata(step)['state'])
    differences = _differences(saved_tree['params'], abstract_params)
    if differences:
      raise IncompatibleCheckpointError(
          f'The checkpoint at step {step} in {mngr.directory} does not fit '
          'the model:\n  ' + '\n  '.join(differences))
    # Read the params only: other entries are left out of the target.
    target = {'params': abstract_params}
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, partial_restore=True,
            restore_args=jax.tree.map(
                lambda x: ocp.ArrayRestoreArgs(
                    sharding=getattr(x, 'sharding', None)
                    or jax.sharding.SingleDeviceSharding(jax.devices()[0])),
                target))))
    return step, restored['state']['params']


def read_latest(workdir: str):
  """(step, state, data_state) of a run's newest checkpoint, as numpy arrays.

  For tools that inspect or compare runs on any machine: the arrays are read
  to host memory whatever devices wrote them. None if there is no checkpoint.
  """
  with _newest_of_run(workdir) as newest:
    if newest is None:
      return None
    mngr, step = newest
    saved_tree = _tree_of(mngr.item_metadata(step)['state'])
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved_tree)),
        data=ocp.args.JsonRestore()))
    return step, restored['state'], restored['data']
