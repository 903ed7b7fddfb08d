"""`python -m mlm_jax.bench quality`: time to a held-out MLM loss, side by side.

  python -m mlm_jax.bench quality [--quality_sizes=tiny,mini]
      [--quality_budget_s=60] [--quality_lrs=5e-4,1e-3,2e-3]
      [--quality_best_lrs=1e-3,2e-3,4e-3] [--json=quality.json]
      [--quality_png=quality.png]

The contenders (bench_quality_peers: mlm_jax with the BERT recipe and with
our best recipe, HF FlaxBertForMaskedLM as run_mlm_flax.py drives it, HF
PyTorch BertForMaskedLM as the Trainer drives it) train one after the other
in this process, at each size, on the same corpus and tokenizer
(data.prepare), the same sequence length and batch, each for the same
budget of training seconds, once per learning rate of its sweep (all sweeps
the same size). Runs go learning rate by learning rate, every contender in
turn, so a change of the machine's load hits all alike; the load average is
logged at every eval.

The eval is one set of rows and masks, made once (`eval_set`): the held-out
rows, each cut to its first document (so positions and attention mean the
same to every model), masked once with a fixed key (15%, 80/10/10). Every
contender's forward pass scores those arrays, and one function (`score`)
turns its logits into mean cross-entropy over the predicted positions and
accuracy at the [MASK]-replaced ones. The training clock stops while
evaluating. A contender's best rate is the one with the lowest eval loss;
the target is the best loss the worst contender reached, and each
contender's time to target is when its best run's curve first reaches it
(linear between evals).

Must not: train (the contenders do) or write BENCHMARKS.md.
"""
import gc
import os
import platform
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

from configs import cpu
from mlm_jax import bench_peers
from mlm_jax import bench_quality_peers as peers
from mlm_jax import data
from mlm_jax import masking
from mlm_jax import model_config
from mlm_jax import plot

_SIZES = flags.DEFINE_list('quality_sizes', ['tiny', 'mini'],
                           'quality: model.PRESETS sizes, raced in turn.')
_BUDGET = flags.DEFINE_float('quality_budget_s', 60.0,
                             'quality: training seconds per run.')
_CONTENDERS = flags.DEFINE_list('quality_contenders', list(peers.NAMES),
                                'quality: who races.')
_LRS = flags.DEFINE_list('quality_lrs', ['5e-4', '1e-3', '2e-3'],
                         'quality: learning rates of the BERT-architecture '
                         'contenders (mlm_jax_bert, hf_flax, hf_torch).')
_BEST_LRS = flags.DEFINE_list('quality_best_lrs', ['1e-3', '2e-3', '4e-3'],
                              'quality: learning rates of mlm_jax_best (as '
                              'many as --quality_lrs).')
_BEST = flags.DEFINE_enum('quality_best', 'demo', peers.BEST_RECIPES,
                          "quality: our best recipe: configs/cpu.py's "
                          "('demo') or configs/modern.py's.")
_BATCH = flags.DEFINE_integer('quality_batch', 32, 'quality: rows per step.')
_SEQ = flags.DEFINE_integer('quality_seq', 128, 'quality: tokens per row.')
_EVALS = flags.DEFINE_integer('quality_evals', 12,
                              'quality: evals per run after the one at 0 s.')
_EVAL_ROWS = flags.DEFINE_integer(
    'quality_eval_rows', 0, 'quality: held-out rows scored (0: all, rounded '
    'down to a multiple of the eval batch).')
_WARMUP_FRAC = flags.DEFINE_float('quality_warmup_frac', 0.1,
                                  'quality: warmup steps / planned steps.')
_SOURCE = flags.DEFINE_string('quality_source', 'demo', 'quality: data.source.')
_DATA_DIR = flags.DEFINE_string('quality_data_dir', '',
                                "quality: data.data_dir ('': the default).")
_VOCAB = flags.DEFINE_integer('quality_vocab_size', 8192,
                              "quality: the tokenizer's vocabulary.")
_PNG = flags.DEFINE_string('quality_png', '', 'quality: plot to this PNG.')
_SEED = 0
_EVAL_BATCH = 32
_CALIBRATION_TURNS = 5  # timed steps each, after 2 untimed (compile, caches)


def check_flags() -> None:
  """Every flag checked before any work: a clear error, not minutes later."""
  sizes = set(model_config.PRESETS)
  if not _SIZES.value or set(_SIZES.value) - sizes:
    raise app.UsageError(f'--quality_sizes={_SIZES.value}: each must be one '
                         f'of {sorted(sizes)}.')
  if not _CONTENDERS.value or set(_CONTENDERS.value) - set(peers.NAMES):
    raise app.UsageError(f'--quality_contenders={_CONTENDERS.value}: each '
                         f'must be one of {list(peers.NAMES)}.')
  try:
    lrs = [float(x) for x in _LRS.value + _BEST_LRS.value]
  except ValueError as e:
    raise app.UsageError(f'A learning rate is not a number: {e}') from e
  if not _LRS.value or len(_LRS.value) != len(_BEST_LRS.value) or min(lrs) <= 0:
    raise app.UsageError('--quality_lrs and --quality_best_lrs must be '
                         'positive and as many (every sweep the same size).')
  if _BUDGET.value <= 0 or _EVALS.value < 1 or _BATCH.value < 1:
    raise app.UsageError('--quality_budget_s, --quality_evals and '
                         '--quality_batch must be positive.')
  if not 0 <= _WARMUP_FRAC.value < 1:
    raise app.UsageError('--quality_warmup_frac must be in [0, 1).')


def eval_set(eval_source, tokenizer, seq_len: int, rows: int, seed: int):
  """The one eval every contender is scored on, as numpy arrays.

  Held-out rows cut after their first document (the rest [PAD]), so a row
  is one segment at positions 0.. for every model; masked once with a fixed
  key by our token masker (15%, 80% [MASK], 10% random, 10% kept).
  """
  n = len(eval_source) if not rows else min(rows, len(eval_source))
  n = n // _EVAL_BATCH * _EVAL_BATCH
  if not n:
    raise ValueError(f'{len(eval_source)} held-out rows: fewer than one eval '
                     f'batch of {_EVAL_BATCH}.')
  ids_BxL = np.stack([np.asarray(eval_source[i]['input_ids'])
                      for i in range(n)]).astype(np.int32)
  segments_BxL = np.stack([np.asarray(eval_source[i]['segment_ids'])
                           for i in range(n)])
  first_BxL = segments_BxL == 1
  ids_BxL = np.where(first_BxL, ids_BxL, tokenizer.pad_id).astype(np.int32)
  masker = masking.Masker(
      special_ids=tuple(tokenizer.special_ids), mask_id=tokenizer.mask_id,
      vocab_size=tokenizer.vocab_size,
      max_predictions=masking.static_max_predictions(seq_len, 0.15))
  key = jax.random.fold_in(jax.random.key(seed), 0xE7A1)
  m = jax.device_get(masker(key, ids_BxL, None, 0.15))
  return {'inputs_BxL': np.asarray(m.inputs_BxL, np.int32),
          'attention_BxL': first_BxL.astype(np.int32),
          'positions_BxK': np.asarray(m.positions_BxK, np.int32),
          'targets_BxK': np.asarray(m.targets_BxK, np.int32),
          'weights_BxK': np.asarray(m.weights_BxK, np.float64),
          'kinds_BxK': np.asarray(m.kinds_BxK, np.int32)}


def score(logits_fn, ev: dict) -> dict:
  """The shared eval: logits_fn(inputs, attention, positions) -> [B, K, V].

  Mean cross-entropy and accuracy over all predicted positions, and both
  at the [MASK]-replaced ones, in float64 on the host: the same arithmetic
  on the same positions for every contender.
  """
  sums = np.zeros(6)
  for s in range(0, len(ev['inputs_BxL']), _EVAL_BATCH):
    part = {k: v[s:s + _EVAL_BATCH] for k, v in ev.items()}
    logits_BxKxV = np.asarray(logits_fn(
        part['inputs_BxL'], part['attention_BxL'], part['positions_BxK']),
                              np.float64)
    top_BxK = logits_BxKxV.max(-1)
    logz_BxK = top_BxK + np.log(np.exp(
        logits_BxKxV - top_BxK[..., None]).sum(-1))
    target_BxK = np.take_along_axis(
        logits_BxKxV, part['targets_BxK'][..., None], -1)[..., 0]
    w_BxK = part['weights_BxK']
    ce_BxK = np.where(w_BxK > 0, logz_BxK - target_BxK, 0.0)
    hit_BxK = (logits_BxKxV.argmax(-1) == part['targets_BxK']) * w_BxK
    at_mask_BxK = w_BxK * (part['kinds_BxK'] == masking.REPLACED_MASK)
    sums += [np.sum(ce_BxK * w_BxK), np.sum(hit_BxK), np.sum(w_BxK),
             np.sum(ce_BxK * at_mask_BxK), np.sum(hit_BxK * at_mask_BxK),
             np.sum(at_mask_BxK)]
  return {'loss': sums[0] / sums[2], 'accuracy': sums[1] / sums[2],
          'mask_loss': sums[3] / sums[5], 'mask_accuracy': sums[4] / sums[5]}


def _timed_steps(trainer, n: int) -> float:
  start = time.perf_counter()
  for _ in range(n):
    trainer.step()
  trainer.sync()
  return time.perf_counter() - start


def calibrate(names, config_of, prepared, blocks) -> dict:
  """{name: seconds of its first step (compile) and of each step after}, so
  every run's schedule can end at the budget. Untimed and thrown away; the
  contenders take turns, so a change of the machine's load hits all alike."""
  trainers = {n: peers.make(n, config_of[n](1e-4, 1000), prepared, blocks)
              for n in names}
  out = {n: {'first_step_s': _timed_steps(t, 1)} for n, t in trainers.items()}
  for t in trainers.values():
    _timed_steps(t, 1)
  times = {n: [] for n in names}
  for turn in range(_CALIBRATION_TURNS):
    for n in (names if turn % 2 == 0 else names[::-1]):
      times[n].append(_timed_steps(trainers[n], 1))
  for n in names:
    out[n]['step_s'] = float(np.median(times[n]))
  del trainers
  gc.collect()
  return out


def run_one(trainer, budget_s: float, num_steps: int, evals: int, ev: dict,
            step_s: float) -> dict:
  """Trains for `budget_s` training seconds (or `num_steps`), scoring the
  eval at 0 s and every budget/evals seconds; the clock stops meanwhile.

  The first step (a JAX contender compiles in it) counts as `step_s`, the
  calibrated time of a later step; what it took beyond that is reported as
  compile_s, off the clock for every contender alike.
  """
  def point(train_s, steps, tokens):
    m = score(trainer.logits, ev)
    return {'train_s': train_s, 'steps': steps, 'tokens': tokens,
            'load': os.getloadavg()[0], **m}

  curve = [point(0.0, 0, 0)]
  start = time.perf_counter()
  tokens, steps = trainer.step(), 1
  trainer.sync()
  first_s = time.perf_counter() - start
  train_s = min(first_s, step_s)
  next_eval = budget_s / evals
  while True:
    last = train_s >= budget_s or steps >= num_steps
    if last or train_s >= next_eval:
      curve.append(point(train_s, steps, tokens))
      while next_eval <= train_s:
        next_eval += budget_s / evals
    if last:
      break
    start = time.perf_counter()
    tokens += trainer.step()
    steps += 1
    elapsed = time.perf_counter() - start
    if (train_s + elapsed >= min(next_eval, budget_s) or steps >= num_steps):
      trainer.sync()  # the clock must include the work it waits on
      elapsed = time.perf_counter() - start
    train_s += elapsed
  return {'steps': steps, 'num_steps': num_steps, 'train_s': train_s,
          'tokens': tokens, 'compile_s': first_s - min(first_s, step_s),
          'curve': curve,
          'best_loss': min(p['loss'] for p in curve),
          'final_loss': curve[-1]['loss'],
          'final_mask_accuracy': curve[-1]['mask_accuracy']}


def time_to(curve, target: float, axis: str = 'train_s'):
  """When `curve` first reaches loss <= target, linear between its points;
  None if it never does."""
  if curve and curve[0]['loss'] <= target:
    return curve[0][axis]
  for prev, cur in zip(curve, curve[1:]):
    if cur['loss'] <= target:
      frac = (prev['loss'] - target) / (prev['loss'] - cur['loss'])
      return prev[axis] + frac * (cur[axis] - prev[axis])
  return None


def summarize(contenders: dict) -> dict:
  """Best rate per contender, the target, times to it and the ratios."""
  best = {}
  for name, c in contenders.items():
    lr, run = min(c['runs'].items(), key=lambda kv: kv[1]['best_loss'])
    c['best_lr'] = float(lr)
    best[name] = run
  slowest = max(best, key=lambda n: best[n]['best_loss'])
  target = best[slowest]['best_loss']
  for name, c in contenders.items():
    for run in c['runs'].values():
      run['time_to_target_s'] = time_to(run['curve'], target)
      run['tokens_to_target'] = time_to(run['curve'], target, 'tokens')
    c['time_to_target_s'] = best[name]['time_to_target_s']
    c['tokens_to_target'] = best[name]['tokens_to_target']
  def ratio(a, b):
    return a / b if a is not None and b else None

  ratios, with_compile = {}, {}
  for ours in ('mlm_jax_best', 'mlm_jax_bert'):
    for peer in ('hf_flax', 'hf_torch'):
      if ours in contenders and peer in contenders:
        a, b = (contenders[n]['time_to_target_s'] for n in (ours, peer))
        ratios[f'{ours}/{peer}'] = ratio(a, b)
        # The same with each one's first-step compile time put back.
        a2, b2 = (None if t is None else t + best[n]['compile_s']
                  for n, t in ((ours, a), (peer, b)))
        with_compile[f'{ours}/{peer}'] = ratio(a2, b2)
  return {'target_loss': target, 'slowest': slowest, 'ratios': ratios,
          'ratios_with_compile': with_compile}


def _machine() -> dict:
  model = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      model = next((l.split(':', 1)[1].strip() for l in f
                    if l.startswith('model name')), model)
  except OSError:
    pass
  versions = {}
  for name in ('jax', 'flax', 'transformers', 'torch'):
    versions[name] = getattr(sys.modules.get(name) or __import__(name),
                             '__version__', None)
  return {'cpu': model, 'cores': len(os.sched_getaffinity(0)),
          'device_kind': jax.devices()[0].device_kind,
          'commit': bench_peers.commit(),
          'date_utc': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
          'versions': versions}


def quality_bench() -> dict:
  """The race at every size; the JSON of bench.py's --json."""
  check_flags()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  data_config = cpu.get_config().data
  data_config.source, data_config.vocab_size = _SOURCE.value, _VOCAB.value
  data_config.data_dir = _DATA_DIR.value
  seq_len = _SEQ.value
  result = {'benchmark': 'quality', 'argv': sys.argv,
            'budget_s': _BUDGET.value, 'batch': _BATCH.value,
            'seq_len': seq_len, 'evals_per_run': _EVALS.value,
            'warmup_frac': _WARMUP_FRAC.value, 'best_recipe': _BEST.value,
            'source': _SOURCE.value, 'load_before': os.getloadavg()[0],
            **_machine(), 'sizes': {}}
  prepared = data.prepare(data_config, seq_len)
  ev = eval_set(prepared.eval_source, prepared.tokenizer, seq_len,
                _EVAL_ROWS.value, _SEED)
  blocks = peers.hf_blocks(prepared.train_source, seq_len)
  result['eval'] = {'rows': len(ev['inputs_BxL']),
                    'predictions': int(ev['weights_BxK'].sum()),
                    'mask_positions': int(np.sum(
                        ev['weights_BxK'] *
                        (ev['kinds_BxK'] == masking.REPLACED_MASK)))}
  result['train_rows'] = len(prepared.train_source)
  result['hf_blocks'] = len(blocks)
  names = _CONTENDERS.value
  for size in _SIZES.value:
    config_of = {
        name: (lambda lr, steps, name=name, size=size:
               peers.contender_config(
                   name, size=size, batch=_BATCH.value, seq_len=seq_len,
                   learning_rate=lr, num_steps=steps,
                   warmup_frac=_WARMUP_FRAC.value, seed=_SEED,
                   data_config=data_config, best=_BEST.value))
        for name in names}
    calibration = calibrate(names, config_of, prepared, blocks)
    contenders = {}
    for name in names:
      lrs = _BEST_LRS.value if name == 'mlm_jax_best' else _LRS.value
      cal = calibration[name]
      # The schedule ends at the budget (compile time is off the clock).
      steps = max(10, int(_BUDGET.value / cal['step_s']))
      contenders[name] = {'lrs': [float(x) for x in lrs], 'calibration': cal,
                          'planned_steps': steps, 'runs': {}}
      print(f'[{size}] {name}: {cal["step_s"] * 1e3:.0f} ms/step, first step '
            f'{cal["first_step_s"]:.1f} s -> {steps} planned steps',
            flush=True)
    for i in range(len(_LRS.value)):
      for name in names:
        c = contenders[name]
        lr = c['lrs'][i]
        load_before = os.getloadavg()[0]
        trainer = peers.make(name, config_of[name](lr, c['planned_steps']),
                             prepared, blocks)
        run = run_one(trainer, _BUDGET.value, c['planned_steps'],
                      _EVALS.value, ev, c['calibration']['step_s'])
        del trainer
        gc.collect()
        run.update(lr=lr, load_before=load_before,
                   load_after=os.getloadavg()[0])
        c['runs'][repr(lr)] = run
        print(f'[{size}] {name} lr {lr:g}: {run["steps"]} steps in '
              f'{run["train_s"]:.1f} s, eval loss {run["final_loss"]:.4f} '
              f'(best {run["best_loss"]:.4f}), [MASK] acc '
              f'{run["final_mask_accuracy"]:.4f}, load '
              f'{load_before:.2f} -> {run["load_after"]:.2f}', flush=True)
    result['sizes'][size] = {'contenders': contenders,
                             **summarize(contenders)}
  result['load_after'] = os.getloadavg()[0]
  if _PNG.value:
    plot.draw_quality(result, _PNG.value)
    result['png'] = _PNG.value
  return result


def print_quality(result: dict) -> None:
  print(f"quality: {result['budget_s']:g} training s per run, batch "
        f"{result['batch']} x {result['seq_len']}, {result['source']} corpus, "
        f"eval {result['eval']['rows']} rows / "
        f"{result['eval']['predictions']} predictions "
        f"({result['eval']['mask_positions']} [MASK])")
  print(f"{result['cpu']}, {result['cores']} cores, commit {result['commit']}"
        f", {result['date_utc']}, load {result['load_before']:.2f} -> "
        f"{result['load_after']:.2f}")
  for size, s in result['sizes'].items():
    print(f"[{size}] target loss {s['target_loss']:.4f} (best of "
          f"{s['slowest']}, the worst)")
    print(f"{'contender':<13} {'lr':>8} {'steps':>6} {'final loss':>11} "
          f"{'best loss':>10} {'[MASK] acc':>10} {'to target s':>12}")
    for name, c in s['contenders'].items():
      for run in c['runs'].values():
        t = run['time_to_target_s']
        mark = '*' if run['lr'] == c['best_lr'] else ' '
        print(f"{name:<13} {run['lr']:>7g}{mark} {run['steps']:>6} "
              f"{run['final_loss']:>11.4f} {run['best_loss']:>10.4f} "
              f"{run['final_mask_accuracy']:>10.4f} "
              f"{'-' if t is None else f'{t:.1f}':>12}")
    for k, v in s['ratios'].items():
      print(f"[{size}] time to target {k}: "
            f"{'-' if v is None else f'{v:.3f}'}")
