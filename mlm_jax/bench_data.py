"""`python -m mlm_jax.bench data`: dataset builds from real text, 1 vs all workers.

Makes a corpus of --data_mb MB (uncompressed) in each format from the real
Wikipedia excerpt that ships with gensim: copy c of the excerpt has its own
document order and a copy word in every paragraph, so no two documents are
alike. Then builds each with `data.prepare` in a fresh child process and data
dir, once per --data_workers entry (1 = serial, 0 = every core), with one
tokenizer trained up front (so a build times cleaning, tokenizing, packing and
writing), and prints wall and CPU seconds (the build and its workers, and the
main process alone), MB/s, tokens/s, peak RSS (the build process, and the sum
over it and its workers, sampled every 50 ms), the host's CPU steal during
the build and the speed-up over one worker. The seconds are those of
data.prepare in the child (its Python start and imports excluded).

A shared host is faster some minutes than others: --data_repeats alternates
the builds' order and summarizes with medians, and --data_side_by_side also
runs one serial build per core at once, each repeat: how much two independent
processes gain on this host, the most a parallel build could.

  python -m mlm_jax.bench data --data_mb=100 [--data_formats=text,xml,jsonl,parquet]
      [--data_workers=1,0] [--data_repeats=3] [--data_side_by_side]
      [--data_root=/tmp/mlm_jax_bench_data] [--json=out.json]
"""

import bz2
import contextlib
import gzip
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

from absl import flags
import pyarrow as pa
import pyarrow.parquet as pq

from mlm_jax.data import sources
from mlm_jax.data import tokenizer as tokenizer_lib

_MB = flags.DEFINE_float('data_mb', 100, 'data: corpus size per format, in MB '
                         'of uncompressed text (XML for the dump).')
_FORMATS = flags.DEFINE_list(
    'data_formats', ['text', 'xml', 'jsonl', 'parquet'], 'data: formats: '
    'text, xml (a pages-articles dump in one bz2 stream), xml-ms (the same '
    'in streams of 100 pages, as Wikimedia\'s multistream dumps), jsonl, '
    'parquet.')
_WORKERS = flags.DEFINE_list('data_workers', ['1', '0'],
                             'data: data.workers of each build (0 = all).')
_REPEATS = flags.DEFINE_integer(
    'data_repeats', 1, 'data: builds per format and worker count, in '
    'alternating order (1, all, all, 1, ...): a shared host slows some '
    'minutes, so take medians (the summary table does).')
_SIDE_BY_SIDE = flags.DEFINE_bool(
    'data_side_by_side', False, 'data: per repeat, also run one serial build '
    'per core at once: the speed-up that many independent processes get on '
    'this host (the ceiling of a parallel build\'s speed-up).')
_ROOT = flags.DEFINE_string('data_root', '/tmp/mlm_jax_bench_data',
                            'data: corpora and builds go here (kept corpora '
                            'are reused).')
# Each format's corpus file name ends so.
_EXTENSIONS = {'text': 'txt', 'xml': 'xml.bz2', 'xml-ms': 'multistream.xml.bz2',
               'jsonl': 'jsonl.gz', 'parquet': 'parquet'}
_SEQ_LEN = 128
_VOCAB = 8192
_SAMPLE_S = 0.05

_CHILD = '''
import json, resource, sys, time
from absl import logging
import ml_collections
from configs import base
from mlm_jax import data
logging.set_verbosity(logging.INFO)
c = base.get_config().data
c.update(json.loads(sys.argv[1]))
def cpu(who):
  r = resource.getrusage(who)
  return r.ru_utime + r.ru_stime
main0, workers0, start = (cpu(resource.RUSAGE_SELF),
                          cpu(resource.RUSAGE_CHILDREN), time.perf_counter())
prepared = data.prepare(c, %d)
seconds = time.perf_counter() - start
# The pool's workers are joined when it closes, so they count as children.
main = cpu(resource.RUSAGE_SELF) - main0
workers = cpu(resource.RUSAGE_CHILDREN) - workers0
print('RESULT ' + json.dumps(dict(seconds=seconds, cpu_s=main + workers,
                                  main_cpu_s=main, info=prepared.info)))
''' % _SEQ_LEN


def _demo_pages() -> list[tuple[str, str]]:
  """(title, wikitext) of the excerpt's articles."""
  pages = []
  with bz2.open(sources._demo_path()) as f:  # pylint: disable=protected-access
    for _, elem in ET.iterparse(f):
      if elem.tag.endswith('}page'):
        text = elem.findtext('{*}revision/{*}text') or ''
        if (elem.findtext('{*}ns') == '0' and elem.find('{*}redirect') is None
            and len(text) > 1000):
          pages.append((elem.findtext('{*}title'), text))
        elem.clear()
  return pages


def _copies(items: list, size: int, nbytes) -> list[tuple[int, object]]:
  """(copy id, item) pairs until their bytes reach `size`."""
  out, total, c = [], 0, 0
  while total < size:
    order = list(items)
    random.Random(c).shuffle(order)
    for item in order:
      out.append((c, item))
      total += nbytes(item)
      if total >= size:
        break
    c += 1
  return out


def _mark(copy: int, text: str) -> str:
  # A copy word at the start of every paragraph makes each copy's tokens
  # and document hashes its own.
  return '\n'.join(f'copy{copy} {line}' if line.strip() else line
                   for line in text.split('\n'))


def make_corpus(fmt: str, size_mb: float, root: str) -> str:
  """Writes the corpus of `fmt` (once; reused if there) and returns its path."""
  size = int(size_mb * 1e6)
  ext = _EXTENSIONS[fmt]
  path = os.path.join(root, f'corpus-{size_mb:g}MB.{ext}')
  if os.path.exists(path):
    return path
  os.makedirs(root, exist_ok=True)
  tmp = path + '.tmp'
  if fmt in ('xml', 'xml-ms'):
    pages = _copies(_demo_pages(), size, lambda p: len(p[1]) + 200)
    xml = [f'<page><title>{escape(title)} {c}</title><ns>0</ns>'
           f'<revision><text>{escape(_mark(c, text))}</text></revision>'
           '</page>\n' for c, (title, text) in pages]
    head = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">\n'
    if fmt == 'xml':
      with bz2.open(tmp, 'wt', encoding='utf-8') as f:
        f.write(head)
        f.writelines(xml)
        f.write('</mediawiki>\n')
    else:  # Wikimedia's multistream layout: a bz2 stream per 100 pages
      with open(tmp, 'wb') as f:
        for part in [head, *(''.join(xml[i:i + 100])
                             for i in range(0, len(xml), 100)),
                     '</mediawiki>\n']:
          f.write(bz2.compress(part.encode()))
  else:
    docs = list(sources.documents(sources.DEMO))
    docs = [_mark(c, d) for c, d in _copies(docs, size, len)]
    if fmt == 'text':
      with open(tmp, 'w', encoding='utf-8') as f:
        f.write('\n\n'.join(docs) + '\n')
    elif fmt == 'jsonl':
      with gzip.open(tmp, 'wt', encoding='utf-8', compresslevel=1) as f:
        for d in docs:
          f.write(json.dumps({'id': len(d), 'text': d}) + '\n')
    else:
      pq.write_table(pa.table({'text': docs}), tmp, row_group_size=1000)
  os.replace(tmp, path)
  return path


def _uncompressed_mb(fmt: str, path: str) -> float:
  if fmt in ('xml', 'xml-ms'):
    with bz2.open(path) as f:
      return sum(len(b) for b in iter(lambda: f.read(1 << 24), b'')) / 1e6
  if fmt == 'text':
    return os.path.getsize(path) / 1e6
  return sum(len(d) for d in sources.documents(path)) / 1e6


def _tree_rss(proc) -> tuple[int, int]:
  """RSS bytes of `proc` and of it plus all its descendants."""
  import psutil  # pylint: disable=g-import-not-at-top
  try:
    main = proc.memory_info().rss
    total = main + sum(c.memory_info().rss
                       for c in proc.children(recursive=True))
  except psutil.Error:  # exited meanwhile
    return 0, 0
  return main, total


def builds(configs: list[dict], env: dict) -> list[dict]:
  """Runs data.prepare(config) of each config in its own child, all at once;
  each one's seconds, info and peak RSS."""
  import psutil  # pylint: disable=g-import-not-at-top
  # Output goes to files, not pipes: a child whose log filled a pipe nobody
  # reads while we poll would block for ever.
  logs = [(tempfile.TemporaryFile('w+'), tempfile.TemporaryFile('w+'))
          for _ in configs]
  # Each build in a session of its own, so an interrupted bench ends it and
  # its workers at once.
  children = [subprocess.Popen(
      [sys.executable, '-c', _CHILD, json.dumps(c)], stdout=out, stderr=err,
      env=env, start_new_session=True) for c, (out, err) in zip(configs, logs)]
  procs = [psutil.Process(c.pid) for c in children]
  ticks = _cpu_ticks()
  peaks = [[0, 0] for _ in children]
  try:
    while any(c.poll() is None for c in children):
      for proc, peak in zip(procs, peaks):
        main, tree = _tree_rss(proc)
        peak[0], peak[1] = max(peak[0], main), max(peak[1], tree)
      time.sleep(_SAMPLE_S)
  except BaseException:
    for c in children:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(c.pid, signal.SIGKILL)
    raise
  finally:
    for c in children:
      c.wait()
    outs = [(_read_back(out), _read_back(err)) for out, err in logs]
  steal = _steal(ticks, _cpu_ticks())
  results = []
  for child, (out, err), (peak_main, peak_tree) in zip(children, outs, peaks):
    if child.returncode:
      raise RuntimeError(f'Build failed ({child.returncode}):\n{err[-3000:]}')
    result = json.loads(next(l for l in out.splitlines()
                             if l.startswith('RESULT '))[len('RESULT '):])
    result.update(peak_rss_main=peak_main, peak_rss_tree=peak_tree,
                  steal=steal)
    results.append(result)
  return results


def _read_back(f) -> str:
  """The whole text of a temporary file, which is then closed (deleted)."""
  f.seek(0)
  with f:
    return f.read()


def _cpu_ticks() -> list[int] | None:
  """The host-wide CPU time counters of /proc/stat (None off Linux)."""
  try:
    with open('/proc/stat') as f:
      return [int(x) for x in f.readline().split()[1:9]]
  except (OSError, ValueError):
    return None


def _steal(before, after) -> float | None:
  """The fraction of CPU time the hypervisor gave to other guests."""
  if not before or not after:
    return None
  delta = [b - a for a, b in zip(before, after)]
  return delta[7] / max(sum(delta), 1)


def _record(fmt: str, path: str, mb: float, workers: int, repeat: int,
            r: dict, alongside: int = 1) -> dict:
  tokens = r['info']['train']['tokens'] + r['info']['validation']['tokens']
  return dict(
      format=fmt, workers=workers, resolved_workers=(
          workers or len(os.sched_getaffinity(0))),
      repeat=repeat, alongside=alongside, corpus=path,
      disk_mb=os.path.getsize(path) / 1e6, mb=mb, seconds=r['seconds'],
      mb_per_s=mb / r['seconds'], cpu_s=r['cpu_s'],
      main_cpu_s=r['main_cpu_s'], tokens=tokens,
      tokens_per_s=tokens / r['seconds'],
      rows=r['info']['train']['rows'] + r['info']['validation']['rows'],
      peak_rss_main_mb=r['peak_rss_main'] / 1e6,
      peak_rss_tree_mb=r['peak_rss_tree'] / 1e6, steal=r['steal'])


def _format_runs(fmt: str, path: str, mb: float, root: str, tok_path: str,
                 env: dict) -> list[dict]:
  """Every build of one corpus: the --data_workers builds, alternating their
  order each repeat, then (--data_side_by_side) one serial build per core
  at once."""
  runs = []

  def run(workers_list, repeat):
    configs = [dict(source=path, data_dir=os.path.join(
        root, f'build-{fmt}-{workers}-{k}'), tokenizer=tok_path,
                    workers=workers) for k, workers in enumerate(workers_list)]
    for c in configs:
      shutil.rmtree(c['data_dir'], ignore_errors=True)
    try:
      results = builds(configs, env)
    finally:
      for c in configs:
        shutil.rmtree(c['data_dir'], ignore_errors=True)
    return [_record(fmt, path, mb, w, repeat, r, len(workers_list))
            for w, r in zip(workers_list, results)]

  cores = len(os.sched_getaffinity(0))
  for repeat in range(_REPEATS.value):
    order = list(map(int, _WORKERS.value))
    for workers in order[::-1] if repeat % 2 else order:
      runs += run([workers], repeat)
    if _SIDE_BY_SIDE.value:
      runs += run([1] * cores, repeat)
  for r in runs:  # against the serial build of the same repeat
    serial = [s['seconds'] for s in runs if s['repeat'] == r['repeat']
              and s['workers'] == 1 and s['alongside'] == 1]
    r['speedup'] = serial[0] / r['seconds'] if serial else None
  return runs


def summarize(runs: list[dict]) -> list[dict]:
  """Per format and worker count: medians over the repeats, the speed-up of
  the medians, and the host's ceiling (side-by-side serial builds: how much
  faster `cores` independent builds go together than one after another)."""
  rows = []
  for fmt in dict.fromkeys(r['format'] for r in runs):
    alone = [r for r in runs if r['format'] == fmt and r['alongside'] == 1]
    serial = statistics.median(r['seconds'] for r in alone
                               if r['workers'] == 1) if any(
                                   r['workers'] == 1 for r in alone) else None
    for workers in dict.fromkeys(r['workers'] for r in alone):
      mine = [r for r in alone if r['workers'] == workers]
      seconds = statistics.median(r['seconds'] for r in mine)
      rows.append(dict(
          format=fmt, workers=workers,
          resolved_workers=mine[0]['resolved_workers'], builds=len(mine),
          mb=mine[0]['mb'], median_s=seconds,
          min_s=min(r['seconds'] for r in mine),
          max_s=max(r['seconds'] for r in mine),
          median_cpu_s=statistics.median(r['cpu_s'] for r in mine),
          mb_per_s=mine[0]['mb'] / seconds,
          peak_rss_tree_mb=max(r['peak_rss_tree_mb'] for r in mine),
          speedup=serial / seconds if serial else None,
          pair_speedups=[r['speedup'] for r in mine]))
    beside = [r for r in runs if r['format'] == fmt and r['alongside'] > 1]
    ceilings = []
    for repeat in sorted({r['repeat'] for r in beside}):
      group = [r for r in beside if r['repeat'] == repeat]
      solo = [r['seconds'] for r in alone
              if r['repeat'] == repeat and r['workers'] == 1]
      if solo:
        ceilings.append(len(group) * solo[0] / max(r['seconds']
                                                   for r in group))
    if ceilings:
      rows.append(dict(format=fmt, workers='side by side',
                       resolved_workers=beside[0]['alongside'],
                       builds=len(ceilings), ceiling=statistics.median(
                           ceilings), pair_speedups=ceilings))
  return rows


def data_bench() -> dict:
  if _REPEATS.value < 1:
    raise ValueError(f'--data_repeats must be at least 1, got '
                     f'{_REPEATS.value}.')
  unknown = [f for f in _FORMATS.value if f not in _EXTENSIONS]
  if unknown:
    raise ValueError(f'Unknown --data_formats {unknown}; choose from '
                     f'{list(_EXTENSIONS)}.')
  if not all(w.isdigit() for w in _WORKERS.value):
    raise ValueError(f'--data_workers takes worker counts (1 = serial, 0 = '
                     f'every core), got {_WORKERS.value}.')
  root = _ROOT.value
  os.makedirs(root, exist_ok=True)
  tok_path = os.path.join(root, f'sp-demo-{_VOCAB}.model')
  if not os.path.exists(tok_path):
    tokenizer_lib.train(sources.documents(sources.DEMO), _VOCAB, tok_path)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [repo, os.environ.get('PYTHONPATH')])))
  load_before = os.getloadavg()[0]
  runs, made = [], {}
  for fmt in _FORMATS.value:
    t = time.perf_counter()
    path = make_corpus(fmt, _MB.value, root)
    made[fmt] = time.perf_counter() - t
    runs += _format_runs(fmt, path, _uncompressed_mb(fmt, path), root,
                         tok_path, env)
  return dict(data_mb=_MB.value, cores=len(os.sched_getaffinity(0)),
              cpu=_cpu_name(), repeats=_REPEATS.value,
              load_before=load_before, load_after=os.getloadavg()[0],
              corpus_made_s=made, runs=runs, summary=summarize(runs))


def _cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(l.split(':', 1)[1].strip() for l in f
                  if l.startswith('model name'))
  except (OSError, StopIteration):
    return 'unknown'


def print_data(result: dict) -> None:
  print(f"data: {result['data_mb']:g} MB per format, {result['cores']} cores "
        f"({result['cpu']}), seq_len {_SEQ_LEN}, load "
        f"{result['load_before']:.2f} -> {result['load_after']:.2f}")
  print(f"{'format':<8} {'rep':>3} {'workers':>7} {'MB':>8} {'s':>8} "
        f"{'CPU s':>8} {'main CPU s':>10} {'MB/s':>7} {'Mtok/s':>7} "
        f"{'RSS main MB':>12} {'RSS all MB':>11} {'steal':>6} "
        f"{'speed-up':>9}")
  for r in result['runs']:
    speedup = f"{r['speedup']:.2f}x" if r['speedup'] else '-'
    steal = '-' if r['steal'] is None else f"{100 * r['steal']:.1f}%"
    workers = (f"1 of {r['alongside']}" if r['alongside'] > 1
               else str(r['resolved_workers']))
    print(f"{r['format']:<8} {r['repeat']:>3} {workers:>7} {r['mb']:>8.1f} "
          f"{r['seconds']:>8.1f} {r['cpu_s']:>8.1f} "
          f"{r['main_cpu_s']:>10.1f} {r['mb_per_s']:>7.2f} "
          f"{r['tokens_per_s'] / 1e6:>7.3f} {r['peak_rss_main_mb']:>12.0f} "
          f"{r['peak_rss_tree_mb']:>11.0f} {steal:>6} {speedup:>9}")
  if result['repeats'] == 1 and all(r['alongside'] == 1
                                    for r in result['runs']):
    return
  print('medians over the repeats (speed-up: of the medians; each repeat\'s '
        'own in brackets)')
  print(f"{'format':<8} {'workers':>13} {'builds':>6} {'median s':>9} "
        f"{'min s':>7} {'max s':>7} {'MB/s':>7} {'speed-up':>9}  per repeat")
  for r in result['summary']:
    pairs = ' '.join(f'{x:.2f}' for x in r['pair_speedups'] if x)
    if 'ceiling' in r:
      label = f"{r['resolved_workers']}x1 at once"
      print(f"{r['format']:<8} {label:>13} {r['builds']:>6} {'':>9} {'':>7} "
            f"{'':>7} {'':>7} {r['ceiling']:>8.2f}x  [{pairs}]")
      continue
    speedup = f"{r['speedup']:.2f}x" if r['speedup'] else '-'
    print(f"{r['format']:<8} {r['resolved_workers']:>13} {r['builds']:>6} "
          f"{r['median_s']:>9.1f} {r['min_s']:>7.1f} {r['max_s']:>7.1f} "
          f"{r['mb_per_s']:>7.2f} {speedup:>9}  [{pairs}]")
