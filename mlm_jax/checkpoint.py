"""Checkpoints: the only module that imports Orbax.

A training checkpoint holds the train state (params, optimizer state, step,
RNG) and the data iterator's position, so a run resumes exactly where it
stopped. Saves are asynchronous; an error in a background save is raised in
the training loop at the next `check`, `save` or `finish`.

Orbax writes each step under a temporary name and renames it when complete,
so a run killed mid-save leaves no checkpoint that `restore_latest` would
choose. A complete checkpoint is restored only after its files are checked
against its own index (`verify`: every file the OCDBT manifest and B-tree
nodes name exists, at least as long as the byte ranges they point to, and the
JSON metadata parses). A checkpoint with evidence of damage (that check, or a
read that fails with tensorstore's DATA_LOSS / NOT_FOUND / OUT_OF_RANGE) is
moved to the sibling `DIR.corrupt/` with one warning, never deleted, and the
previous one is tried. Any other error (storage unavailable, out of memory,
a sharding the mesh cannot take) stops the run and moves nothing: a
transient failure must not walk back through a run's checkpoints. Checking
first also keeps Orbax from starting reads of a damaged file: its restore
gathers one task per array shard and, when one fails, closes its event loop
with the others still pending, each of which then prints a traceback.

A checkpoint of a different model (other shapes or parameter names), or one
saved with another batch size, seed, sequence length or data source (whose
data position would then skip or repeat rows), is an error that names the
differences and leaves the checkpoint untouched.

Params-only checkpoints (`save_params`/`restore_params`) carry weights
between runs, e.g. from a converted Hugging Face model (`init_from`).

Must not: know where a run keeps its checkpoints (each function takes the
checkpoints directory; run_dir.py has the layout) or compute the data
settings it checks (the caller gives them).
"""
import contextlib
import json
import logging as std_logging
import os
import shutil
import sys
import time
import traceback

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
import tensorstore as ts

# Damaged checkpoints of DIR are set aside in DIR + CORRUPT_SUFFIX.
CORRUPT_SUFFIX = '.corrupt'
# tensorstore status codes (the prefix of its error messages) that mean the
# bytes on disk are damaged or gone, not that reading them failed.
_DAMAGE_CODES = ('DATA_LOSS', 'NOT_FOUND', 'OUT_OF_RANGE')
# Saved beside the data position: a position counts batches of this size,
# in this order, of these rows.
DATA_SETTINGS = ('batch_size', 'seed', 'seq_len', 'source_fingerprint')


class IncompatibleCheckpointError(ValueError):
  """A checkpoint whose tree or shapes differ from the model being trained."""


class ResumeSettingsError(ValueError):
  """A checkpoint saved with other data settings than the run's."""


class RestoreError(RuntimeError):
  """A checkpoint that could not be restored, or none where there should be."""


def _not_orbax_info(record) -> bool:
  return (record.levelno >= std_logging.WARNING or
          '/orbax/' not in record.pathname)


def quiet_orbax_logs():
  """Orbax logs every stage of every save at INFO; keep its warnings only."""
  logging.get_absl_logger().addFilter(_not_orbax_info)


def _not_a_dropped_orbax_task(record) -> bool:
  """False for asyncio's 'Task exception was never retrieved' of an Orbax
  task: a failed save (e.g. a full disk) leaves one per array fragment, each
  a traceback printed whenever the garbage collector finds it, in whatever
  code runs then. The save's error itself is raised by `check`, `save` or
  `finish`, with its cause."""
  return not (record.name == 'asyncio' and
              'never retrieved' in str(record.msg) and
              '/orbax/' in record.getMessage())


def _a_late_write_callback(unraisable) -> bool:
  """Whether an unraisable error is a write's completion arriving at the
  closed event loop of a failed save: the first error (e.g. a full disk)
  ends Orbax's loop while tensorstore's other writes still run, and each
  one's callback, called from a C++ thread, fails in call_soon_threadsafe
  and prints a traceback (348 in one test, interleaved). The save's error
  itself is raised by `check`, `save` or `finish`."""
  if (unraisable.object is not None or
      unraisable.exc_type is not RuntimeError or
      str(unraisable.exc_value) != 'Event loop is closed'):
    return False
  frames = [f for f, _ in traceback.walk_tb(unraisable.exc_traceback)]
  if not frames:
    return False
  # Called from outside Python straight into asyncio's thread-safe call.
  code = frames[0].f_code
  return (code.co_name == 'call_soon_threadsafe' and
          os.path.basename(os.path.dirname(code.co_filename)) == 'asyncio')


class _QuietLateWriteCallbacks:
  """sys.unraisablehook without `_a_late_write_callback`s."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable):
    if not _a_late_write_callback(unraisable):
      self.previous(unraisable)


def manager(directory: str, keep: int,
            async_save: bool) -> ocp.CheckpointManager:
  """The manager of the checkpoints in DIRECTORY (made if missing)."""
  asyncio_logger = std_logging.getLogger('asyncio')
  if _not_a_dropped_orbax_task not in asyncio_logger.filters:
    asyncio_logger.addFilter(_not_a_dropped_orbax_task)
  if not isinstance(sys.unraisablehook, _QuietLateWriteCallbacks):
    sys.unraisablehook = _QuietLateWriteCallbacks(sys.unraisablehook)
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      enable_async_checkpointing=async_save,
      create=True)
  return ocp.CheckpointManager(
      os.path.abspath(directory), options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': ocp.JsonCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state, iterator_state: dict,
         settings: dict):
  """Starts saving `state` at `step`; raises an earlier save's error first.

  `settings` ({DATA_SETTINGS: value}) are saved beside the data iterator's
  state, so a resume can check that the position still means the same rows.
  """
  data = {'iterator': iterator_state, 'settings': settings}
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)),
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


def _damage_in(error):
  """The evidence of damaged files in `error` or what it was raised from.

  Orbax wraps tensorstore's errors (`raise Exception(...) from e`), so the
  chain is searched. None when nothing in it says the data is damaged.
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, (json.JSONDecodeError, FileNotFoundError)):
      return f'{type(error).__name__}: {error}'
    if str(error).split(':', 1)[0] in _DAMAGE_CODES:
      return str(error)
    error = error.__cause__ or error.__context__
  return None


def _location_file(state_dir: str, location: str):
  """(path, bytes needed) of an OCDBT location kind:base:file:offset:length."""
  rest, offset, length = location.rsplit(':', 2)
  _, base, name = rest.split(':', 2)
  return os.path.join(state_dir, base, name), int(offset) + int(length)


def _file_problem(path: str, needed: int):
  if not os.path.exists(path):
    return f'{path} is missing'
  size = os.path.getsize(path)
  if size < needed:
    return (f'{path} is cut short: {size} bytes, the checkpoint index needs '
            f'{needed}')
  return None


def _ocdbt_problems(state_dir: str) -> list[str]:
  """Files the OCDBT database in STATE_DIR names but lacks or has cut short.

  Reads only the manifest and B-tree nodes (each after checking its own
  file), never the arrays: cheap next to the restore it guards.
  """
  kv = ts.KvStore.open('file://' + os.path.abspath(state_dir) + '/').result()
  try:
    manifest = ts.ocdbt.dump(kv).result()
  except ValueError as e:
    if _damage_in(e):
      return [f'{os.path.join(state_dir, "manifest.ocdbt")}: {e}']
    raise
  nodes = [v['root']['location'] for v in manifest['versions'][-1:]
           if 'location' in v['root']]
  problems, values = [], {}
  while nodes:
    location = nodes.pop()
    problem = _file_problem(*_location_file(state_dir, location))
    if problem:
      problems.append(problem)
      continue
    for entry in ts.ocdbt.dump(kv, location).result()['entries']:
      for field in entry.values():
        if isinstance(field, str) and field.startswith('btreenode:'):
          nodes.append(field)
        elif isinstance(field, str) and field.startswith('value:'):
          path, needed = _location_file(state_dir, field)
          values[path] = max(values.get(path, 0), needed)
  problems += [p for p in (_file_problem(path, needed) for path, needed in
                           sorted(values.items())) if p]
  return problems


def verify(step_dir: str) -> list[str]:
  """Evidence that the checkpoint in STEP_DIR is damaged; [] if none.

  Checks that the JSON metadata of both items parses and that every file
  the state's OCDBT index names exists and is long enough. Raises (rather
  than reporting damage) when reading fails for another reason.
  """
  problems = []
  for item, name in (('state', '_METADATA'), ('data', 'metadata')):
    path = os.path.join(step_dir, item, name)
    try:
      with open(path, 'rb') as f:
        json.loads(f.read())
    except FileNotFoundError:
      problems.append(f'{path} is missing')
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
      problems.append(f'{path} is not valid JSON ({e})')
  state_dir = os.path.join(step_dir, 'state')
  if not os.path.exists(os.path.join(state_dir, 'manifest.ocdbt')):
    problems.append(f'{os.path.join(state_dir, "manifest.ocdbt")} is missing')
  else:
    problems += _ocdbt_problems(state_dir)
  return problems


def _set_aside(mngr: ocp.CheckpointManager, step: int, problems: list[str],
               limit: int = 8) -> str:
  """Moves a damaged step out of the manager's sight, with one warning."""
  src = os.path.join(str(mngr.directory), str(step))
  dst_root = str(mngr.directory) + CORRUPT_SUFFIX
  stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
  dst = os.path.join(dst_root, f'{step}-{stamp}')
  if jax.process_index() == 0:
    os.makedirs(dst_root, exist_ok=True)
    shutil.move(src, dst)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
  mngr.reload()
  if len(problems) > limit:
    problems = problems[:limit] + [f'and {len(problems) - limit} more']
  logging.warning(
      'Checkpoint %d (%s) is damaged: %s. Moved it to %s (kept, not deleted); '
      'trying the previous checkpoint.', step, src,
      '; '.join(' '.join(p.split()) for p in problems), dst)
  return dst


def _check_settings(step: int, mngr, saved: dict, settings: dict):
  """Raises ResumeSettingsError naming each data setting that changed."""
  changed = [k for k in DATA_SETTINGS if saved.get(k) != settings.get(k)]
  if not changed:
    return
  lines = []
  for k in changed:
    key = 'data.source' if k == 'source_fingerprint' else k
    if k == 'source_fingerprint':
      lines.append(
          f'the data source: saved {saved.get("source")!r} with fingerprint '
          f'{saved.get(k)}, now {settings.get("source")!r} with fingerprint '
          f'{settings.get(k)} (the fingerprint covers the files\' paths, '
          'sizes and modification times); set --config.data.source to the '
          'data the run was saved with')
    else:
      lines.append(f'{key}: saved {saved.get(k)!r}, now {settings.get(k)!r}; '
                   f'set --config.{key}={saved.get(k)}')
  raise ResumeSettingsError(
      f'The checkpoint at step {step} in {mngr.directory} was saved with other '
      'data settings. Its data position counts batches of the saved size, in '
      'the saved order, of the saved rows, so resuming would skip or repeat '
      'rows:\n  ' + '\n  '.join(lines) + '\nOr use a new --workdir to start a '
      'run with the new settings. The checkpoint was left untouched.')


def _iterator_state(step: int, mngr, data: dict, settings: dict) -> dict:
  """The data iterator's state of a checkpoint, its settings checked."""
  if 'iterator' not in data:
    # Saved before the settings were: the whole item is the iterator state.
    logging.warning(
        'Checkpoint %d predates the record of data settings, so batch_size, '
        'seed, seq_len and the data source are not checked against it: it '
        'resumes at its data position, which is right only if they are those '
        'the run was saved with. The next checkpoint records them.', step)
    return data
  _check_settings(step, mngr, data['settings'], settings)
  return data['iterator']


def resume(config, directory: str, abstract_state, settings: dict):
  """(manager of the checkpoints in DIRECTORY, restore_latest's result).

  `settings` are the run's DATA_SETTINGS (run_dir.data_settings(config)).
  The manager is closed if the restore raises.
  """
  mngr = manager(directory, config.keep_checkpoints,
                 config.async_checkpointing)
  try:
    return mngr, restore_latest(mngr, abstract_state, settings,
                                config.allow_fresh_start)
  except Exception:
    finish(mngr)
    raise


def restore_latest(mngr: ocp.CheckpointManager, abstract_state,
                   settings: dict, allow_fresh_start: bool = False):
  """(state, data iterator state) of the newest sound checkpoint, or None.

  `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings: the
  state is read straight into that layout. `settings` are the run's
  DATA_SETTINGS (plus 'source', for messages). Damaged checkpoints are set
  aside (newest first); None only if there is no checkpoint left and, where
  some were set aside (now or before), `allow_fresh_start`.

  Raises IncompatibleCheckpointError if the newest sound checkpoint was made
  by a different model, ResumeSettingsError if with other data settings, and
  RestoreError if it could not be restored for a reason other than damage,
  or if a fresh start would replace set-aside progress without the flag.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    step_dir = os.path.join(str(mngr.directory), str(step))
    try:
      problems = verify(step_dir)
      if not problems:
        return _restore(mngr, step, abstract_state, settings)
    except (IncompatibleCheckpointError, ResumeSettingsError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      damage = _damage_in(e)
      if damage is None:
        raise RestoreError(
            f'Checkpoint {step} ({step_dir}) could not be restored: '
            f'{type(e).__name__}: {e}\nNothing shows that its files are '
            'damaged (they are checked against its own index first), so this '
            'looks like a failure of this run or machine, not of the checkpoint '
            '(storage unavailable, host memory exhausted, a mesh '
            'its arrays cannot be laid out on, ...). Nothing was moved: fix '
            'the cause and run the same command again. If the checkpoint is '
            f'damaged all the same, move {step_dir} out of {mngr.directory} '
            'and rerun to resume from the one before.') from e
      problems = [damage]
    _set_aside(mngr, step, problems)
  corrupt_dir = str(mngr.directory) + CORRUPT_SUFFIX
  earlier = (sorted(os.listdir(corrupt_dir)) if os.path.isdir(corrupt_dir)
             else [])
  if earlier and not allow_fresh_start:
    raise RestoreError(
        f'No checkpoint in {mngr.directory} is left to resume from: '
        f'{len(earlier)} damaged one(s) are set aside in {corrupt_dir} '
        f'({", ".join(earlier)}). Starting again from step 0 would redo that '
        'progress; to do so, add --config.allow_fresh_start=True (the '
        'set-aside checkpoints and the metrics stay on disk).')
  if earlier:
    logging.warning('Starting from step 0 (allow_fresh_start): the damaged '
                    'checkpoints in %s stay there.', corrupt_dir)
  return None


def _restore(mngr: ocp.CheckpointManager, step: int, abstract_state,
             settings: dict):
  """(state, iterator state) of a verified checkpoint, after the checks."""
  saved_tree = _tree_of(mngr.item_metadata(step)['state'])
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
  # The small data item first: a changed setting fails before the big read.
  data = mngr.restore(step, args=ocp.args.Composite(
      data=ocp.args.JsonRestore()))['data']
  iterator_state = _iterator_state(step, mngr, data, settings)
  logging.info('Restoring checkpoint at step %d from %s', step, mngr.directory)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored['state'], iterator_state


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
def _newest(directory: str):
  """(manager, step) of the newest checkpoint in DIRECTORY, or None; closes
  after. Reads only: makes nothing, sets nothing aside."""
  directory = os.path.abspath(directory)
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


def latest_params(directory: str, abstract_params):
  """(step, params) of the newest checkpoint in DIRECTORY, or None.

  Reads only the params, not the optimizer state.
  """
  with _newest(directory) as newest:
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


def read_latest(directory: str):
  """(step, state, data_state) of DIRECTORY's newest checkpoint, as numpy.

  For tools that inspect or compare runs on any machine: the arrays are read
  to host memory whatever devices wrote them. None if there is no checkpoint.
  """
  with _newest(directory) as newest:
    if newest is None:
      return None
    mngr, step = newest
    saved_tree = _tree_of(mngr.item_metadata(step)['state'])
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved_tree)),
        data=ocp.args.JsonRestore()))
    return step, restored['state'], restored['data']
