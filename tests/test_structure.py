"""The shape of the house: floors of modules, no circles, the walk of config.

Every module of the package sits on a floor (FLOORS, bottom first); a module
imports only modules on its own floor or below, and no two modules import
each other, directly or round a loop. A new module gets a floor here.

The walk of `config`: during one real (tiny) training run, the functions of
the package that receive the run's config, or one of its sections
(config.model, config.data, ...), as an argument, in the order they are
first called, each with the module that called it. A *call up* is a stop
whose caller sits on a lower floor: a low module reaching back up with the
config. None are allowed. A *climb* is a step of the walk into a higher
floor than the stop before (the loop calling across after a deep call came
back, or a call up). Measured by this test's tracer: before the redesign
(13daba1) 17 stops in 6 files, 2 climbs, no call up (6 stops were train.py's
own); after it, 17 stops in 9 files, 2 climbs, no call up (both climbs are
train calling run_dir after a call into the ground floor returned).
CLIMBS_AT_MOST holds that.
"""
import ast
import collections
import glob
import os
import sys

import ml_collections

from mlm_jax import train
import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom first. Floor 0 imports nothing of the package outside itself (the
# data package and masking are layered inside); each floor above builds on
# those below.
FLOORS = (
    ('mlm_jax', 'mlm_jax.checkpoint', 'mlm_jax.data', 'mlm_jax.data.*',
     'mlm_jax.host_memory', 'mlm_jax.labelled',
     'mlm_jax.masking', 'mlm_jax.masking.*', 'mlm_jax.metrics',
     'mlm_jax.model_config', 'mlm_jax.optimizer',
     'mlm_jax.preemption', 'mlm_jax.sharding'),
    ('mlm_jax.attention',),
    ('mlm_jax.model',),
    # 3: what a run is made of: its steps, HF's names for its weights.
    ('mlm_jax.steps', 'mlm_jax.hf'),
    ('mlm_jax.build', 'mlm_jax.run_dir'),
    ('mlm_jax.train',),
    # 6: the command-line tools.
    ('mlm_jax.main', 'mlm_jax.aot', 'mlm_jax.bench', 'mlm_jax.bench_data',
     'mlm_jax.bench_peers', 'mlm_jax.bench_quality',
     'mlm_jax.bench_quality_peers', 'mlm_jax.chaos', 'mlm_jax.convert',
     'mlm_jax.fill_mask', 'mlm_jax.finetune', 'mlm_jax.plot'),
)
CLIMBS_AT_MOST = 2


def _floor(module: str) -> int:
  for i, names in enumerate(FLOORS):
    for name in names:
      if module == name or (name.endswith('.*') and
                            module.startswith(name[:-1])):
        return i
  raise AssertionError(f'{module} has no floor: add it to FLOORS in '
                       f'{__file__}.')


def _modules() -> dict[str, set[str]]:
  """{module: the package modules it imports} of every file in mlm_jax/."""
  out = {}
  for path in glob.glob(os.path.join(ROOT, 'mlm_jax', '**', '*.py'),
                        recursive=True):
    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
    name = name.removesuffix('.__init__')
    out[name] = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and node.module and (
          node.module.split('.')[0] in ('mlm_jax', 'configs')):
        for alias in node.names:
          full = f'{node.module}.{alias.name}'
          is_module = os.path.exists(os.path.join(
              ROOT, *full.split('.')) + '.py') or os.path.isdir(
                  os.path.join(ROOT, *full.split('.')))
          out[name].add(full if is_module else node.module)
      elif isinstance(node, ast.Import):
        out[name].update(a.name for a in node.names
                         if a.name.split('.')[0] in ('mlm_jax', 'configs'))
    out[name].discard(name)
  return out


def test_every_import_goes_down_or_across_never_up():
  up = []
  for module, deps in _modules().items():
    if module.endswith('__main__'):
      continue
    for dep in deps:
      if dep.startswith('mlm_jax') and _floor(dep) > _floor(module):
        up.append(f'{module} (floor {_floor(module)}) imports {dep} '
                  f'(floor {_floor(dep)})')
  assert not up, '\n'.join(up)


def test_no_circle_of_imports():
  graph = {m: {d for d in deps if d.startswith('mlm_jax')}
           for m, deps in _modules().items()}
  # A package imports its modules' names through __init__: not a circle.
  done, stack, circles = set(), [], []

  def visit(m):
    if m in stack:
      circles.append(stack[stack.index(m):] + [m])
      return
    if m in done:
      return
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if not m.startswith(d + '.'):  # a module importing its own package
        visit(d)
    stack.pop()
    done.add(m)

  for m in sorted(graph):
    visit(m)
  assert not circles, circles


def test_configs_import_nothing_of_the_package():
  offenders = []
  for path in glob.glob(os.path.join(ROOT, 'configs', '*.py')):
    for node in ast.walk(ast.parse(open(path).read())):
      names = ([node.module or ''] if isinstance(node, ast.ImportFrom) else
               [a.name for a in node.names] if isinstance(node, ast.Import)
               else [])
      offenders += [f'{os.path.basename(path)}: {n}' for n in names
                    if n.split('.')[0] == 'mlm_jax']
  assert not offenders, offenders


def _module(code) -> str:
  path = os.path.relpath(code.co_filename, ROOT)[:-3]
  return path.replace(os.sep, '.').removesuffix('.__init__')


def config_walk(run) -> dict[tuple[str, str], str]:
  """{(module, function): its first caller's module} of the functions that
  get the config (or a section) while run() runs, in order of first call."""
  sections = {}

  def trace(frame, event, arg):
    del arg
    if event != 'call' or '/mlm_jax/' not in frame.f_code.co_filename:
      return
    code = frame.f_code
    n = code.co_argcount + code.co_kwonlyargcount
    if any(id(frame.f_locals.get(a)) in sections for a in code.co_varnames[:n]):
      caller = frame.f_back.f_code
      walk.setdefault((_module(code), code.co_name),
                      _module(caller) if '/mlm_jax/' in caller.co_filename
                      else None)

  walk = {}

  def track(config):
    sections[id(config)] = config
    for value in config.values():
      if isinstance(value, ml_collections.ConfigDict):
        track(value)

  config = run.__defaults__[0]
  track(config)
  previous = sys.getprofile()
  sys.setprofile(trace)
  try:
    run()
  finally:
    sys.setprofile(previous)
  return walk


def calls_up(walk) -> list[tuple]:
  return [(caller, stop) for stop, caller in walk.items()
          if caller and _floor(stop[0]) > _floor(caller)]


def climbs(walk) -> list[tuple]:
  walk = list(walk)
  return [(a, b) for a, b in zip(walk, walk[1:])
          if _floor(b[0]) > _floor(a[0])]


def test_the_walk_of_config_through_a_run_never_calls_up(data_dir, tmp_path):
  def run(config=tiny.config(data_dir, num_steps=2, eval_every=2,
                             checkpoint_every=2)):
    train.train_and_evaluate(config, str(tmp_path / 'run'))

  walk = config_walk(run)
  files = collections.Counter(module for module, _ in walk)
  print(f'walk of config: {len(walk)} stops in {len(files)} files, '
        f'{len(climbs(walk))} climbs, {len(calls_up(walk))} calls up:')
  for (module, function), caller in walk.items():
    print(f'  {_floor(module)} {module}.{function}  <- {caller}')
  assert ('mlm_jax.build', 'build') in walk  # the walk is really traced
  assert not calls_up(walk), calls_up(walk)
  assert len(climbs(walk)) <= CLIMBS_AT_MOST, climbs(walk)


def test_calls_up_and_climbs_are_counted():
  walk = {('mlm_jax.train', 'run'): None,
          ('mlm_jax.masking', 'check'): 'mlm_jax.train',
          ('mlm_jax.model', 'make'): 'mlm_jax.masking',  # a call up
          ('mlm_jax.run_dir', 'save'): 'mlm_jax.train'}  # a climb, not up
  assert calls_up(walk) == [('mlm_jax.masking', ('mlm_jax.model', 'make'))]
  assert climbs(walk) == [(('mlm_jax.masking', 'check'),
                           ('mlm_jax.model', 'make')),
                          (('mlm_jax.model', 'make'),
                           ('mlm_jax.run_dir', 'save'))]
