"""Training and evaluation: the pure steps, and the loop that drives them."""
import functools
import os
import time
from typing import Any

from absl import logging
import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlm_jax import checkpoint
from mlm_jax import data
from mlm_jax import masking
from mlm_jax import metrics as metrics_lib
from mlm_jax import model
from mlm_jax import optimizer
from mlm_jax import preemption
from mlm_jax import sharding
from mlm_jax.data import pipeline


_NO_STEP = np.iinfo(np.int32).max  # "no such step" in step-valued metrics


@flax.struct.dataclass
class TrainState:
  step: jax.Array      # int32 scalar
  params: Any          # nnx.State of the model's Params
  opt_state: Any
  rng: jax.Array       # raw key data (uint32), so Orbax can save it


def _summed(values, weights):
  """A metric as (sum, weight), divided only when reported."""
  return jnp.stack([jnp.sum(values * weights), jnp.sum(weights)])


def mlm_metrics(logits_BxKxV, masked: masking.Masked, loss_BxK,
                baseline_id=None):
  """Loss and accuracy, overall and by what the input showed at the target."""
  weights_BxK = masked.weights_BxK
  correct_BxK = (jnp.argmax(logits_BxKxV, -1) == masked.targets_BxK)
  correct_BxK = correct_BxK.astype(jnp.float32)
  at = lambda kind: weights_BxK * (masked.kinds_BxK == kind)
  metrics = {
      'loss': _summed(loss_BxK, weights_BxK),
      'accuracy': _summed(correct_BxK, weights_BxK),
      'mask_accuracy': _summed(correct_BxK, at(masking.REPLACED_MASK)),
      'random_accuracy': _summed(correct_BxK, at(masking.REPLACED_RANDOM)),
      'kept_accuracy': _summed(correct_BxK, at(masking.KEPT)),
  }
  if baseline_id is not None:
    hit_BxK = (masked.targets_BxK == baseline_id).astype(jnp.float32)
    metrics['baseline_accuracy'] = _summed(hit_BxK, at(masking.REPLACED_MASK))
  return metrics


def mask_telemetry(masked: masking.Masked, special_ids) -> dict:
  """What the masking did: realized rate, replacement split, span length."""
  w_BxK = masked.weights_BxK
  predictions = jnp.sum(w_BxK)
  special_hits = jnp.sum(w_BxK * jnp.isin(masked.targets_BxK,
                                          jnp.asarray(special_ids)))
  frac = lambda kind: jnp.stack(
      [jnp.sum(w_BxK * (masked.kinds_BxK == kind)), predictions])
  return {
      'mask_rate': jnp.stack([predictions,
                              jnp.sum(masked.maskable_B).astype(jnp.float32)]),
      'frac_mask': frac(masking.REPLACED_MASK),
      'frac_random': frac(masking.REPLACED_RANDOM),
      'frac_kept': frac(masking.KEPT),
      # Special tokens chosen per step: must be 0.
      'special_masked': jnp.stack([special_hits, 1.0]),
      'mean_span_length': jnp.stack(
          [predictions, jnp.sum(masked.units_B).astype(jnp.float32)]),
  }


def _forward(params, graphdef, masked, segment_ids_BxL, dropout_key):
  model_ = nnx.merge(graphdef, params)
  if dropout_key is None:
    logits_BxKxV = model_(masked.inputs_BxL, segment_ids_BxL,
                          masked.positions_BxK, deterministic=True)
  else:
    logits_BxKxV = model_(masked.inputs_BxL, segment_ids_BxL,
                          masked.positions_BxK, deterministic=False,
                          rngs=nnx.Rngs(dropout=dropout_key))
  loss_BxK = optax.softmax_cross_entropy_with_integer_labels(
      logits_BxKxV, masked.targets_BxK)
  return logits_BxKxV, loss_BxK


def _split_micro(x, n: int):
  """[B, ...] -> [n, B/n, ...]; micro-batch a holds rows a, n + a, 2n + a, ...

  Strided, so each device's contiguous block of rows splits evenly into the
  micro-batches and no row moves between devices.
  """
  return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def train_step(state: TrainState, batch, *, graphdef, tx,
               masker: masking.Masker, rate_fn, grad_accum_steps: int = 1,
               axis_name=None):
  """One optimizer update on a global batch; returns (state, metrics).

  Row b of the batch is example `step * B + b` of the data stream; its mask
  is drawn from that id, so masks do not depend on the device layout or on
  accumulation. The loss is sum(loss * weight) / total weight of the whole
  batch; with `grad_accum_steps` = n > 1 the batch is masked whole, split
  into n micro-batches, and their gradients (each already divided by the
  total weight) are summed in a lax.scan: the result is the full batch's
  gradient, and only one micro-batch's activations are alive at a time.

  `axis_name` (under pmap) makes `batch` this device's rows: gradients and
  (sum, weight) metrics are psummed over that axis, which is exact where a
  pmean of per-device means would not be.
  """
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  mask_key, dropout_key = jax.random.split(key)
  local_size = batch['input_ids'].shape[0]
  if axis_name is None:
    reduce = lambda tree: tree
    batch_size, first_row = local_size, 0
  else:
    reduce = functools.partial(jax.lax.psum, axis_name=axis_name)
    batch_size = local_size * jax.lax.axis_size(axis_name)
    first_row = jax.lax.axis_index(axis_name) * local_size
    dropout_key = jax.random.fold_in(dropout_key,
                                     jax.lax.axis_index(axis_name))
  example_ids_B = state.step * batch_size + first_row + jnp.arange(local_size)
  masked = masker(mask_key, batch['input_ids'], example_ids_B,
                  rate_fn(state.step))
  total_weight = jnp.maximum(reduce(masked.weights_BxK.sum()), 1.0)

  def micro_step(params, micro_masked, segment_ids_BxL, micro_key):
    """(loss share, gradient share, metrics) of some rows of the batch."""
    def loss_fn(params):
      logits_BxKxV, loss_BxK = _forward(params, graphdef, micro_masked,
                                        segment_ids_BxL, micro_key)
      loss = jnp.sum(loss_BxK * micro_masked.weights_BxK) / total_weight
      return loss, (logits_BxKxV, loss_BxK)

    (loss, (logits_BxKxV, loss_BxK)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    return loss, grads, mlm_metrics(logits_BxKxV, micro_masked, loss_BxK)

  if grad_accum_steps == 1:
    loss, grads, metrics = micro_step(state.params, masked,
                                      batch['segment_ids'], dropout_key)
  else:
    micro = jax.tree.map(functools.partial(_split_micro, n=grad_accum_steps),
                         (masked, batch['segment_ids']))

    def body(carry, xs):
      (micro_masked, segment_ids_BxL), i = xs
      out = micro_step(state.params, micro_masked, segment_ids_BxL,
                       jax.random.fold_in(dropout_key, i))
      return jax.tree.map(jnp.add, carry, out), None

    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(micro_step, state.params, *first, dropout_key))
    (loss, grads, metrics), _ = jax.lax.scan(
        body, zeros, (micro, jnp.arange(grad_accum_steps)))
  loss, grads, metrics = reduce((loss, grads, metrics))
  grad_norm = optax.global_norm(grads)
  # A step with a non-finite loss or gradient changes nothing but the step
  # count: the state stays finite, and the loop skips or stops per config.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params, opt_state = optimizer.update_if(finite, tx, grads, state.params,
                                          state.opt_state, grad_norm)
  telemetry = reduce(mask_telemetry(masked, masker.special_ids))
  # Special tokens chosen per step (a count, not a per-device mean).
  telemetry['special_masked'] = telemetry['special_masked'].at[1].set(1.0)
  metrics.update(telemetry)
  metrics['grad_norm'] = jnp.stack([grad_norm, 1.0])
  # Leave a bad step out of the averages (NaN * 0 is NaN, hence where).
  metrics = jax.tree.map(lambda m: jnp.where(finite, m, 0.0), metrics)
  metrics['nonfinite'] = jnp.stack([1.0 - finite, 1.0])
  new_state = state.replace(step=state.step + 1, params=params,
                            opt_state=opt_state)
  return new_state, metrics


def eval_step(params, batch, key, *, graphdef, masker: masking.Masker, rate,
              baseline_id):
  """Metrics on one eval batch with a fixed masking key (no dropout)."""
  masked = masker(key, batch['input_ids'], None, rate)
  logits_BxKxV, loss_BxK = _forward(params, graphdef, masked,
                                    batch['segment_ids'], None)
  return mlm_metrics(logits_BxKxV, masked, loss_BxK, baseline_id)


def make_maskers(config, tokenizer):
  """(train masker, train rate schedule, eval masker) of a run config."""
  m = config.mask
  top_rate = max(m.rate, m.final_rate if m.schedule != 'constant' else 0.0)
  common = dict(
      special_ids=tuple(tokenizer.special_ids), mask_id=tokenizer.mask_id,
      vocab_size=tokenizer.vocab_size, strategy=m.strategy,
      mask_prob=m.mask_prob, random_prob=m.random_prob,
      word_start_V=(tokenizer.word_start_mask() if m.strategy != 'token'
                    else None),
      span_p=m.span_p, span_max_words=m.span_max_words)
  train_masker = masking.Masker(
      max_predictions=m.max_predictions or
      masking.static_max_predictions(config.seq_len, top_rate), **common)
  eval_masker = masking.Masker(
      max_predictions=masking.static_max_predictions(config.seq_len,
                                                     m.eval_rate), **common)
  rate_fn = functools.partial(masking.rate_at, schedule=m.schedule,
                              rate=m.rate, final_rate=m.final_rate,
                              num_steps=config.num_steps)
  return train_masker, rate_fn, eval_masker


def validate_config(config):
  """Cheap checks that fail before any data preparation or compilation."""
  if config.seq_len > config.model.max_len:
    raise ValueError(
        f'seq_len={config.seq_len} exceeds model.max_len='
        f'{config.model.max_len} position embeddings; lower --config.seq_len '
        f'or raise --config.model.max_len.')
  for key in ('rate', 'final_rate', 'eval_rate'):
    if not 0.0 < config.mask[key] < 1.0:
      raise ValueError(f'mask.{key}={config.mask[key]} must be in (0, 1).')
  masking.check_strategy(config.mask.strategy)  # raises, naming the choices
  masking.rate_at(0, schedule=config.mask.schedule, rate=0.1, final_rate=0.1,
                  num_steps=1)  # raises on an unknown schedule
  if config.mask.mask_prob + config.mask.random_prob > 1.0:
    raise ValueError('mask.mask_prob + mask.random_prob must be <= 1, got '
                     f'{config.mask.mask_prob} + {config.mask.random_prob}.')
  top_rate = max(config.mask.rate, config.mask.final_rate
                 if config.mask.schedule != 'constant' else 0.0)
  needed = masking.static_max_predictions(config.seq_len, top_rate)
  if config.mask.max_predictions and config.mask.max_predictions < needed:
    raise ValueError(
        f'mask.max_predictions={config.mask.max_predictions} is below '
        f'floor(max rate * seq_len + 0.5)={needed}, so rows would be truncated; set it '
        f'to 0 (automatic) or >= {needed}.')
  if config.parallelism not in ('pjit', 'pmap'):
    raise ValueError(f"parallelism={config.parallelism!r} must be 'pjit' or "
                     "'pmap'.")
  if config.parallelism == 'pmap' and (config.mesh.fsdp != 1 or
                                       config.mesh.tensor != 1):
    raise ValueError('parallelism=pmap is data parallel only: set mesh.fsdp=1 '
                     f'and mesh.tensor=1 (got {config.mesh.fsdp} and '
                     f'{config.mesh.tensor}), or use parallelism=pjit.')
  if config.grad_accum_steps < 1:
    raise ValueError(f'grad_accum_steps={config.grad_accum_steps} must be '
                     '>= 1.')
  if config.nonfinite not in ('stop', 'skip'):
    raise ValueError(f"nonfinite={config.nonfinite!r} must be 'stop' or "
                     "'skip'.")
  if config.steps_per_run < 0:
    raise ValueError(f'steps_per_run={config.steps_per_run} must be >= 0.')
  for key in ('num_steps', 'batch_size', 'log_every', 'eval_every',
              'checkpoint_every'):
    if config[key] <= 0:
      raise ValueError(f'{key}={config[key]} must be positive.')
  model.model_config(config, vocab_size=1)  # size preset and head count
  optimizer.create(config)  # grad_clip_norm


def most_frequent_token(source, special_ids, max_rows: int = 4096) -> int:
  """The most frequent non-special token in (a spread sample of) the source."""
  idx = np.linspace(0, len(source) - 1, min(len(source), max_rows)).astype(int)
  ids = np.concatenate([np.asarray(source[int(i)]['input_ids']) for i in idx])
  counts = np.bincount(ids.ravel())
  counts[[s for s in special_ids if s < len(counts)]] = 0
  return int(np.argmax(counts))


def init_state(mcfg, config, tx, mesh):
  """(graphdef, sharded state, state shardings), built without a host copy."""
  init, graphdef, _, state_sharding = abstract_init(mcfg, config, tx, mesh)
  state = jax.jit(init, out_shardings=state_sharding)()
  return graphdef, state, state_sharding


def abstract_init(mcfg, config, tx, mesh):
  """(init function, graphdef, abstract state, state shardings); no memory.

  The abstract state's leaves are ShapeDtypeStructs with their shardings.

  Parameters and the optimizer's per-parameter state (Adam's moments) share
  one sharding from the rules table, so FSDP shards both; counters and the
  RNG are replicated.
  """
  params_key, train_key = jax.random.split(jax.random.key(config.seed))

  def init():
    params = nnx.split(model.create(mcfg, params_key), nnx.Param)[1]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params),
                      rng=jax.random.key_data(train_key))

  abstract_model = nnx.eval_shape(lambda: model.create(mcfg, params_key))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  params_sharding = sharding.param_shardings(
      mesh, nnx.get_partition_spec(abstract_params), abstract_params)
  abstract_state = jax.eval_shape(init)
  replicated = sharding.replicated(mesh)
  opt_sharding = optax.tree_map_params(
      tx, lambda _, s: s, abstract_state.opt_state, params_sharding,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  state_sharding = TrainState(step=replicated, params=params_sharding,
                              opt_state=opt_sharding, rng=replicated)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract_state, state_sharding)
  return init, graphdef, abstract_state, state_sharding


def make_train_step(config, mesh, state_sharding, **static):
  """(step function, local batch -> its device input) for config.parallelism.

  Both run the same `train_step`: 'pjit' jits it over the whole mesh with
  the state and batch shardings (activations pinned by the model's logical
  constraints under `jax.set_mesh`); 'pmap' maps it over the devices with
  the state replicated and gradients psummed.
  """
  step = functools.partial(train_step, grad_accum_steps=config.grad_accum_steps,
                           **static)
  if config.parallelism == 'pmap':
    return (sharding.pmap_step(step),
            functools.partial(sharding.pmap_batch, mesh=mesh))
  jitted = jax.jit(step, in_shardings=(state_sharding,
                                       sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=0)

  def run(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  return run, functools.partial(sharding.global_batch, mesh=mesh)


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


def _write_config(config, workdir: str):
  """WORKDIR/config.json: what made the run, for tools that reload it."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'config.json')
  with open(path + '.tmp', 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  os.replace(path + '.tmp', path)


def train_and_evaluate(config, workdir: str):
  """Trains (resuming from WORKDIR if it holds a checkpoint) and evaluates.

  A SIGTERM (or, multi-host, JAX's preemption notice) at any time ends the
  run after the step in flight with a checkpoint; the function then returns
  normally, so the process exits 0 and the same command resumes.
  """
  with preemption.Watcher() as watcher:
    return _train_and_evaluate(config, workdir, watcher)


def _train_and_evaluate(config, workdir: str, watcher: preemption.Watcher):
  validate_config(config)
  mesh = sharding.make_mesh(config)
  sharding.check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
  prepared = data.prepare(config.data, config.seq_len)
  tokenizer = prepared.tokenizer
  mcfg = model.model_config(config, tokenizer.vocab_size)
  sharding.check_model(mcfg, mesh)
  tx = optimizer.create(config)
  masker, rate_fn, eval_masker = make_maskers(config, tokenizer)
  baseline_id = most_frequent_token(prepared.train_source, masker.special_ids)
  logging.info('Most frequent training token: %r (id %d), the eval baseline.',
               tokenizer.id_to_piece(baseline_id), baseline_id)

  # Abstract first: a checkpoint is read straight into the sharded layout,
  # and the state is built (compiled) only when there is none.
  init, graphdef, abstract_state, state_sharding = abstract_init(
      mcfg, config, tx, mesh)
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  logging.info('Model %s: %.2fM parameters.', mcfg, num_params / 1e6)
  logging.info('Mesh %s, %s, %d micro-batch(es) per step.', dict(mesh.shape),
               config.parallelism, config.grad_accum_steps)

  train_iter = pipeline.train_iterator(
      prepared.train_source, config.batch_size, config.seed,
      jax.process_index(), jax.process_count())
  data_settings = checkpoint.data_settings(config)
  ckpt, restored = checkpoint.resume(config, workdir, abstract_state,
                                     data_settings)
  if restored is not None:
    state, data_state = restored
    train_iter.set_state(data_state)
  else:
    state = jax.jit(init, out_shardings=state_sharding)()
    if config.init_from:
      state = state.replace(params=checkpoint.restore_params(
          config.init_from, abstract_state.params))
      logging.info('Initialised the parameters from %s.', config.init_from)
  _write_config(config, workdir)
  start_step = int(state.step)
  if start_step >= config.num_steps:
    logging.info('Nothing to do: the checkpoint is at step %d >= num_steps=%d.',
                 start_step, config.num_steps)
    checkpoint.finish(ckpt)
    return state

  batch_sh = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  p_train_step, to_device = make_train_step(
      config, mesh, state_sharding, graphdef=graphdef, tx=tx, masker=masker,
      rate_fn=rate_fn)
  p_eval_step = jax.jit(
      functools.partial(eval_step, graphdef=graphdef, masker=eval_masker,
                        rate=config.mask.eval_rate, baseline_id=baseline_id),
      in_shardings=(state_sharding.params, batch_sh, None),
      out_shardings=replicated)
  eval_key = jax.random.fold_in(jax.random.key(config.seed), 0xE7A1)

  def evaluate(params):
    sums = None
    batches = pipeline.eval_batches(prepared.eval_source, config.batch_size,
                                    jax.process_index(), jax.process_count(),
                                    pad_id=tokenizer.pad_id)
    for i, local in enumerate(batches):
      if config.eval_batches and i >= config.eval_batches:
        break
      m = p_eval_step(params, sharding.global_batch(local, mesh),
                      jax.random.fold_in(eval_key, i))
      sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
    return metrics_lib.summarize(jax.device_get(sums), 'eval')

  writer = metrics_lib.Writer(workdir, start_step)
  lr_fn = optimizer.learning_rate_schedule(config)
  peak = metrics_lib.peak_flops_per_device(config.peak_tflops_per_device,
                                           mcfg.dtype)
  peak_total = peak and peak * jax.device_count()
  if peak is None and jax.default_backend() == 'cpu':
    # No table entry for a CPU: measure a matmul (all cores; several fake
    # CPU devices share them, so this is the peak of all of them at once).
    peak_total = metrics_lib.matmul_flops_per_second(
        1024, getattr(jnp, mcfg.dtype), calls=3)
    logging.info('CPU matmul peak (for MFU), measured: %.1f GFLOP/s.',
                 peak_total / 1e9)
  logging.info('Training steps %d..%d, global batch %d x %d on %d devices.',
               start_step, config.num_steps, config.batch_size, config.seq_len,
               jax.device_count())

  sums, real_tokens, window_steps = None, 0, 0
  run_start, run_start_step = time.time(), start_step
  pending = None  # (step, sums, tokens, steps) of a window, fetched late
  last_fetch = time.time()  # when the previous window's metrics were ready
  last_saved = start_step if restored is not None else None
  # The first step whose loss or gradient was not finite (a device scalar,
  # fetched only when reporting or saving); _NO_STEP while there is none.
  first_bad = jnp.asarray(_NO_STEP, jnp.int32)

  def check_numerics():
    """Stops the run (nonfinite='stop') after a non-finite step."""
    bad = int(first_bad)
    if bad == _NO_STEP or config.nonfinite != 'stop':
      return
    last = (f'the last good checkpoint is step {last_saved} in '
            f'{workdir}/checkpoints' if last_saved is not None else
            'no checkpoint was saved')
    raise FloatingPointError(
        f'Non-finite loss or gradient at step {bad}; updates from it on were '
        f'not applied and nothing after it was saved; {last}. Lower the '
        'learning rate or raise warmup_steps, or set --config.nonfinite=skip '
        'to skip such steps.')

  def report(step, sums, tokens, steps):
    nonlocal last_fetch
    host_sums = jax.device_get(sums)
    # The fetch waited for the window's last step: time windows fetch to fetch.
    seconds, last_fetch = time.time() - last_fetch, time.time()
    checkpoint.check(ckpt)  # a failed background save raises here
    check_numerics()
    skipped = int(host_sums.pop('nonfinite')[0])
    scalars = metrics_lib.summarize(host_sums, 'train')
    scalars['train/nonfinite_steps'] = skipped
    if skipped:
      logging.warning('%d step(s) with a non-finite loss or gradient up to '
                      'step %d were skipped (first: step %d).', skipped, step,
                      int(first_bad))
    predictions = masker.max_predictions * config.batch_size * steps
    flops = metrics_lib.train_flops(mcfg, config.seq_len, tokens, predictions)
    scalars['train/learning_rate'] = float(lr_fn(step - 1))
    scalars['train/tokens_per_second'] = tokens / seconds
    if peak_total:
      scalars['train/mfu'] = flops / seconds / peak_total
    writer.write(step, scalars)
    per_step = (time.time() - run_start) / max(step - run_start_step, 1)
    logging.info('step %d/%d  loss %.4f  acc %.4f  %.0f tok/s  ETA %s', step,
                 config.num_steps, scalars['train/loss'],
                 scalars['train/accuracy'], tokens / seconds,
                 _format_eta(per_step * (last_step - step)))

  def save(step):
    nonlocal last_saved, pending
    if pending is not None:  # every record up to a checkpoint is on disk first
      report(*pending)
      pending = None
    writer.sync()
    check_numerics()  # never save after a non-finite step under 'stop'
    checkpoint.save(ckpt, step, state, train_iter.get_state(), data_settings)
    last_saved = step

  last_step = config.num_steps
  if config.steps_per_run:
    last_step = min(last_step, start_step + config.steps_per_run)
  stop_reason = None
  if watcher.signal_name:
    logging.warning('%s before the first step: nothing new to save; '
                    'exiting.', watcher.signal_name)
    checkpoint.finish(ckpt)
    writer.close()
    return state
  try:
    for step in range(start_step + 1, last_step + 1):
      local = next(train_iter)
      real_tokens += int(np.count_nonzero(local['segment_ids']))
      window_steps += 1
      state, m = p_train_step(state, to_device(local))
      if sums is None:  # a window's first step: start from zeros
        sums = jax.tree.map(jnp.zeros_like, m)
      sums, first_bad = _accumulate((sums, first_bad), m, step)
      if step == start_step + 1:
        # Keep compilation out of the first window's throughput.
        jax.block_until_ready(m)
        real_tokens, window_steps, last_fetch = 0, 0, time.time()
      if pending is not None:
        report(*pending)
        pending = None
      preempted = watcher.should_stop(step)
      if (step % config.log_every == 0 or step == last_step or
          (preempted and window_steps)):
        # This process's real tokens, scaled to the global batch.
        pending = (step, sums, real_tokens * jax.process_count(), window_steps)
        sums, real_tokens, window_steps = None, 0, 0
      if step % config.eval_every == 0 or step == config.num_steps:
        if pending is not None:
          report(*pending)
          pending = None
        scalars = evaluate(state.params)
        writer.write(step, scalars)
        logging.info('eval at step %d: %s', step,
                     ', '.join(f'{k} {v:.4f}' for k, v in scalars.items()))
        last_fetch = time.time()
      if (step % config.checkpoint_every == 0 or step == config.num_steps or
          step == last_step or preempted):
        save(step)
      if preempted:
        # The step is complete (its eval and checkpoint included): stop.
        stop_reason = (f'{watcher.signal_name} at step {step}: checkpoint '
                       'saved; run the same command to resume')
        last_step = step
        break
    if pending is not None:
      report(*pending)
    checkpoint.finish(ckpt)  # waits for the last save; raises its error
  except BaseException:
    checkpoint.abandon(ckpt)  # lets a save in flight finish, then closes
    raise
  finally:
    writer.close()
  if stop_reason is None and last_step < config.num_steps:
    stop_reason = 'steps_per_run reached; run again to continue'
  # A preemption is worth a warning: it is the line a cluster user looks for.
  log = logging.warning if watcher.signal_name else logging.info
  log('Stopped at step %d/%d after %s%s.', last_step, config.num_steps,
      _format_eta(time.time() - run_start),
      f' ({stop_reason})' if stop_reason else '')
  return state
