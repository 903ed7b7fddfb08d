"""Preemption: a SIGTERM asks the training loop to checkpoint and stop.

One process: SIGTERM sets a flag that the loop reads after each step. Several
processes: JAX's distributed runtime receives the notice (SIGTERM by default,
or the TPU maintenance event) and all processes agree on the step to stop at
through `multihost_utils.reached_preemption_sync_point`, which every process
calls at every step.
"""
import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils


class Watcher:
  """Says at which step the loop should save and stop; use as a context."""

  def __init__(self):
    self.signal_name = None
    self._multi_process = jax.process_count() > 1
    self._previous = None

  def __enter__(self):
    # Signal handlers can only be set from the main thread; elsewhere (a test
    # runner thread) the default SIGTERM behaviour stays.
    if (not self._multi_process and
        threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    # Only set a flag: the loop saves after the step in flight.
    logging.warning('%s received: finishing the current step, then saving.',
                    self.signal_name)

  def should_stop(self, step: int) -> bool:
    """True once a preemption notice arrived (all processes agree on `step`)."""
    if self._multi_process:
      try:
        reached = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is disabled
        return False
      if reached:
        self.signal_name = 'preemption notice'
      return reached
    return self.signal_name is not None
