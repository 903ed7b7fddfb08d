"""Benchmarks: python -m mlm_jax.bench SUBCOMMAND [--flags].

  masking  our BERT masking (`masking.mask_tokens`, jitted, on the default
           device) against Hugging Face's DataCollatorForLanguageModeling
           (numpy, on the host) on the same token rows.

Each prints a table and, with --json=FILE, writes the same numbers as JSON.
Results and the machines they came from are kept in BENCHMARKS.md.
"""
import json
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

from mlm_jax import masking
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

PAD, UNK, CLS, SEP, MASK = tokenizer_lib.SPECIALS.values()
SPECIAL_IDS = tuple(tokenizer_lib.SPECIALS.values())
_MEAN_DOC_LEN = 40  # mean document piece between [SEP]s in a packed row
_PADDED_EVERY = 8   # every 8th row ends early and is padded


def packed_rows(rng, batch: int, seq_len: int, vocab_size: int) -> np.ndarray:
  """int32 [B, L] rows laid out as data/builder.py packs them.

  `[CLS] a a [SEP] b b b [SEP] c ...`; some rows end in [SEP] then [PAD]s
  (in real data only a split's last row is, but padding changes how many
  tokens either contender may mask, so the benchmark includes it).
  """
  ids_BxL = rng.integers(len(SPECIAL_IDS), vocab_size, (batch, seq_len),
                         dtype=np.int32)
  ids_BxL[:, 0] = CLS
  for row in ids_BxL:
    pos = int(rng.geometric(1 / _MEAN_DOC_LEN))
    while pos < seq_len:
      row[pos] = SEP
      pos += 1 + int(rng.geometric(1 / _MEAN_DOC_LEN))
  for row in ids_BxL[::_PADDED_EVERY]:
    end = int(rng.integers(2, seq_len))
    row[end - 1], row[end:] = SEP, PAD
  return ids_BxL


def bert_tokenizer(vocab_size: int):
  """A BertTokenizerFast with our special ids, built offline from a vocab file.

  BertTokenizerFast rather than a bare `tokenizers` WordLevel model: it is
  what an HF BERT user has, and the collator calls `len(tokenizer)` every
  batch, whose cost depends on the backend model (WordPiece's is cheaper).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  by_id = sorted(tokenizer_lib.SPECIALS, key=tokenizer_lib.SPECIALS.get)
  words = by_id + [f'w{i}' for i in range(len(by_id), vocab_size)]
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'vocab.txt')
    with open(path, 'w') as f:
      f.write('\n'.join(words) + '\n')
    tokenizer = transformers.BertTokenizerFast(vocab_file=path)
  got = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
         tokenizer.sep_token_id, tokenizer.mask_token_id, len(tokenizer))
  if got != (*SPECIAL_IDS, vocab_size):
    raise ValueError(f'HF tokenizer ids {got} != ours '
                     f'{(*SPECIAL_IDS, vocab_size)}')
  return tokenizer


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
      bert_tokenizer(vocab_size), mlm=True, mlm_probability=rate,
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


SUBCOMMANDS = {'masking': masking_bench}


def main(argv):
  if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
    raise app.UsageError(f'Usage: python -m mlm_jax.bench '
                         f'{{{"|".join(SUBCOMMANDS)}}} [--flags]')
  result = SUBCOMMANDS[argv[1]]()
  print_table(result)
  if _JSON.value:
    with open(_JSON.value, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  app.run(main)
