"""Training curves of one or more runs, to a PNG.

  python -m mlm_jax.plot --workdir=/tmp/run_a --workdir=/tmp/run_b \
      [--label=15% --label=30%] [--out=curves.png]

Reads each run's WORKDIR/metrics.jsonl (and config.json for the tokens per
step) and draws loss and MLM accuracy, train and eval, against steps and
against tokens: 2 x 2 panels, one colour per run, train dashed and eval
solid. TensorBoard reads the same runs from WORKDIR/tensorboard.

`draw_quality` draws the JSON of `python -m mlm_jax.bench quality` (eval
loss and [MASK] accuracy against training seconds and tokens seen) in the
same style.
"""
import json
import os

from absl import app
from absl import flags
import matplotlib

matplotlib.use('Agg')  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top

from mlm_jax import run_dir  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags():
  """Flags of the command line only: importing this module defines none."""
  flags.DEFINE_multi_string('workdir', None, 'A run to draw.')
  flags.DEFINE_multi_string(
      'label', None, 'Legend name per --workdir, in order; default: its name.')
  flags.DEFINE_string(
      'out', None, 'PNG to write; default: curves.png in the first workdir.')
  flags.mark_flag_as_required('workdir')

# (panel title, train metric, eval metric)
PANELS = (('MLM loss', 'train/loss', 'eval/loss'),
          ('MLM accuracy', 'train/accuracy', 'eval/accuracy'))


def read_run(workdir: str) -> dict:
  """{'records': [...], 'tokens_per_step': int} of a run directory."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise ValueError(f'{path} does not exist: is {workdir} the --workdir of '
                     'a training run?')
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue  # a line cut short by a kill
  if not records:
    raise ValueError(f'{path} holds no metrics yet.')
  tokens_per_step = None
  if os.path.exists(os.path.join(workdir, run_dir.CONFIG_FILE)):
    config = run_dir.read_config(workdir)
    tokens_per_step = config.batch_size * config.seq_len
  return {'records': records, 'tokens_per_step': tokens_per_step}


def series(records, key):
  """(steps, values) of the records that hold KEY, in step order."""
  points = sorted((r['step'], r[key]) for r in records if key in r)
  return [s for s, _ in points], [v for _, v in points]


def draw(runs, out: str):
  """runs: [(label, read_run(...)), ...] -> a PNG at OUT."""
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), squeeze=False)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for col, x_name in enumerate(('step', 'tokens')):
    for row, (title, train_key, eval_key) in enumerate(PANELS):
      ax = axes[row][col]
      for i, (label, run) in enumerate(runs):
        scale = 1 if x_name == 'step' else run['tokens_per_step']
        if scale is None:
          continue  # no config.json: no token axis for this run
        color = colors[i % len(colors)]
        for key, style, suffix in ((train_key, '--', 'train'),
                                   (eval_key, '-', 'eval')):
          steps, values = series(run['records'], key)
          if steps:
            ax.plot([s * scale for s in steps], values, style, color=color,
                    label=f'{label} {suffix}', marker='.' if len(steps) < 20
                    else None)
      ax.set_title(title)
      ax.set_xlabel('step' if x_name == 'step' else
                    'tokens (batch x seq_len x step)')
      ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def draw_quality(result: dict, out: str) -> None:
  """Eval loss and [MASK] accuracy against training seconds and tokens seen:
  one row of panels per size, one colour per contender, its best rate solid
  and the rest of its sweep faint (`python -m mlm_jax.bench quality`)."""
  sizes = result['sizes']
  fig, axes = plt.subplots(len(sizes), 3, figsize=(15, 4.2 * len(sizes)),
                           squeeze=False)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  panels = (('train_s', 'loss', 'training seconds (eval excluded)'),
            ('tokens', 'loss', 'tokens seen'),
            ('train_s', 'mask_accuracy', 'training seconds (eval excluded)'))
  for row, (size, s) in enumerate(sizes.items()):
    for col, (x, y, xlabel) in enumerate(panels):
      ax = axes[row][col]
      for i, (name, c) in enumerate(s['contenders'].items()):
        for run in c['runs'].values():
          is_best = run['lr'] == c['best_lr']
          ax.plot([p[x] for p in run['curve']], [p[y] for p in run['curve']],
                  '-' if is_best else ':', color=colors[i % len(colors)],
                  alpha=1.0 if is_best else 0.4, marker='.',
                  label=f"{name} lr {run['lr']:g}" if is_best else None)
      if y == 'loss':
        ax.axhline(s['target_loss'], color='gray', lw=0.8, ls='--',
                   label='target')
      ax.set_title(f"{size}: eval {'MLM loss' if y == 'loss' else '[MASK] accuracy'}")
      ax.set_xlabel(xlabel)
      ax.grid(alpha=0.3)
    axes[row][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdirs = FLAGS.workdir
  labels = FLAGS.label or [os.path.basename(os.path.normpath(w))
                             for w in workdirs]
  if len(labels) != len(workdirs):
    raise app.UsageError(f'{len(labels)} --label for {len(workdirs)} '
                         '--workdir; give one per run or none.')
  runs = [(label, read_run(w)) for label, w in zip(labels, workdirs)]
  out = FLAGS.out or os.path.join(workdirs[0], 'curves.png')
  draw(runs, out)
  print(f'Wrote {out}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
