"""Checkpoints: the only module that imports Orbax.

A checkpoint holds the train state (params, optimizer state, step, RNG) and
the data iterator's position, so a run resumes exactly where it stopped.
Saves are asynchronous; `finish` waits for them and surfaces any error.
"""
import os

from absl import logging
import orbax.checkpoint as ocp


def manager(workdir: str, keep: int, async_save: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.LatestN(keep),
      enable_async_checkpointing=async_save,
      create=True)
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=options, item_names=('state', 'data'))


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict):
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """(state, data_state) of the newest checkpoint, or None if there is none.

  `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings: the
  state is read straight into that layout.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  logging.info('Restoring checkpoint at step %d from %s', step,
               mngr.directory)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=ocp.args.JsonRestore()))
  return restored['state'], restored['data']


def finish(mngr: ocp.CheckpointManager):
  mngr.wait_until_finished()
  mngr.close()
