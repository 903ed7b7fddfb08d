"""Rebuilds an experiment's results table and plot from its runs.

  python experiments/report.py OUT_DIR --arms=rate15,rate30,rate40 \
      --plot=experiments/2026-11-27_mask_rate/curves.png

OUT_DIR/ARM is the --workdir of each arm's training run. Prints a Markdown
table of the eval metrics (eval accuracy at each eval step, then the final
eval loss, accuracy, [MASK]-position accuracy and the unigram baseline
there), and draws the curves with mlm_jax.plot.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mlm_jax import plot  # noqa: E402  pylint: disable=g-import-not-at-top


def evals(run) -> dict:
  """{step: eval record} of a run read by plot.read_run."""
  return {r['step']: r for r in run['records'] if 'eval/loss' in r}


def table(runs) -> str:
  """runs: [(arm, plot.read_run(...)), ...] -> a Markdown table."""
  steps = sorted({s for _, run in runs for s in evals(run)})
  head = (['arm'] + [f'acc @{s}' for s in steps] +
          ['final eval loss', 'final acc', '[MASK] acc', 'baseline'])
  lines = ['| ' + ' | '.join(head) + ' |', '|---' * len(head) + '|']
  for arm, run in runs:
    by_step = evals(run)
    if not by_step:
      raise ValueError(f'arm {arm} has no eval record yet: did it finish?')
    last = by_step[max(by_step)]
    cells = [f"{by_step[s]['eval/accuracy']:.3f}" if s in by_step else ''
             for s in steps]
    cells += [f"{last['eval/loss']:.3f}", f"{last['eval/accuracy']:.3f}",
              f"{last['eval/mask_accuracy']:.3f}",
              f"{last['eval/baseline_accuracy']:.3f}"]
    lines.append(f'| {arm} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('out_dir', help='the directory holding one run per arm')
  parser.add_argument('--arms', required=True,
                      help='comma-separated arm names, in table order')
  parser.add_argument('--plot', help='PNG to draw the curves to')
  args = parser.parse_args()
  arms = [a for a in args.arms.split(',') if a]
  runs = [(arm, plot.read_run(os.path.join(args.out_dir, arm))) for arm in arms]
  print(table(runs))
  if args.plot:
    plot.draw(runs, args.plot)
    print(f'\nWrote {args.plot}')


if __name__ == '__main__':
  main()
