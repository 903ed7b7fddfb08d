"""Prints the results table of the demo-recipe runs from their metrics.jsonl.

  python experiments/2026-11-27_demo_recipe/table.py /tmp/demo_recipe
"""
import json
import os
import sys


def evals(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return [r for r in records if 'eval/mask_accuracy' in r]


def main(out_dir):
  runs = sorted(d for d in os.listdir(out_dir)
                if os.path.exists(os.path.join(out_dir, d, 'metrics.jsonl')))
  steps = sorted({r['step'] for d in runs for r in evals(os.path.join(out_dir, d))})
  print('| run | ' + ' | '.join(f'step {s}' for s in steps) +
        ' | final baseline | final ratio | final eval loss |')
  print('|---' * (len(steps) + 4) + '|')
  for d in runs:
    rs = {r['step']: r for r in evals(os.path.join(out_dir, d))}
    last = rs[max(rs)]
    cells = [f"{rs[s]['eval/mask_accuracy']:.3f}" if s in rs else '' for s in steps]
    ratio = last['eval/mask_accuracy'] / last['eval/baseline_accuracy']
    print(f'| {d} | ' + ' | '.join(cells) +
          f" | {last['eval/baseline_accuracy']:.3f} | {ratio:.2f}x |"
          f" {last['eval/loss']:.3f} |")


if __name__ == '__main__':
  main(sys.argv[1])
