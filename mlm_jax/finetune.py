"""Fine-tune a pretrained encoder for sequence classification; report accuracy.

  python -m mlm_jax.finetune --workdir=W --task=demo_articles --out=DIR
  python -m mlm_jax.finetune --workdir=W --task=demo_articles --from_scratch
  python -m mlm_jax.finetune --workdir=W --task=demo_order
  python -m mlm_jax.finetune --workdir=W --task=glue/sst2 \
      --tfds_data_dir=~/tensorflow_datasets
  python -m mlm_jax.finetune --workdir=W --task=path/train.tsv

W is a training run (its newest checkpoint, config.json and tokenizer) or a
`convert from_hf` output. The defaults (150 steps of 16, peak learning rate
3e-4) suit the demo tasks; a GLUE task wants a few epochs (--steps).
`--from_scratch` builds the same architecture with random weights (from
--seed): the baseline a pretrained encoder must beat. Tasks are described in
`mlm_jax/labelled.py`. Whether pretraining helps is asserted by
tests/test_finetune.py::test_pretrained_beats_scratch_on_demo_order (a
configs/cpu.py run of 600 steps, demo_order: pretrained must beat scratch by
0.08 test accuracy; its docstring has the accuracies it measured).

The classifier: the encoder's vectors are mean-pooled over the real tokens
([CLS] and [SEP] included, padding excluded), then dropout (the model's
hidden dropout rate) and one dense layer to the classes. Not BERT's pooler
(the [CLS] vector through dense + tanh): our pretraining has no
next-sentence task, so [CLS] is never trained to summarise the input. The
MLM head is dropped. Every weight is trained, with the pretraining run's
AdamW settings (betas, epsilon, weight decay, clipping) and a linear warmup
(--warmup_fraction of the steps) then linear decay to 0.

Inputs are [CLS] a [SEP] (or [CLS] a [SEP] b [SEP], b with token type 1)
truncated to --seq_len, one segment per row. Dev accuracy is measured every
--eval_every steps (default once per epoch), test accuracy once at the end
(the last step's weights: no selection on dev). Each dev evaluation and the
final result are printed and, with --out, appended as JSON lines to
OUT/finetune.jsonl (records carry `init`, `seed` and `task`, so pretrained
and scratch runs can share a file).
"""
import functools
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mlm_jax import checkpoint
from mlm_jax import data
from mlm_jax import host_memory
from mlm_jax import labelled
from mlm_jax import model
from mlm_jax import optimizer
from mlm_jax import run_dir
from mlm_jax.data import sources


POOLINGS = ('mean', 'first')


class Classifier(nnx.Module):
  """Encoder -> pooled vector -> dropout -> dense to C classes.

  `pooling` 'mean': the mean over real tokens; 'first': the [CLS] vector.
  """

  def __init__(self, encoder: model.Encoder, num_classes: int,
               rngs: nnx.Rngs, pooling: str = 'mean'):
    cfg = encoder.config
    self.pooling = pooling
    self.encoder = encoder
    self.dropout = nnx.Dropout(cfg.dropout_rate)
    self.head = nnx.Linear(
        cfg.hidden_dim, num_classes, param_dtype=cfg.param_dtype,
        kernel_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)

  def __call__(self, ids_BxL, segment_ids_BxL, token_types_BxL, *,
               deterministic=True, rngs=None):
    h_BxLxD = self.encoder(ids_BxL, segment_ids_BxL, token_types_BxL,
                           deterministic=deterministic, rngs=rngs)
    if self.pooling == 'first':
      pooled_BxD = h_BxLxD[:, 0].astype(jnp.float32)
    else:
      real_BxL = (segment_ids_BxL > 0).astype(jnp.float32)
      pooled_BxD = (jnp.einsum('bld,bl->bd', h_BxLxD.astype(jnp.float32),
                               real_BxL) /
                    jnp.maximum(real_BxL.sum(1, keepdims=True), 1.0))
    pooled_BxD = self.dropout(pooled_BxD, deterministic=deterministic,
                              rngs=rngs)
    return self.head(pooled_BxD).astype(jnp.float32)  # logits_BxC


def encode(tok, examples: labelled.Examples, seq_len: int) -> dict:
  """{ids, segment_ids, token_types: [N, L] int32, labels: [N]} of a split.

  Each text is truncated so that [CLS] a [SEP] (b [SEP]) fits `seq_len`;
  with two texts the longer loses tokens first.
  """
  n = len(examples)
  ids = np.full((n, seq_len), tok.pad_id, np.int32)
  types = np.zeros((n, seq_len), np.int32)
  for r in range(n):
    a = tok.encode(examples.text_a[r])
    b = [] if examples.text_b is None else tok.encode(examples.text_b[r])
    budget = seq_len - (3 if examples.text_b is not None else 2)
    while len(a) + len(b) > budget:
      if len(a) >= len(b):
        a = a[:-1]
      else:
        b = b[:-1]
    row = [tok.cls_id] + a + [tok.sep_id]
    if examples.text_b is not None:
      types[r, len(row):len(row) + len(b) + 1] = 1
      row += b + [tok.sep_id]
    ids[r, :len(row)] = row
  return dict(ids=ids, segment_ids=(ids != tok.pad_id).astype(np.int32),
              token_types=types, labels=examples.labels.astype(np.int32))


def _logits(params, graphdef, batch, dropout_key):
  clf = nnx.merge(graphdef, params)
  if dropout_key is None:
    return clf(batch['ids'], batch['segment_ids'], batch['token_types'],
               deterministic=True)
  return clf(batch['ids'], batch['segment_ids'], batch['token_types'],
             deterministic=False, rngs=nnx.Rngs(dropout=dropout_key))


def train_step(params, opt_state, batch, key, *, graphdef, tx):
  """One AdamW update on a batch; returns (params, opt_state, loss)."""
  def loss_fn(params):
    logits_BxC = _logits(params, graphdef, batch, key)
    loss_B = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxC, batch['labels'])
    return jnp.mean(loss_B)

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss


def eval_step(params, batch, *, graphdef):
  """(correct, weight) sums of a batch; padding rows have weight 0."""
  logits_BxC = _logits(params, graphdef, batch, None)
  correct_B = (jnp.argmax(logits_BxC, -1) == batch['labels'])
  return jnp.stack([jnp.sum(correct_B * batch['weights']),
                    jnp.sum(batch['weights'])])


def accuracy(eval_fn, params, split: dict, batch_size: int) -> float:
  """Accuracy over a whole split, in fixed-size batches (one compilation)."""
  n = len(split['labels'])
  if not n:
    raise ValueError('accuracy() of an empty split: no examples to score.')
  total = np.zeros(2)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    real = idx < n
    idx = np.where(real, idx, 0)
    batch = {k: v[idx] for k, v in split.items()}
    batch['weights'] = real.astype(np.float32)
    total += np.asarray(eval_fn(params, batch))
  return float(total[0] / total[1])


def batch_order(num_examples: int, batch_size: int, num_steps: int,
                seed: int) -> np.ndarray:
  """[num_steps, batch_size] example ids: epochs of fresh permutations."""
  rng = np.random.default_rng(seed)
  epochs = -(-num_steps * batch_size // num_examples)
  order = np.concatenate([rng.permutation(num_examples)
                          for _ in range(epochs)])
  return order[:num_steps * batch_size].reshape(num_steps, batch_size)


def check_args(workdir: str, task: str, seq_len: int, steps: int,
               batch_size: int, learning_rate: float, tfds_data_dir: str,
               pooling: str = 'mean'):
  """Cheap checks of the arguments; returns (run config, seq_len).

  Runs before the tokenizer, the task's data or the model are loaded.
  `seq_len` 0 is the run's own seq_len.
  """
  config = run_dir.read_config(workdir)
  if not run_dir.has_weights(workdir):
    raise ValueError(f'{workdir} has no checkpoint (checkpoints/ or params/): '
                     'has the run saved one yet?')
  seq_len = seq_len or min(config.seq_len, config.model.max_len)
  kind = labelled.kind(task)
  if kind == 'glue':
    labelled.glue_dir(task, _tfds_dir(tfds_data_dir))
  if kind == 'table' and not os.path.isfile(task):
    raise ValueError(f'No such file: --task={task!r}.')
  if seq_len > config.model.max_len:
    raise ValueError(f'--seq_len={seq_len} exceeds the model\'s max_len='
                     f'{config.model.max_len} positions.')
  if pooling not in POOLINGS:
    raise ValueError(f'--pooling={pooling!r}; choose one of {POOLINGS}.')
  if seq_len < 3:
    raise ValueError(f'--seq_len={seq_len} leaves no room for text.')
  for name, value in (('steps', steps), ('batch_size', batch_size),
                      ('learning_rate', learning_rate)):
    if value <= 0:
      raise ValueError(f'--{name}={value} must be positive.')
  return config, seq_len


def check_splits(the_task: labelled.Task):
  """Every split has examples: an accuracy over none would be 0 / 0."""
  for name in ('train', 'dev', 'test'):
    if not len(getattr(the_task, name)):
      raise ValueError(f'Task {the_task.name!r}: the {name} split is empty; '
                       'give it examples (for a table, a non-empty '
                       f'--{name}_file or more training rows to hold out).')


def _tfds_dir(path: str) -> str:
  return os.path.abspath(os.path.expanduser(
      path or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'))


def load_task(task: str, config, args: dict) -> labelled.Task:
  """The labelled.Task of a --task string (see labelled.py)."""
  kind = labelled.kind(task)
  if kind == 'glue':
    return labelled.glue_task(task, _tfds_dir(args['tfds_data_dir']))
  if kind == 'table':
    return labelled.table_task(
        task, args['test_file'] or None, args['dev_file'] or None,
        args['text_column'], args['label_column'], args['text_b_column'])
  # The same cleaned-text cache as pretraining on the demo corpus.
  docs = list(sources.documents(
      sources.DEMO, cache_dir=os.path.join(data.data_dir(config.data),
                                           'text')))
  words = {'passage_words': args['passage_words']} if args[
      'passage_words'] else {}
  if task == labelled.DEMO_ORDER:
    return labelled.order_task(docs, train_passages=args['train_passages'],
                               **words)
  return labelled.article_task(
      docs, num_articles=args['num_articles'],
      train_per_article=args['train_per_article'], **words)


def finetune(workdir: str, task: str, *, steps: int = 150,
             batch_size: int = 16, learning_rate: float = 3e-4,
             warmup_fraction: float = 0.1, seq_len: int = 0, seed: int = 0,
             from_scratch: bool = False, pooling: str = 'mean',
             eval_every: int = 0, out: str = '',
             task_args: dict | None = None, loaded=None) -> dict:
  """Fine-tunes W's encoder (or a fresh one) on `task`; returns the result.

  `loaded` (a labelled.Task already loaded) skips loading the task.
  """
  checkpoint.quiet_orbax_logs()
  task_args = {**DEFAULT_TASK_ARGS, **(task_args or {})}
  start = time.time()
  config, seq_len = check_args(workdir, task, seq_len, steps, batch_size,
                               learning_rate, task_args['tfds_data_dir'],
                               pooling)
  the_task = loaded or load_task(task, config, task_args)
  check_splits(the_task)
  logging.info('Task %s: %s', task, the_task.info)

  _, mcfg, tok, bert, pretrain_step = run_dir.load(workdir)
  head_key, scratch_key, dropout_key = jax.random.split(
      jax.random.key(seed), 3)
  if from_scratch:
    bert = model.create(mcfg, scratch_key)
  clf = Classifier(bert.encoder, the_task.num_classes,
                   nnx.Rngs(params=head_key), pooling)
  graphdef, params = nnx.split(clf, nnx.Param)
  del bert, clf

  splits = {name: encode(tok, getattr(the_task, name), seq_len)
            for name in ('train', 'dev', 'test')}
  n_train = len(splits['train']['labels'])
  steps_per_epoch = max(1, n_train // batch_size)
  eval_every = eval_every or steps_per_epoch
  opt_config = ml_collections.ConfigDict(dict(
      learning_rate=learning_rate, num_steps=steps,
      warmup_steps=max(1, int(warmup_fraction * steps)),
      weight_decay=config.weight_decay, adam_b1=config.adam_b1,
      adam_b2=config.adam_b2, adam_eps=config.adam_eps,
      grad_clip_norm=config.grad_clip_norm))
  tx = optimizer.create(opt_config)
  opt_state = tx.init(params)
  step_fn = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx),
                    donate_argnums=(0, 1))
  eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef))
  order = batch_order(n_train, batch_size, steps, seed)

  common = dict(task=task, init='scratch' if from_scratch else 'pretrained',
                workdir=os.path.abspath(workdir), pretrain_step=int(
                    pretrain_step), seed=seed, steps=steps,
                batch_size=batch_size, learning_rate=learning_rate,
                seq_len=seq_len, pooling=pooling)
  records = []

  def emit(record):
    record = {**common, **record}
    records.append(record)
    logging.info('%s', json.dumps(record))
    if out:
      os.makedirs(out, exist_ok=True)
      with open(os.path.join(out, 'finetune.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')

  losses = []
  for step in range(steps):
    batch = {k: v[order[step]] for k, v in splits['train'].items()}
    params, opt_state, loss = step_fn(params, opt_state, batch,
                                      jax.random.fold_in(dropout_key, step))
    losses.append(loss)
    if (step + 1) % eval_every == 0 and step + 1 < steps:
      emit(dict(step=step + 1, epoch=(step + 1) / steps_per_epoch,
                train_loss=float(np.mean(jax.device_get(losses))),
                dev_accuracy=accuracy(eval_fn, params, splits['dev'],
                                      batch_size)))
      losses = []
  result = dict(
      step=steps, epoch=steps / steps_per_epoch,
      train_loss=float(np.mean(jax.device_get(losses))) if losses else None,
      dev_accuracy=accuracy(eval_fn, params, splits['dev'], batch_size),
      test_accuracy=accuracy(eval_fn, params, splits['test'], batch_size),
      chance=the_task.info['chance'], classes=the_task.num_classes,
      examples={k: len(v['labels']) for k, v in splits.items()},
      seconds=round(time.time() - start, 1), final=True)
  emit(result)
  return records[-1]


DEFAULT_TASK_ARGS = dict(tfds_data_dir='', test_file='', dev_file='',
                         text_column='text', label_column='label',
                         text_b_column='', num_articles=8, passage_words=0,
                         train_per_article=0, train_passages=0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS
  host_memory.keep_freed_memory()  # before anything starts a backend
  result = finetune(
      args.workdir, args.task, steps=args.steps, batch_size=args.batch_size,
      learning_rate=args.learning_rate, warmup_fraction=args.warmup_fraction,
      seq_len=args.seq_len, seed=args.seed, from_scratch=args.from_scratch,
      pooling=args.pooling,
      eval_every=args.eval_every, out=args.out,
      task_args={k: getattr(args, k) for k in DEFAULT_TASK_ARGS})
  print(json.dumps(result))


if __name__ == '__main__':
  # Defined only when run as a tool, so importing the module adds no flags.
  flags.DEFINE_string('workdir', None, 'A training run or an import.',
                      required=True)
  flags.DEFINE_string('task', None, "glue/NAME, 'demo_articles', "
                      "'demo_order', or a "
                      '.tsv/.csv file of (text, label) rows.', required=True)
  flags.DEFINE_string('out', '', 'Append JSON-line results to '
                      'OUT/finetune.jsonl.')
  flags.DEFINE_integer('steps', 150, 'Optimizer updates.')
  flags.DEFINE_integer('batch_size', 16, 'Examples per update.')
  flags.DEFINE_float('learning_rate', 3e-4, 'Peak learning rate.')
  flags.DEFINE_float('warmup_fraction', 0.1, 'Linear warmup, as a fraction '
                     'of --steps; then linear decay to 0.')
  flags.DEFINE_integer('seq_len', 0, "Tokens per example; 0: the run's "
                       'seq_len.')
  flags.DEFINE_integer('seed', 0, 'Head init, data order, dropout, and the '
                       'weights with --from_scratch.')
  flags.DEFINE_bool('from_scratch', False, 'Random weights instead of the '
                    'checkpoint: the baseline.')
  flags.DEFINE_enum('pooling', 'mean', POOLINGS, 'mean: over the real '
                    'tokens; first: the [CLS] vector.')
  flags.DEFINE_integer('eval_every', 0, 'Steps between dev evaluations; 0: '
                       'once per epoch.')
  flags.DEFINE_string('tfds_data_dir', '', 'glue/*: the TFDS data dir where '
                      'the task is prepared; default $TFDS_DATA_DIR or '
                      '~/tensorflow_datasets.')
  flags.DEFINE_string('test_file', '', 'TSV/CSV: the test file; default the '
                      "train file's name with 'train' -> 'test', else 20% "
                      'of the train rows.')
  flags.DEFINE_string('dev_file', '', "TSV/CSV: the dev file; default 'train' "
                      '-> \'dev\', else 10% of the train rows.')
  flags.DEFINE_string('text_column', 'text', 'TSV/CSV: the text column.')
  flags.DEFINE_string('label_column', 'label', 'TSV/CSV: the label column.')
  flags.DEFINE_string('text_b_column', '', 'TSV/CSV: a second text column '
                      '(sentence pairs).')
  flags.DEFINE_integer('num_articles', 8, 'demo_articles: the classes.')
  flags.DEFINE_integer('passage_words', 0, 'demo_*: words per passage; 0: '
                       'the task\'s default (articles 48, order 24).')
  flags.DEFINE_integer('train_per_article', 0, 'demo_articles: training '
                       'passages per article (few-shot); 0: all.')
  flags.DEFINE_integer('train_passages', 0, 'demo_order: training passages '
                       '(few-shot); 0: all.')
  app.run(main)
