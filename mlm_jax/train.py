"""The training loop: data in, steps run, metrics out, evals, checkpoints.

`train_and_evaluate(config, workdir)` prepares the data, calls
`build.build` for everything compiled, resumes from WORKDIR's newest sound
checkpoint (optimizer, step, RNG and data position), and loops. Train
metrics are summed on device over a window of `log_every` steps and fetched
one step late, so the host never waits for the step in flight; the first
non-finite step is tracked on device too, and stops the run before any save.

Must not: define steps or metrics (steps.py), build shardings or jit
(build.py), or know the checkpoint format (checkpoint.py).
"""
import functools
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mlm_jax import build
from mlm_jax import checkpoint
from mlm_jax import metrics as metrics_lib
from mlm_jax import optimizer
from mlm_jax import preemption
from mlm_jax import run_dir
from mlm_jax.data import pipeline


_NO_STEP = np.iinfo(np.int32).max  # "no such step" in step-valued metrics


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(carry, metrics, step):
  """(window sums, first bad step) updated by one step's metrics.

  One dispatch per step for what would otherwise be a dozen small ops
  (an add per metric, and the first-bad-step bookkeeping), none of which
  waits for the step.
  """
  sums, first_bad = carry
  bad = jnp.where(metrics['nonfinite'][0] > 0, step, _NO_STEP)
  sums = jax.tree.map(jnp.add, sums, metrics)
  return sums, jnp.minimum(first_bad, bad).astype(first_bad.dtype)


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s'


def _peak_flops(built) -> float | None:
  """All devices' peak FLOP/s for MFU: the table's, or a measured CPU matmul."""
  peak = metrics_lib.peak_flops_per_device(built.config.peak_tflops_per_device,
                                           built.model_config.dtype)
  if peak is not None or jax.default_backend() != 'cpu':
    return peak and peak * jax.device_count()
  # No table entry for a CPU: measure a matmul (all cores; several fake
  # CPU devices share them, so this is the peak of all of them at once).
  total = metrics_lib.matmul_flops_per_second(
      1024, getattr(jnp, built.model_config.dtype), calls=3)
  logging.info('CPU matmul peak (for MFU), measured: %.1f GFLOP/s.',
               total / 1e9)
  return total


def _evaluate(built, params) -> dict:
  """Eval metrics over the validation split (or its first eval_batches)."""
  config = built.config
  key = jax.random.fold_in(jax.random.key(config.seed), 0xE7A1)
  batches = pipeline.eval_batches(built.data.eval_source, config.batch_size,
                                  jax.process_index(), jax.process_count(),
                                  pad_id=built.tokenizer.pad_id)
  sums = None
  for i, local in enumerate(batches):
    if config.eval_batches and i >= config.eval_batches:
      break
    m = built.eval_step(params, built.to_global(local),
                        jax.random.fold_in(key, i))
    sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
  return metrics_lib.summarize(jax.device_get(sums), 'eval')


class _Reports:
  """Train metrics over windows of steps, reported one step late, and the
  guard that stops a run after a non-finite step (nonfinite='stop')."""

  def __init__(self, built, workdir, ckpt, start_step, last_step):
    self.config, self.built, self.workdir, self.ckpt = (built.config, built,
                                                        workdir, ckpt)
    self.start_step, self.last_step = start_step, last_step
    self.writer = metrics_lib.Writer(workdir, start_step)
    self.lr_fn = optimizer.learning_rate_schedule(built.config)
    self.peak_total = _peak_flops(built)
    self.sums, self.real_tokens, self.window_steps = None, 0, 0
    self.pending = None  # (step, sums, tokens, steps) of a window
    self.run_start = self.last_fetch = time.time()
    self.last_saved = None
    # The first step whose loss or gradient was not finite (a device
    # scalar, fetched only when reporting or saving); _NO_STEP if none.
    self.first_bad = jnp.asarray(_NO_STEP, jnp.int32)

  def add(self, step, metrics, local):
    """Adds a step's metrics to the window, then reports the last window."""
    self.real_tokens += int(np.count_nonzero(local['segment_ids']))
    self.window_steps += 1
    if self.sums is None:  # a window's first step: start from zeros
      self.sums = jax.tree.map(jnp.zeros_like, metrics)
    self.sums, self.first_bad = _accumulate((self.sums, self.first_bad),
                                            metrics, step)
    if step == self.start_step + 1:
      # Keep compilation out of the first window's throughput.
      jax.block_until_ready(metrics)
      self.real_tokens, self.window_steps = 0, 0
      self.last_fetch = time.time()
    self.flush()

  def end_window(self, step):
    # This process's real tokens, scaled to the global batch.
    self.pending = (step, self.sums, self.real_tokens * jax.process_count(),
                    self.window_steps)
    self.sums, self.real_tokens, self.window_steps = None, 0, 0

  def flush(self):
    if self.pending is not None:
      self._report(*self.pending)
      self.pending = None

  def check_numerics(self):
    bad = int(self.first_bad)
    if bad == _NO_STEP or self.config.nonfinite != 'stop':
      return
    last = (f'the last good checkpoint is step {self.last_saved} in '
            f'{run_dir.checkpoints_dir(self.workdir)}'
            if self.last_saved is not None else 'no checkpoint was saved')
    raise FloatingPointError(
        f'Non-finite loss or gradient at step {bad}; updates from it on were '
        f'not applied and nothing after it was saved; {last}. Lower the '
        'learning rate or raise warmup_steps, or set --config.nonfinite=skip '
        'to skip such steps.')

  def before_save(self):
    """Every record up to a checkpoint on disk first; never save after a
    non-finite step under 'stop'."""
    self.flush()
    self.writer.sync()
    self.check_numerics()

  def evaluate(self, step, evaluate_fn):
    """Writes evaluate_fn()'s metrics; its time is no train window's."""
    self.flush()
    scalars = evaluate_fn()
    self.writer.write(step, scalars)
    logging.info('eval at step %d: %s', step,
                 ', '.join(f'{k} {v:.4f}' for k, v in scalars.items()))
    self.last_fetch = time.time()

  def _report(self, step, sums, tokens, steps):
    host_sums = jax.device_get(sums)
    # The fetch waited for the window's last step: time windows fetch to fetch.
    seconds, self.last_fetch = time.time() - self.last_fetch, time.time()
    checkpoint.check(self.ckpt)  # a failed background save raises here
    self.check_numerics()
    skipped = int(host_sums.pop('nonfinite')[0])
    scalars = metrics_lib.summarize(host_sums, 'train')
    scalars['train/nonfinite_steps'] = skipped
    if skipped:
      logging.warning('%d step(s) with a non-finite loss or gradient up to '
                      'step %d were skipped (first: step %d).', skipped, step,
                      int(self.first_bad))
    predictions = (self.built.masker.max_predictions * self.config.batch_size
                   * steps)
    flops = metrics_lib.train_flops(self.built.model_config,
                                    self.config.seq_len, tokens, predictions)
    scalars['train/learning_rate'] = float(self.lr_fn(step - 1))
    scalars['train/tokens_per_second'] = tokens / seconds
    if self.peak_total:
      scalars['train/mfu'] = flops / seconds / self.peak_total
    self.writer.write(step, scalars)
    per_step = ((time.time() - self.run_start) /
                max(step - self.start_step, 1))
    logging.info('step %d/%d  loss %.4f  acc %.4f  %.0f tok/s  ETA %s', step,
                 self.config.num_steps, scalars['train/loss'],
                 scalars['train/accuracy'], tokens / seconds,
                 _format_eta(per_step * (self.last_step - step)))


def _start(built, restored, train_iter):
  """The state to train from: restored, else fresh (or from init_from)."""
  config = built.config
  if restored is not None:
    state, data_state = restored
    train_iter.set_state(data_state)
    return state
  state = built.init()
  if config.init_from:
    state = state.replace(params=checkpoint.restore_params(
        config.init_from, built.abstract_state.params))
    logging.info('Initialised the parameters from %s.', config.init_from)
  return state


def train_and_evaluate(config, workdir: str):
  """Trains (resuming from WORKDIR if it holds a checkpoint) and evaluates.

  A SIGTERM (or, multi-host, JAX's preemption notice) at any time ends the
  run after the step in flight with a checkpoint; the function then returns
  normally, so the process exits 0 and the same command resumes.
  """
  with preemption.Watcher() as watcher:
    return _train_and_evaluate(config, workdir, watcher)


def _train_and_evaluate(config, workdir: str, watcher: preemption.Watcher):
  built = build.build(config)  # checks, data, model, optimizer, steps
  train_iter = pipeline.train_iterator(
      built.data.train_source, config.batch_size, config.seed,
      jax.process_index(), jax.process_count())
  data_settings = run_dir.data_settings(config)
  ckpt, restored = checkpoint.resume(config, run_dir.checkpoints_dir(workdir),
                                     built.abstract_state, data_settings)
  state = _start(built, restored, train_iter)
  run_dir.write_config(workdir, config)
  start_step = int(state.step)
  last_step = config.num_steps
  if config.steps_per_run:
    last_step = min(last_step, start_step + config.steps_per_run)
  if start_step >= config.num_steps or watcher.signal_name:
    if watcher.signal_name:
      logging.warning('%s before the first step: nothing new to save; '
                      'exiting.', watcher.signal_name)
    else:
      logging.info('Nothing to do: the checkpoint is at step %d >= '
                   'num_steps=%d.', start_step, config.num_steps)
    checkpoint.finish(ckpt)
    return state

  reports = _Reports(built, workdir, ckpt, start_step, last_step)
  reports.last_saved = start_step if restored is not None else None
  logging.info('Training steps %d..%d, global batch %d x %d on %d devices.',
               start_step, config.num_steps, config.batch_size, config.seq_len,
               jax.device_count())
  stop_reason = None
  try:
    for step in range(start_step + 1, last_step + 1):
      local = next(train_iter)
      state, metrics = built.train_step(state, built.to_device(local))
      reports.add(step, metrics, local)
      preempted = watcher.should_stop(step)
      if (step % config.log_every == 0 or step == last_step or
          (preempted and reports.window_steps)):
        reports.end_window(step)
      if step % config.eval_every == 0 or step == config.num_steps:
        reports.evaluate(step, functools.partial(
            _evaluate, built, state.params))
      if (step % config.checkpoint_every == 0 or step == config.num_steps or
          step == last_step or preempted):
        reports.before_save()
        checkpoint.save(ckpt, step, state, train_iter.get_state(),
                        data_settings)
        reports.last_saved = step
      if preempted:
        # The step is complete (its eval and checkpoint included): stop.
        stop_reason = (f'{watcher.signal_name} at step {step}: checkpoint '
                       'saved; run the same command to resume')
        last_step = step
        break
    reports.flush()
    checkpoint.finish(ckpt)  # waits for the last save; raises its error
  except BaseException:
    checkpoint.abandon(ckpt)  # lets a save in flight finish, then closes
    raise
  finally:
    reports.writer.close()
  if stop_reason is None and last_step < config.num_steps:
    stop_reason = 'steps_per_run reached; run again to continue'
  # A preemption is worth a warning: it is the line a cluster user looks for.
  log = logging.warning if watcher.signal_name else logging.info
  log('Stopped at step %d/%d after %s%s.', last_step, config.num_steps,
      _format_eta(time.time() - reports.run_start),
      f' ({stop_reason})' if stop_reason else '')
  return state
