"""Benchmarks: python -m mlm_jax.bench SUBCOMMAND [--flags].

  masking  our BERT masking (`masking.mask_tokens`, jitted, on the default
           device) against Hugging Face's DataCollatorForLanguageModeling
           (numpy, on the host) on the same token rows.
  train    one full training step (masking, forward, loss, backward, AdamW)
           of ours against HF FlaxBertForMaskedLM and HF BertForMaskedLM
           (PyTorch) at the same shape, interleaved, with a matmul peak
           measured in the same run for MFU: --model, --batch, --seq.
  e2e      the real training loop (train.train_and_evaluate on the demo
           corpus) against our bare step at the same shape, and the
           corpus's packing efficiency.

Each prints a table and, with --json=FILE, writes the same numbers as JSON.
Results and the machines they came from are kept in BENCHMARKS.md.
"""
import dataclasses
import json
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from mlm_jax import bench_data
from mlm_jax import bench_quality
from mlm_jax import build
from mlm_jax import data
from mlm_jax import bench_peers as peers
from mlm_jax import host_memory
from mlm_jax import masking
from mlm_jax import metrics
from mlm_jax import train
from mlm_jax.data import pipeline
from mlm_jax.data import tokenizer as tokenizer_lib

_BATCH_SIZE = flags.DEFINE_integer('batch_size', 256, 'Rows per batch.')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 128, 'Tokens per row.')
_VOCAB_SIZE = flags.DEFINE_integer('vocab_size', 30522, "BERT's by default.")
_RATE = flags.DEFINE_float('rate', 0.15, 'Fraction of tokens to predict.')
_REPEATS = flags.DEFINE_integer('repeats', 20, 'Timed calls per contender.')
_BLOCK = flags.DEFINE_integer(
    'block', 1, 'Calls in a row per contender before the other runs; 1 '
    'alternates call by call.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed calls first (compiles).')
_JSON = flags.DEFINE_string('json', None, 'Also write the figures here.')
_SEED = flags.DEFINE_integer('seed', 0, 'For the token rows and our key.')
# train and e2e
_MODEL = flags.DEFINE_string('model', 'base', 'train/e2e: model.PRESETS size.')
_BATCH = flags.DEFINE_integer('batch', 8, 'train/e2e: rows per step.')
_SEQ = flags.DEFINE_integer('seq', 128, 'train/e2e: tokens per row.')
_CONTENDERS = flags.DEFINE_list(
    'contenders', 'mlm_jax,hf_flax,hf_torch', 'train: systems to time.')
_DTYPE = flags.DEFINE_string('dtype', 'float32',
                             'train/e2e: compute dtype of ours and HF Flax.')
_ATTENTION = flags.DEFINE_string(
    'attention', 'xla', "train/e2e: our kernel; 'cudnn' sets attention "
    'dropout to 0 for every contender.')
_VOCAB_MULTIPLE = flags.DEFINE_integer('vocab_multiple', 1,
                                       'train/e2e: our vocabulary padding.')
_THREADS = flags.DEFINE_integer(
    'threads', 0, "train: torch's threads; 0: this process's cores, as XLA "
    'uses.')
_TORCH_COMPILE = flags.DEFINE_bool('torch_compile', False,
                                   'train: torch.compile the PyTorch model.')
_STEPS = flags.DEFINE_integer('steps', 30, 'e2e: loop steps after warm-up.')
_DATA_DIR = flags.DEFINE_string('data_dir', '', "e2e: data.data_dir ('': "
                                'the default cache).')
_KEEP_FREED = flags.DEFINE_bool(
    'keep_freed_memory', True, 'host_memory.keep_freed_memory() first (CPU '
    'only; one process, so every contender alike).')
_DATA_VOCAB = flags.DEFINE_integer('data_vocab_size', 8192,
                                   "e2e: the demo tokenizer's vocabulary.")

PAD, UNK, CLS, SEP, MASK = tokenizer_lib.SPECIALS.values()
SPECIAL_IDS = tuple(tokenizer_lib.SPECIALS.values())
_MEAN_DOC_LEN = 40  # mean document piece between [SEP]s in a packed row
_PADDED_EVERY = 8   # every 8th row ends early and is padded


def packed_rows(rng, batch: int, seq_len: int, vocab_size: int,
                padded_every: int = _PADDED_EVERY) -> np.ndarray:
  """int32 [B, L] rows laid out as data/builder.py packs them.

  `[CLS] a a [SEP] b b b [SEP] c ...`; every `padded_every`th row (0: none)
  ends in [SEP] then [PAD]s (in real data only a split's last row is, but
  padding changes how many tokens either masking contender may mask, so the
  masking benchmark includes it).
  """
  ids_BxL = rng.integers(len(SPECIAL_IDS), vocab_size, (batch, seq_len),
                         dtype=np.int32)
  ids_BxL[:, 0] = CLS
  for row in ids_BxL:
    pos = int(rng.geometric(1 / _MEAN_DOC_LEN))
    while pos < seq_len:
      row[pos] = SEP
      pos += 1 + int(rng.geometric(1 / _MEAN_DOC_LEN))
  for row in ids_BxL[::padded_every] if padded_every else ():
    end = int(rng.integers(2, seq_len))
    row[end - 1], row[end:] = SEP, PAD
  return ids_BxL


def _time_interleaved(contenders: dict, warmup: int, repeats: int,
                      block: int = 1) -> dict:
  """Seconds per call for each contender, in turns of `block` calls each.

  The machine may be shared, so a slow spell hits both alike; the starting
  contender swaps every turn so neither always runs on a cache the other
  just warmed or evicted. block=1 alternates call by call, which also makes
  every call of ours start from an idle XLA thread pool (see BENCHMARKS.md).
  """
  names = list(contenders)
  for i in range(warmup):
    for name in names:
      contenders[name](i)
  times = {name: [] for name in names}
  for turn in range(-(-repeats // block)):
    for name in (names if turn % 2 == 0 else names[::-1]):
      for _ in range(min(block, repeats - len(times[name]))):
        start = time.perf_counter()
        contenders[name](warmup + len(times[name]))
        times[name].append(time.perf_counter() - start)
  return times


def masking_bench() -> dict:
  """Times one batch of masking, ours on device against HF's on the host."""
  # Imported here: only this subcommand needs the `bench` extra.
  import transformers  # pylint: disable=g-import-not-at-top
  batch, seq_len = _BATCH_SIZE.value, _SEQ_LEN.value
  vocab_size, rate = _VOCAB_SIZE.value, _RATE.value
  ids_BxL = packed_rows(np.random.default_rng(_SEED.value), batch, seq_len,
                        vocab_size)

  # Ours as the train step runs it: the batch is already on the device and
  # the key is folded from the step inside the jitted function.
  mask = jax.jit(lambda key, step, ids: masking.mask_tokens(
      jax.random.fold_in(key, step), ids, special_ids=SPECIAL_IDS,
      mask_id=MASK, vocab_size=vocab_size, rate=rate, mask_prob=0.8,
      random_prob=0.1,
      max_predictions=masking.static_max_predictions(seq_len, rate)))
  key = jax.random.key(_SEED.value)
  ids_on_device = jax.device_put(ids_BxL)

  dispatch_s = []  # until the call returns: the host's share of our time

  def ours(step):
    start = time.perf_counter()
    masked = mask(key, step, ids_on_device)
    dispatch_s.append(time.perf_counter() - start)
    jax.block_until_ready(masked)

  # HF gets a list of int32 rows, as a numpy/grain loader yields them: the
  # collator np.stack()s equal-length rows (no padding work) and finds the
  # special tokens itself. Its other input, dicts with a precomputed
  # 'special_tokens_mask' (run_mlm's tokenizer output), routes every batch
  # through tokenizer.pad(), nearly twice as slow at 256x128 here, so it
  # would flatter us.
  collator = transformers.DataCollatorForLanguageModeling(
      peers.bert_tokenizer(vocab_size), mlm=True, mlm_probability=rate,
      return_tensors='np')
  examples = list(ids_BxL)

  def hf(step):
    del step  # the collator draws from numpy's global RNG
    collator(examples)

  times = _time_interleaved({'mlm_jax': ours, 'hf': hf}, _WARMUP.value,
                            _REPEATS.value, _BLOCK.value)
  result = {
      'benchmark': 'masking',
      'batch_shape': [batch, seq_len], 'vocab_size': vocab_size, 'rate': rate,
      'repeats': _REPEATS.value, 'warmup': _WARMUP.value,
      'block': _BLOCK.value,
      'device_kind': jax.devices()[0].device_kind,
      'jax_version': jax.__version__,
      'transformers_version': transformers.__version__,
      'contenders': {},
  }
  for name, seconds in times.items():
    median = statistics.median(seconds)
    result['contenders'][name] = {
        'median_s': median, 'tokens_per_s': batch * seq_len / median,
        'min_s': min(seconds), 'max_s': max(seconds)}
  # Ours is dispatched asynchronously: the host is busy only this long.
  result['contenders']['mlm_jax']['host_median_s'] = statistics.median(
      dispatch_s[_WARMUP.value:])
  # How many times faster ours is: HF seconds / our seconds per batch.
  result['speedup_ours_over_hf'] = (result['contenders']['hf']['median_s'] /
                                    result['contenders']['mlm_jax']['median_s'])
  return result


def segment_ids_of(ids_BxL: np.ndarray) -> np.ndarray:
  """Packed-document ids of rows from `packed_rows`: 1, 2, ...; 0 on [PAD]."""
  starts_BxL = np.zeros_like(ids_BxL)
  starts_BxL[:, 1:] = ids_BxL[:, :-1] == SEP  # a piece starts after a [SEP]
  return np.where(ids_BxL == PAD, 0, 1 + np.cumsum(starts_BxL, axis=1))


def bench_config(size: str, batch: int, seq_len: int, dtype: str = 'float32',
                 attention: str = 'xla', vocab_multiple: int = 1):
  """Our run config for a bench shape: the BERT recipe (as HF's), AdamW."""
  c = base.get_config()
  c.batch_size, c.seq_len = batch, seq_len
  c.model.size, c.model.dtype = size, dtype
  c.model.max_len = max(512, seq_len)
  c.model.attention, c.model.vocab_multiple = attention, vocab_multiple
  if attention == 'cudnn':
    c.model.attention_dropout_rate = 0.0  # cuDNN's kernel has none
  return c


def our_step(config, vocab_size: int, tokenizer=None):
  """(build.Built, a fresh state): exactly what train_and_evaluate builds,
  the jitted, donating train step with the masking inside it."""
  built = build.build(config, tokenizer=tokenizer, vocab_size=vocab_size)
  return built, built.init()


def _load() -> float:
  return os.getloadavg()[0]


def _threads() -> int:
  return _THREADS.value or len(os.sched_getaffinity(0))


def _versions() -> dict:
  out = {'device_kind': jax.devices()[0].device_kind,
         'jax_version': jax.__version__,
         'keep_freed_memory': host_memory.applied()}
  for name in ('transformers', 'torch'):
    try:
      out[f'{name}_version'] = __import__(name).__version__
    except ImportError:
      out[f'{name}_version'] = None
  return out


def train_bench() -> dict:
  """Times full train steps of ours and the peers, side by side."""
  batch, seq_len, vocab_size = _BATCH.value, _SEQ.value, _VOCAB_SIZE.value
  names = _CONTENDERS.value
  unknown = set(names) - {'mlm_jax', 'hf_flax', 'hf_torch'}
  if unknown:
    raise app.UsageError(f'Unknown --contenders {sorted(unknown)}.')
  config = bench_config(_MODEL.value, batch, seq_len, _DTYPE.value,
                        _ATTENTION.value, _VOCAB_MULTIPLE.value)
  config.seed = _SEED.value
  load_before = _load()
  # Every position is a real token, as in packed training data (only a
  # split's last row is padded there).
  ids_BxL = packed_rows(np.random.default_rng(_SEED.value), batch, seq_len,
                        vocab_size, padded_every=0)
  segment_ids_BxL = segment_ids_of(ids_BxL)
  real_tokens = int(np.count_nonzero(segment_ids_BxL))
  built, state = our_step(config, vocab_size)
  step, to_device = built.train_step, built.to_device
  mcfg, masker = built.model_config, built.masker
  contenders, flops = {}, {}
  holder = {'state': state}

  if 'mlm_jax' in names:
    our_batch = to_device({'input_ids': ids_BxL,
                           'segment_ids': segment_ids_BxL.astype(np.int32)})

    def ours(i):
      del i  # the step folds its own key from state.step
      holder['state'], m = step(holder['state'], our_batch)
      jax.block_until_ready((holder['state'], m))

    contenders['mlm_jax'] = ours
    flops['mlm_jax'] = metrics.train_flops(
        mcfg, seq_len, real_tokens, masker.max_predictions * batch)
  else:
    del holder['state']
  del state
  # The peers run HF's dense head (every position) over the unpadded vocab.
  hf_flops = metrics.train_flops(
      dataclasses.replace(mcfg, vocab_multiple=1), seq_len, real_tokens,
      batch * seq_len, sparse_last_layer=False)
  peer_batches = (peers.hf_batches(ids_BxL, 4, vocab_size, _RATE.value)
                  if {'hf_flax', 'hf_torch'} & set(names) else [])
  if 'hf_flax' in names:
    flax_step, flax_state = peers.hf_flax_step(config, mcfg)
    flax_batches = [jax.device_put(b) for b in peer_batches]
    flax_holder = {'state': flax_state, 'rng': jax.random.key(_SEED.value)}

    def hf_flax(i):
      flax_holder['state'], m, flax_holder['rng'] = flax_step(
          flax_holder['state'], flax_batches[i % len(flax_batches)],
          flax_holder['rng'])
      jax.block_until_ready((flax_holder['state'], m))

    contenders['hf_flax'] = hf_flax
    flops['hf_flax'] = hf_flops
  if 'hf_torch' in names:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(_threads())
    torch_step = peers.hf_torch_step(config, mcfg, _TORCH_COMPILE.value)
    torch_batches = [{k: torch.from_numpy(v.astype(np.int64))
                      for k, v in b.items()} for b in peer_batches]

    def hf_torch(i):
      torch_step(torch_batches[i % len(torch_batches)])

    contenders['hf_torch'] = hf_torch
    flops['hf_torch'] = hf_flops
  # The peak in the dtype the steps run in: the device's table entry, else
  # measured in the same rotation, a large matmul in that dtype.
  peak = metrics.peak_flops_per_device(0.0, mcfg.dtype)
  peak_source = f'table (dense {mcfg.dtype})'
  if peak is None:
    peak_source = 'measured: best [2048, 2048] matmul'
    n = 2048
    a_NxN = jnp.ones((n, n), getattr(jnp, mcfg.dtype))
    matmul = jax.jit(lambda a, b: a @ b)
    contenders['matmul'] = lambda i: matmul(a_NxN, a_NxN).block_until_ready()
    flops['matmul'] = 2.0 * n ** 3
  times = _time_interleaved(contenders, _WARMUP.value, _REPEATS.value,
                            _BLOCK.value)
  if 'matmul' in times:
    peak = flops['matmul'] / min(times.pop('matmul'))
  result = {
      'benchmark': 'train',
      'model': _MODEL.value, 'batch_shape': [batch, seq_len],
      'vocab_size': vocab_size, 'rate': _RATE.value, 'dtype': mcfg.dtype,
      'attention': mcfg.attention, 'dropout': mcfg.dropout_rate,
      'attention_dropout': mcfg.attention_dropout_rate,
      'repeats': _REPEATS.value, 'warmup': _WARMUP.value,
      'block': _BLOCK.value, 'real_tokens_per_step': real_tokens,
      'peak_flops_per_s': peak, 'peak_source': peak_source,
      'threads': _threads(), 'torch_compile': _TORCH_COMPILE.value,
      'load_before': load_before, 'load_after': _load(),
      'commit': peers.commit(), **_versions(), 'contenders': {},
  }
  ours_s = statistics.median(times['mlm_jax']) if 'mlm_jax' in times else None
  for name, seconds in times.items():
    median = statistics.median(seconds)
    result['contenders'][name] = {
        'median_s': median, 'min_s': min(seconds), 'max_s': max(seconds),
        'tokens_per_s': real_tokens / median,
        # How many times faster ours is: their time / our time.
        'ours_speedup': median / ours_s if ours_s else None,
        'flops_per_step': flops[name],
        'mfu': flops[name] / median / peak}
  return result


def e2e_bench() -> dict:
  """The real loop on the demo corpus against our bare step, same shape.

  Bare: the jitted step on one batch already on the device, `--steps` steps
  dispatched back to back, before and after the loop. Loop:
  train.train_and_evaluate for `--warmup` + `--steps` steps, its tokens/s as
  it logs them (log windows after the first, whose steps start cold).
  """
  batch, seq_len, steps = _BATCH.value, _SEQ.value, _STEPS.value
  config = bench_config(_MODEL.value, batch, seq_len, _DTYPE.value,
                        _ATTENTION.value, _VOCAB_MULTIPLE.value)
  config.seed = _SEED.value
  config.data.source, config.data.vocab_size = 'demo', _DATA_VOCAB.value
  config.data.data_dir = _DATA_DIR.value
  load_before = _load()
  prepared = data.prepare(config.data, seq_len)
  source = prepared.train_source
  real = sum(int(np.count_nonzero(source[i]['segment_ids']))
             for i in range(len(source)))
  packing = real / (len(source) * seq_len)

  built, state = our_step(config, prepared.tokenizer.vocab_size,
                          prepared.tokenizer)
  step, to_device = built.train_step, built.to_device
  local = next(pipeline.train_iterator(source, batch, config.seed, 0, 1))
  device_batch = to_device(local)
  batch_tokens = int(np.count_nonzero(local['segment_ids']))
  for _ in range(max(_WARMUP.value, 1)):
    state, m = step(state, device_batch)
  jax.block_until_ready((state, m))

  def bare_seconds():
    nonlocal state
    start = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, device_batch)
    jax.block_until_ready((state, m))
    return time.perf_counter() - start

  bare_s = [bare_seconds()]
  # The loop: log windows of a third of the steps; eval (one batch) and
  # the checkpoint come after the last window.
  window = max(steps // 3, 2)
  config.num_steps = 1 + _WARMUP.value + 3 * window
  config.warmup_steps = 1
  config.log_every = window
  config.eval_every = config.checkpoint_every = config.num_steps
  config.eval_batches = 1
  with tempfile.TemporaryDirectory() as workdir:
    # Windows aligned to log_every: skip the first whole one (cold start).
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
  rates = [r['train/tokens_per_second'] for r in records
           if 'train/tokens_per_second' in r]
  loop_rates = rates[1:] if len(rates) > 1 else rates
  bare_s.append(bare_seconds())
  bare_rate = batch_tokens * steps * len(bare_s) / sum(bare_s)
  loop_rate = statistics.median(loop_rates)
  return {
      'benchmark': 'e2e', 'model': _MODEL.value, 'dtype': config.model.dtype,
      'batch_shape': [batch, seq_len], 'steps': steps,
      'vocab_size': prepared.tokenizer.vocab_size,
      'train_rows': len(source), 'packing_efficiency': packing,
      'bare_tokens_per_batch': batch_tokens,
      'bare_seconds': bare_s, 'bare_tokens_per_s': bare_rate,
      'loop_window_tokens_per_s': rates, 'loop_tokens_per_s': loop_rate,
      'loop_over_bare': loop_rate / bare_rate,
      'load_before': load_before, 'load_after': _load(),
      'threads': len(os.sched_getaffinity(0)), 'commit': peers.commit(),
      **_versions()}


def print_e2e(result: dict) -> None:
  print(f"e2e: {result['model']} {result['dtype']}, batch "
        f"{result['batch_shape']}, demo corpus (vocab {result['vocab_size']},"
        f" {result['train_rows']} train rows), {result['steps']} steps per "
        'phase')
  print(f"device {result['device_kind']}, {result['threads']} threads, jax "
        f"{result['jax_version']}, commit {result['commit']}, load "
        f"{result['load_before']:.2f} -> {result['load_after']:.2f}"
        f"{', freed memory kept' if result['keep_freed_memory'] else ''}")
  print(f"packing efficiency (real tokens / all positions): "
        f"{result['packing_efficiency']:.4f}")
  print(f"bare step: {result['bare_tokens_per_s']:,.0f} real tokens/s "
        f"(phases {', '.join(f'{s:.2f}' for s in result['bare_seconds'])} s)")
  print(f"real loop: {result['loop_tokens_per_s']:,.0f} real tokens/s (log "
        'windows: ' + ', '.join(f'{r:,.0f}' for r in
                                result['loop_window_tokens_per_s']) + ')')
  print(f"loop / bare: {result['loop_over_bare']:.3f}")


def print_table(result: dict) -> None:
  # A command-line tool's output, so print rather than absl.logging.
  print(f"{result['benchmark']}: batch {result['batch_shape']}, vocab "
        f"{result['vocab_size']}, rate {result['rate']}, {result['repeats']} "
        f"repeats after {result['warmup']} warmup, in turns of "
        f"{result['block']}")
  print(f"device {result['device_kind']}, jax {result['jax_version']}, "
        f"transformers {result['transformers_version']}")
  print(f"{'contender':<10} {'median ms/batch':>16} {'tokens/s':>14}")
  for name, c in result['contenders'].items():
    print(f"{name:<10} {c['median_s'] * 1e3:>16.3f} "
          f"{c['tokens_per_s']:>14,.0f}")
  print(f"ours/HF speedup (HF time / our time): "
        f"{result['speedup_ours_over_hf']:.1f}x")
  print(f"host time of ours (until the call returns): "
        f"{result['contenders']['mlm_jax']['host_median_s'] * 1e3:.3f} ms")


def print_train(result: dict) -> None:
  print(f"train: {result['model']} {result['dtype']}, batch "
        f"{result['batch_shape']}, vocab {result['vocab_size']}, dropout "
        f"{result['dropout']}/{result['attention_dropout']}, mask rate "
        f"{result['rate']}, {result['repeats']} repeats after "
        f"{result['warmup']} warmup, in turns of {result['block']}")
  print(f"device {result['device_kind']}, {result['threads']} torch threads "
        f"({len(os.sched_getaffinity(0))} cores for XLA), jax {result['jax_version']}, transformers "
        f"{result['transformers_version']}, torch {result['torch_version']}"
        f"{' (compiled)' if result['torch_compile'] else ''}, commit "
        f"{result['commit']}, load {result['load_before']:.2f} -> "
        f"{result['load_after']:.2f}"
        f"{', freed memory kept' if result['keep_freed_memory'] else ''}")
  print(f"peak {result['peak_flops_per_s'] / 1e9:,.1f} GFLOP/s "
        f"({result['peak_source']}); {result['real_tokens_per_step']} real "
        'tokens per step')
  print(f"{'contender':<10} {'median ms/step':>15} {'real tokens/s':>14} "
        f"{'ours faster':>12} {'GFLOP/step':>11} {'MFU':>6}")
  for name, c in result['contenders'].items():
    speedup = (f"{c['ours_speedup']:.2f}x" if c['ours_speedup'] else '-')
    print(f"{name:<10} {c['median_s'] * 1e3:>15.1f} {c['tokens_per_s']:>14,.0f}"
          f" {speedup:>12} {c['flops_per_step'] / 1e9:>11.1f} "
          f"{c['mfu']:>6.3f}")


SUBCOMMANDS = {'masking': (masking_bench, print_table),
               'train': (train_bench, print_train),
               'e2e': (e2e_bench, print_e2e),
               'data': (bench_data.data_bench, bench_data.print_data),
               'quality': (bench_quality.quality_bench,
                           bench_quality.print_quality)}


def main(argv):
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f'Usage: python -m mlm_jax.bench '
                         f'{{{"|".join(SUBCOMMANDS)}}} [--flags]')
  run, show = SUBCOMMANDS[argv[1]]
  if _KEEP_FREED.value:  # before anything starts a backend
    host_memory.keep_freed_memory()
  result = run()
  show(result)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  app.run(main)
