"""Labelled text for fine-tuning: GLUE through TFDS, local TSV/CSV, demo articles.

A task is a `Task`: label names and train/dev/test `Examples` (one or two
texts per example, and an int label). `load` takes the `--task` string of
`mlm_jax.finetune`:

  'glue/NAME'   a GLUE task already prepared by TFDS in a data dir. Nothing is
                downloaded: an unprepared task is an error that says how to
                prepare it. GLUE's test labels are hidden, so the test split
                here is GLUE's validation split, and dev is a slice of train.
  'demo_articles'
                built from the embedded demo corpus (see `article_task`):
                which of N Wikipedia articles a passage comes from.
  'demo_order'  built from the demo corpus (see `order_task`): is a passage
                as written, or are its words shuffled? Order-blind models
                (any bag of words) score exactly chance.
  PATH.tsv / PATH.csv
                a header row naming a text column and a label column
                (`text` and `label` by default; `text_b` optional for
                pairs). Labels are strings, mapped to ids in sorted order.
                Test/dev files beside a train file are found by replacing
                'train' in its name with 'test'/'dev'; without a test file a
                fraction of the rows is held out (by a fixed seed, so every
                run sees the same split).

Must not: tokenize or batch (finetune.py encodes the texts) or touch the
pretraining pipeline (mlm_jax/data).
"""

import csv
import dataclasses
import glob
import os

import numpy as np

DEMO_ARTICLES = 'demo_articles'
DEMO_ORDER = 'demo_order'
# GLUE configs with (first text, second text or None, the held-out split).
# STS-B (regression) is not a classification task and is left out.
GLUE = {
    'cola': ('sentence', None, 'validation'),
    'sst2': ('sentence', None, 'validation'),
    'mrpc': ('sentence1', 'sentence2', 'validation'),
    'qqp': ('question1', 'question2', 'validation'),
    'mnli': ('premise', 'hypothesis', 'validation_matched'),
    'qnli': ('question', 'sentence', 'validation'),
    'rte': ('sentence1', 'sentence2', 'validation'),
    'wnli': ('sentence1', 'sentence2', 'validation'),
}
# The seed of every split this module makes; fixed, so that runs with
# different model seeds (and pretrained vs scratch) share the same test set.
SPLIT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Examples:
  text_a: tuple[str, ...]
  text_b: tuple[str, ...] | None  # None: single-text task
  labels: np.ndarray              # [N] int32

  def __len__(self):
    return len(self.text_a)

  def take(self, idx) -> 'Examples':
    pick = lambda t: None if t is None else tuple(t[i] for i in idx)
    return Examples(pick(self.text_a), pick(self.text_b),
                    self.labels[np.asarray(idx, int)])


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  label_names: tuple[str, ...]
  train: Examples
  dev: Examples
  test: Examples
  info: dict  # how it was made; 'chance' is the majority-class test accuracy

  @property
  def num_classes(self) -> int:
    return len(self.label_names)


def majority_accuracy(train: Examples, test: Examples) -> float:
  """Test accuracy of always answering the most frequent training label."""
  majority = np.bincount(train.labels).argmax()
  return float(np.mean(test.labels == majority))


def _make(name, label_names, train, dev, test, **info) -> Task:
  if len(set(train.labels.tolist())) < 2:
    raise ValueError(f'Task {name!r}: the training split has only one class '
                     f'({label_names[int(train.labels[0])]!r}); a classifier '
                     'needs at least two.')
  for split, ex in (('train', train), ('dev', dev), ('test', test)):
    if not len(ex):
      raise ValueError(f'Task {name!r}: the {split} split is empty.')
  info = dict(info, train=len(train), dev=len(dev), test=len(test),
              classes=len(label_names),
              chance=majority_accuracy(train, test))
  return Task(name, tuple(label_names), train, dev, test, info)


def _split_off(ex: Examples, fraction: float, seed: int):
  """(rest, held out): `fraction` of the rows, chosen by `seed`."""
  if not 0 < fraction < 1:
    raise ValueError(f'A split fraction must be in (0, 1), got {fraction}.')
  order = np.random.default_rng(seed).permutation(len(ex))
  n = max(1, int(round(fraction * len(ex))))
  if n >= len(ex):
    raise ValueError(f'Cannot hold out {fraction:.0%} of {len(ex)} rows and '
                     'keep any for training.')
  return ex.take(np.sort(order[n:])), ex.take(np.sort(order[:n]))


# ---------------------------------------------------------------- the demo task


def passages(document: str, words: int) -> list[str]:
  """Consecutive, non-overlapping passages of exactly `words` words."""
  tokens = document.split()
  return [' '.join(tokens[i:i + words])
          for i in range(0, len(tokens) - words + 1, words)]


def article_task(documents: list[str], num_articles: int = 8,
                 passage_words: int = 48, per_article: int = 150,
                 train_per_article: int = 0, test_fraction: float = 0.2,
                 dev_fraction: float = 0.1) -> Task:
  """Which article does a passage come from? Built from whole documents.

  1. The `num_articles` longest documents (by characters; the earlier one on
     a tie) are the classes, in corpus order.
  2. Each is cut into consecutive, non-overlapping passages of
     `passage_words` whitespace words (a partial last passage is dropped).
     A passage text that occurs twice anywhere is dropped entirely.
  3. Every article keeps the same number of passages, min(`per_article`,
     the fewest any chosen article has), picked by a fixed seed: the classes
     are balanced, so chance (and the majority baseline) is 1/num_articles.
  4. Each article's passages are shuffled (fixed seed) and dealt into test
     (`test_fraction`), dev (`dev_fraction`) and train (the rest, or only
     the first `train_per_article` of it when that is > 0: a few-shot
     variant). A passage is in exactly one split.

  Label names are the first words of each article (the demo text carries no
  titles; a Wikipedia article usually starts with its subject).
  """
  if num_articles < 2:
    raise ValueError(f'num_articles={num_articles} must be >= 2.')
  if num_articles > len(documents):
    raise ValueError(f'num_articles={num_articles} exceeds the corpus\'s '
                     f'{len(documents)} documents.')
  by_length = sorted(range(len(documents)),
                     key=lambda i: (-len(documents[i]), i))
  chosen = sorted(by_length[:num_articles])
  cut = {i: passages(documents[i], passage_words) for i in chosen}
  counts = {}
  for ps in cut.values():
    for p in ps:
      counts[p] = counts.get(p, 0) + 1
  cut = {i: [p for p in ps if counts[p] == 1] for i, ps in cut.items()}
  keep = min(per_article, *(len(ps) for ps in cut.values()))
  n_test = max(1, int(round(test_fraction * keep)))
  n_dev = max(1, int(round(dev_fraction * keep)))
  if keep - n_test - n_dev < 1:
    raise ValueError(f'Only {keep} passages of {passage_words} words per '
                     'article: too few for train, dev and test splits; use '
                     'fewer articles or shorter passages.')
  rng = np.random.default_rng(SPLIT_SEED)
  splits = {'train': [], 'dev': [], 'test': []}
  for label, i in enumerate(chosen):
    ps = [cut[i][j] for j in rng.permutation(len(cut[i]))[:keep]]
    train = ps[n_test + n_dev:]
    if train_per_article > 0:
      train = train[:train_per_article]
    for split, part in (('test', ps[:n_test]),
                        ('dev', ps[n_test:n_test + n_dev]), ('train', train)):
      splits[split] += [(p, label) for p in part]

  def examples(pairs):
    return Examples(tuple(p for p, _ in pairs), None,
                    np.asarray([l for _, l in pairs], np.int32))

  names = [' '.join(documents[i].split()[:4]) for i in chosen]
  return _make(DEMO_ARTICLES, names, *(examples(splits[s])
                                       for s in ('train', 'dev', 'test')),
               documents=chosen, passage_words=passage_words,
               per_article=keep)


def order_task(documents: list[str], passage_words: int = 24,
               num_passages: int = 1200, train_passages: int = 0,
               test_fraction: float = 0.2, dev_fraction: float = 0.1) -> Task:
  """Is the passage as written (label 'original') or word-shuffled?

  1. Every document is cut into consecutive, non-overlapping passages of
     `passage_words` words; texts that occur twice are dropped.
  2. `num_passages` of them are drawn (fixed seed) and dealt into test,
     dev and train (the rest, or its first `train_passages` when > 0). A
     passage is in exactly one split.
  3. In each split, every other passage (after the shuffle) has its words
     put in a random order (fixed seed; a permutation that leaves it
     unchanged is drawn again): the classes are balanced, chance is 0.5.
  A shuffled passage has the same words as some original one would, so a
  model that ignores word order can do no better than chance: the task
  measures what pretraining learned about word order and syntax.
  """
  cut = [p for d in documents for p in passages(d, passage_words)]
  counts = {}
  for p in cut:
    counts[p] = counts.get(p, 0) + 1
  cut = [p for p in cut if counts[p] == 1]
  if passage_words < 2 or len(cut) < 10:
    raise ValueError(f'Only {len(cut)} passages of {passage_words} words in '
                     'the corpus: too few for an order task.')
  rng = np.random.default_rng(SPLIT_SEED)
  chosen = [cut[i] for i in rng.permutation(len(cut))[:num_passages]]
  n_test = max(2, int(round(test_fraction * len(chosen))))
  n_dev = max(2, int(round(dev_fraction * len(chosen))))
  parts = {'test': chosen[:n_test], 'dev': chosen[n_test:n_test + n_dev],
           'train': chosen[n_test + n_dev:]}
  if train_passages > 0:
    parts['train'] = parts['train'][:train_passages]

  def examples(ps):
    texts, labels = [], []
    for j, p in enumerate(ps):
      words = p.split()
      if j % 2:
        order = rng.permutation(len(words))
        while (order == np.arange(len(words))).all():
          order = rng.permutation(len(words))
        p = ' '.join(words[k] for k in order)
      texts.append(p)
      labels.append(j % 2)
    return Examples(tuple(texts), None, np.asarray(labels, np.int32))

  return _make(DEMO_ORDER, ('original', 'shuffled'),
               *(examples(parts[s]) for s in ('train', 'dev', 'test')),
               passage_words=passage_words, num_passages=len(chosen))


# ------------------------------------------------------------------- TSV / CSV


def _read_table(path: str, text_column: str, label_column: str,
                text_b_column: str):
  """(text_a, text_b or None, string labels) of one TSV/CSV file."""
  if not os.path.isfile(path):
    raise ValueError(f'No such file: {path!r}.')
  tsv = path.lower().endswith('.tsv')
  with open(path, newline='', encoding='utf-8') as f:
    reader = (csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE)
              if tsv else csv.DictReader(f))
    header = reader.fieldnames
    if not header:
      raise ValueError(f'{path} is empty: expected a header row naming the '
                       f'{text_column!r} and {label_column!r} columns.')
    wanted = [text_column, label_column] + ([text_b_column] if text_b_column
                                            else [])
    missing = [c for c in wanted if c not in header]
    if missing:
      raise ValueError(f'{path} has no column {missing} (its header: '
                       f'{header}); name the columns with --text_column, '
                       '--label_column (and --text_b_column).')
    text_a, text_b, labels = [], [], []
    for row in reader:
      values = [row[c] for c in wanted]
      if any(v is None or not v.strip() for v in values):
        raise ValueError(f'{path} line {reader.line_num}: an empty or '
                         f'missing value in {wanted}.')
      text_a.append(values[0].strip())
      labels.append(values[1].strip())
      if text_b_column:
        text_b.append(values[2].strip())
  if not labels:
    raise ValueError(f'{path} has a header but no rows.')
  return text_a, (text_b if text_b_column else None), labels


def _sibling(train_path: str, split: str) -> str | None:
  directory, name = os.path.split(train_path)
  if 'train' not in name:
    return None
  path = os.path.join(directory, name.replace('train', split))
  return path if os.path.isfile(path) else None


def table_task(train_path: str, test_path: str | None = None,
               dev_path: str | None = None, text_column: str = 'text',
               label_column: str = 'label', text_b_column: str = '',
               test_fraction: float = 0.2, dev_fraction: float = 0.1) -> Task:
  """A task from local TSV/CSV files (see the module docstring)."""
  read = lambda p: _read_table(p, text_column, label_column, text_b_column)
  test_path = test_path or _sibling(train_path, 'test')
  dev_path = dev_path or _sibling(train_path, 'dev')
  train_raw = read(train_path)
  label_names = sorted(set(train_raw[2]))

  def examples(raw, path):
    unknown = sorted(set(raw[2]) - set(label_names))
    if unknown:
      raise ValueError(f'{path} has labels {unknown[:5]} that the training '
                       f'file {train_path} does not.')
    ids = np.asarray([label_names.index(l) for l in raw[2]], np.int32)
    return Examples(tuple(raw[0]), None if raw[1] is None else tuple(raw[1]),
                    ids)

  if len(label_names) < 2:
    raise ValueError(f'{train_path}: every row has the label '
                     f'{label_names[0]!r}; a classifier needs two classes.')
  train = examples(train_raw, train_path)
  if test_path:
    test = examples(read(test_path), test_path)
  else:
    train, test = _split_off(train, test_fraction, SPLIT_SEED)
  if dev_path:
    dev = examples(read(dev_path), dev_path)
  else:
    train, dev = _split_off(train, dev_fraction, SPLIT_SEED + 1)
  return _make(train_path, label_names, train, dev, test,
               files=dict(train=train_path, test=test_path, dev=dev_path))


# ------------------------------------------------------------------------ GLUE


def glue_dir(name: str, data_dir: str) -> str:
  """The prepared TFDS directory of glue/NAME; a clear error if there is none.

  Cheap (a directory listing), so it runs before any model is loaded.
  """
  config = name.split('/', 1)[1] if '/' in name else ''
  if config not in GLUE:
    raise ValueError(f'Unknown GLUE task {name!r}; choose one of '
                     f'{["glue/" + c for c in GLUE]}.')
  found = sorted(glob.glob(os.path.join(data_dir, 'glue', config, '*',
                                        'dataset_info.json')))
  if not found:
    raise ValueError(
        f'{name} is not prepared in the TFDS data dir {data_dir} (nothing is '
        'downloaded at run time). Prepare it once, on a machine with network '
        'access and TensorFlow, in the array_record format that reads '
        f'without TensorFlow:\n  tfds build {name} --data_dir={data_dir} '
        '--file_format=array_record\nthen pass --tfds_data_dir='
        f'{data_dir} (or copy {os.path.join(data_dir, "glue", config)} to '
        'the data dir you pass).')
  return os.path.dirname(found[-1])


def _read_tfds_split(builder, split: str):
  try:
    return list(builder.as_data_source(split))
  except Exception as e:  # pylint: disable=broad-except
    # tfrecord (TFDS's default format) is read through TensorFlow only.
    try:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      return list(tfds.as_numpy(builder.as_dataset(split)))
    except ImportError:
      raise ValueError(
          f'{builder.data_dir} is not in the array_record format ({e}); '
          'reading it needs TensorFlow. Prepare it with '
          '--file_format=array_record, or install tensorflow.') from e


def glue_task(name: str, data_dir: str, dev_fraction: float = 0.05) -> Task:
  """glue/NAME from a prepared TFDS data dir; test = GLUE's validation split."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  directory = glue_dir(name, data_dir)
  first, second, held_out = GLUE[name.split('/', 1)[1]]
  builder = tfds.builder_from_directory(directory)
  label_names = tuple(builder.info.features['label'].names)

  def examples(split):
    rows = _read_tfds_split(builder, split)
    text = lambda r, k: (r[k].decode('utf-8') if isinstance(r[k], bytes)
                         else str(r[k]))
    return Examples(tuple(text(r, first) for r in rows),
                    None if second is None else
                    tuple(text(r, second) for r in rows),
                    np.asarray([int(r['label']) for r in rows], np.int32))

  train, dev = _split_off(examples('train'), dev_fraction, SPLIT_SEED)
  return _make(name, label_names, train, dev, examples(held_out),
               tfds_dir=directory, test_split=held_out)


def kind(task: str) -> str:
  """'glue', 'demo' or 'table' for a --task string; raises if it is none."""
  if task.startswith('glue/'):
    return 'glue'
  if task in (DEMO_ARTICLES, DEMO_ORDER):
    return 'demo'
  if task.lower().endswith(('.tsv', '.csv')):
    return 'table'
  raise ValueError(f'Unknown --task={task!r}: give glue/NAME (one of '
                   f'{sorted(GLUE)}), {DEMO_ARTICLES!r}, {DEMO_ORDER!r}, or a path to a '
                   '.tsv/.csv file of (text, label) rows.')
