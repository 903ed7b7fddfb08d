"""One build of a run: what training, AOT analysis and the benchmarks share.

`build(config)` checks the config and the mesh, then makes, in this order,
the tokenizer (with the packed data, through data.prepare), the model
config, the optimizer, the maskers, the abstract train state with its
shardings, and the jitted train and eval steps:

  built = build.build(config)               # or tokenizer=..., vocab_size=N
  state = built.init()                      # the sharded TrainState
  state, metrics = built.train_step(state, built.to_device(local_batch))
  metrics = built.eval_step(state.params, built.to_global(local_batch), key)

Nothing is allocated until `built.init()` runs (a resume reads a checkpoint
straight into `built.abstract_state` instead), and nothing is compiled until
a step is first called or lowered.

Must not: touch a workdir, read checkpoints, run a step, or hold the loop's
state; its helpers take values, not the config (the config is read here).
"""
import dataclasses
import functools
import types
from typing import Any, Callable

from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlm_jax import data as data_lib
from mlm_jax import masking
from mlm_jax import model
from mlm_jax import model_config
from mlm_jax import optimizer
from mlm_jax import sharding
from mlm_jax import steps
from mlm_jax.data import pipeline
from mlm_jax.data import tokenizer as tokenizer_lib


@dataclasses.dataclass(frozen=True)
class Built:
  """Everything a run needs before its first step (see the module docstring)."""
  config: Any
  tokenizer: Any
  data: data_lib.Prepared | None  # the packed splits, if build prepared them
  mesh: jax.sharding.Mesh
  model_config: model_config.ModelConfig
  tx: optax.GradientTransformationExtraArgs
  masker: masking.Masker
  rate_fn: Callable[[jax.Array], jax.Array]
  eval_masker: masking.Masker
  graphdef: Any
  abstract_state: steps.TrainState   # ShapeDtypeStructs with their shardings
  state_sharding: steps.TrainState
  init: Callable[[], steps.TrainState]
  train_step: Callable            # (state, device batch) -> (state, metrics)
  to_device: Callable[[dict], dict]  # a host's rows -> train_step's batch
  eval_step: Callable             # (params, global batch, key) -> metrics
  to_global: Callable[[dict], dict]  # a host's rows -> eval_step's batch

  @property
  def num_params(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.abstract_state.params))


def validate(config):
  """Checks of the config alone (no devices, no data): fail before any work."""
  if config.seq_len > config.model.max_len:
    raise ValueError(
        f'seq_len={config.seq_len} exceeds model.max_len='
        f'{config.model.max_len} position embeddings; lower --config.seq_len '
        f'or raise --config.model.max_len.')
  masking.check_config(config)
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
  model_config.from_config(config, vocab_size=1)  # size preset and head count
  optimizer.create(config)  # grad_clip_norm


def tokenizer_stub(vocab_size: int):
  """What the maskers read of a tokenizer, for runs without one (AOT, bench):
  the standard special ids, [MASK], and every token starting a word."""
  return types.SimpleNamespace(
      special_ids=tokenizer_lib.SPECIAL_IDS,
      mask_id=tokenizer_lib.SPECIALS['[MASK]'], vocab_size=vocab_size,
      word_start_mask=lambda: np.ones([vocab_size], bool))


def abstract_state(mcfg, seed: int, tx, mesh):
  """(init function, graphdef, abstract state, state shardings); no memory.

  The abstract state's leaves are ShapeDtypeStructs with their shardings.
  Parameters and the optimizer's per-parameter state (Adam's moments) share
  one sharding from the rules table, so FSDP shards both; counters and the
  RNG are replicated.
  """
  params_key, train_key = jax.random.split(jax.random.key(seed))

  def init():
    params = nnx.split(model.create(mcfg, params_key), nnx.Param)[1]
    return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=tx.init(params),
                            rng=jax.random.key_data(train_key))

  abstract_model = nnx.eval_shape(lambda: model.create(mcfg, params_key))
  graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
  params_sharding = sharding.param_shardings(
      mesh, nnx.get_partition_spec(abstract_params), abstract_params)
  shapes = jax.eval_shape(init)
  replicated = sharding.replicated(mesh)
  opt_sharding = optax.tree_map_params(
      tx, lambda _, s: s, shapes.opt_state, params_sharding,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  state_sharding = steps.TrainState(step=replicated, params=params_sharding,
                                    opt_state=opt_sharding, rng=replicated)
  shapes = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      shapes, state_sharding)
  return init, graphdef, shapes, state_sharding


def init_state(mcfg, seed: int, tx, mesh):
  """(graphdef, sharded state, state shardings), built without a host copy."""
  init, graphdef, _, state_sharding = abstract_state(mcfg, seed, tx, mesh)
  return graphdef, jax.jit(init, out_shardings=state_sharding)(), state_sharding


def make_train_step(mesh, state_sharding, *, parallelism: str = 'pjit',
                    grad_accum_steps: int = 1, **static):
  """(step function, local batch -> its device input) for `parallelism`.

  `static` (graphdef, tx, masker, rate_fn) is bound into `steps.train_step`
  with `grad_accum_steps`. Both modes run the same pure step: 'pjit' jits it over the whole mesh with the
  state and batch shardings (activations pinned by the model's logical
  constraints under `jax.set_mesh`); 'pmap' maps it over the devices with
  the state replicated and gradients psummed.
  """
  step_fn = functools.partial(steps.train_step,
                              grad_accum_steps=grad_accum_steps, **static)
  if parallelism == 'pmap':
    return (sharding.pmap_step(step_fn),
            functools.partial(sharding.pmap_batch, mesh=mesh))
  jitted = jax.jit(step_fn, in_shardings=(state_sharding,
                                          sharding.batch_sharding(mesh)),
                   out_shardings=(state_sharding, sharding.replicated(mesh)),
                   donate_argnums=0)
  return (_UnderMesh(jitted, mesh),
          functools.partial(sharding.global_batch, mesh=mesh))


@dataclasses.dataclass(frozen=True)
class _UnderMesh:
  """A jitted step called (or lowered) under its mesh, so that the model's
  logical sharding constraints resolve."""
  jitted: Any
  mesh: jax.sharding.Mesh

  def __call__(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args)


def build(config, *, tokenizer=None, vocab_size: int = 0,
          mesh=None) -> Built:
  """The run of `config`, ready for `init()` or a restore.

  The tokenizer: `tokenizer` if given; else, with `vocab_size`, a stub with
  the standard special ids (AOT, benchmarks on random ids); else the one
  data.prepare trains or loads for config.data, and then `built.data` holds
  the packed splits and the eval reports `baseline_accuracy` against the
  training data's most frequent token. `mesh`: made from the config if None.
  Every check of the config and the mesh runs before any data work.
  """
  validate(config)
  if mesh is None:
    mesh = sharding.make_mesh(config)
  sharding.check_batch_size(config.batch_size, mesh, config.grad_accum_steps)
  sharding.check_model(model_config.from_config(config, vocab_size=1), mesh)
  prepared, baseline_id = None, None
  if tokenizer is None and vocab_size:
    tokenizer = tokenizer_stub(vocab_size)
  elif tokenizer is None:
    prepared = data_lib.prepare(config.data, config.seq_len)
    tokenizer = prepared.tokenizer
    baseline_id = pipeline.most_frequent_token(prepared.train_source,
                                               tokenizer.special_ids)
    logging.info('Most frequent training token: %r (id %d), the eval '
                 'baseline.', tokenizer.id_to_piece(baseline_id), baseline_id)
  mcfg = model_config.from_config(config, tokenizer.vocab_size)
  tx = optimizer.create(config)
  masker, rate_fn, eval_masker = masking.from_config(config, tokenizer)
  init, graphdef, shapes, state_sharding = abstract_state(mcfg, config.seed,
                                                          tx, mesh)
  train_step, to_device = make_train_step(
      mesh, state_sharding, parallelism=config.parallelism,
      grad_accum_steps=config.grad_accum_steps, graphdef=graphdef, tx=tx,
      masker=masker, rate_fn=rate_fn)
  eval_step = jax.jit(
      functools.partial(steps.eval_step, graphdef=graphdef,
                        masker=eval_masker, rate=config.mask.eval_rate,
                        baseline_id=baseline_id),
      in_shardings=(state_sharding.params, sharding.batch_sharding(mesh),
                    None),
      out_shardings=sharding.replicated(mesh))
  built = Built(
      config=config, tokenizer=tokenizer, data=prepared, mesh=mesh,
      model_config=mcfg, tx=tx, masker=masker, rate_fn=rate_fn,
      eval_masker=eval_masker, graphdef=graphdef, abstract_state=shapes,
      state_sharding=state_sharding,
      init=jax.jit(init, out_shardings=state_sharding),
      train_step=train_step, to_device=to_device, eval_step=eval_step,
      to_global=functools.partial(sharding.global_batch, mesh=mesh))
  logging.info('Model %s: %.2fM parameters.', mcfg, built.num_params / 1e6)
  logging.info('Mesh %s, %s, %d micro-batch(es) per step.', dict(mesh.shape),
               config.parallelism, config.grad_accum_steps)
  return built
