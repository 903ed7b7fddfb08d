"""glibc malloc settings that spare XLA:CPU re-faulting its buffers every step.

XLA:CPU mallocs an executable's temporary buffer on every call (1.6 GB for a
BERT-base train step at 8 x 128). glibc serves a request that large with a
fresh mmap and munmaps it when it is freed, so the kernel zero-fills the
whole buffer again, one 4 KiB page fault at a time, on every step: about
400,000 faults and 1 s of kernel CPU time per BERT-base step on the 2-core
dev machine, where the step went from 4.65 s to 4.1-4.4 s without them
(BENCHMARKS.md, speed work).

`keep_freed_memory()` has glibc keep freed memory for reuse instead: one
arena (a thread's own arena cannot hold a block over 64 MiB, so it would
mmap anyway), no mmap, no trimming. It must run before JAX starts its CPU
client, whose threads take their arenas when they first allocate.

The cost is resident memory: the heap never shrinks, and fragmentation can
leave it a temporary buffer or two larger than the peak need (BERT-base at
8 x 128: 3.8 GiB, then 6.9 GiB after a few steps, then steady). It applies
only to CPU-only processes on glibc: on a GPU/TPU host the large buffers are
device memory, and one arena would serialise the host threads' malloc calls
(the data loader's).
"""
import ctypes
import importlib.metadata
import importlib.util
import os

from absl import logging
import jax
from jax._src import xla_bridge  # backends_are_initialized has no public name

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_applied = False  # by this process


def cpu_only() -> bool:
  """Whether this process's JAX will run on the CPU alone.

  JAX_PLATFORMS (or jax_platforms) decides when set; otherwise JAX takes an
  accelerator when a plugin for one is installed (jax_plugins, libtpu).
  """
  platforms = (getattr(jax.config, 'jax_platforms', None) or
               os.environ.get('JAX_PLATFORMS', ''))
  if platforms:
    return all(p.strip() == 'cpu' for p in platforms.split(','))
  if importlib.util.find_spec('libtpu') is not None:
    return False
  if importlib.util.find_spec('jax_plugins') is not None:
    return False
  return not importlib.metadata.entry_points(group='jax_plugins')


def _glibc() -> bool:
  try:
    return bool(os.confstr('CS_GNU_LIBC_VERSION'))
  except (ValueError, OSError, AttributeError):
    return False


def applied() -> bool:
  """Whether keep_freed_memory() changed malloc in this process."""
  return _applied


def keep_freed_memory() -> bool:
  """Applies the settings above if they can help here; True if applied."""
  global _applied
  if not cpu_only():
    logging.info('Host memory: malloc left as is (an accelerator backend may '
                 'be used).')
    return False
  if not _glibc():
    logging.info('Host memory: malloc left as is (not glibc).')
    return False
  if getattr(xla_bridge, 'backends_are_initialized', lambda: False)():
    logging.warning(
        'Host memory: JAX already started its CPU client, so XLA:CPU will '
        'map and page-fault its temporary buffers again on every step; call '
        'host_memory.keep_freed_memory() before anything touches a device.')
    return False
  libc = ctypes.CDLL(None)
  done = (libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_MAX, 0) and
          libc.mallopt(_M_TRIM_THRESHOLD, -1))  # -1: never trim
  _applied = bool(done)
  if done:
    logging.info('Host memory: glibc keeps freed memory (one arena, no mmap, '
                 'no trim), so XLA:CPU does not re-fault its buffers per step.')
  else:
    logging.warning('Host memory: mallopt refused a setting; malloc as is.')
  return bool(done)
