"""Metric writers (JSON lines + TensorBoard), throughput and MFU.

Metrics travel as (sum, weight) pairs and are divided here, when reported,
so averages stay exact across devices, steps and hosts.
"""
import json
import os
import time
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tensorboardX

# Dense (no 2:4 sparsity) peak matmul FLOP/s per device, by the compute
# dtype of the step, then by a substring of `device.device_kind` (the first
# match wins, so 'H100 PCIe' precedes 'H100').
#
# 'float32' is the rate of a float32 matmul at JAX's default precision, which
# does not run it in true fp32: on A100/H100/H200 it uses TF32 tensor cores,
# on a TPU one bfloat16 pass of the MXU with fp32 accumulation
# (https://docs.jax.dev/en/latest/201/precision.html). TPUs publish no other
# fp32 matmul figure, so their fp32 peak is their bf16 peak; GPUs' is the
# TF32 tensor-core figure, half of bf16's. Under
# jax_default_matmul_precision='highest' neither holds (true fp32 runs on
# CUDA cores, 67 TFLOP/s on an H100 SXM; several bf16 passes on a TPU):
# set --config.peak_tflops_per_device.
#
# Sources. TPUs, "Peak compute per chip (bf16)": Cloud TPU system
# architecture pages, https://cloud.google.com/tpu/docs/v4 (275), /v5e (197),
# /v5p (459), /v6e (918). GPUs, NVIDIA datasheets, which give tensor-core
# figures with sparsity: dense is half. A100 (SXM and PCIe): BF16 312, TF32
# 156 (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf). H100 SXM: BF16
# 1979 / 2, TF32 989 / 2; H100 PCIe: 1513 / 2, 756 / 2 (the spec table of
# https://www.nvidia.com/en-us/data-center/h100/, "shown with sparsity,
# 1/2 lower without"; the Hopper whitepaper's dense figures are 989.4 and
# 494.7 at the SXM's boost clock). H200 SXM: the H100 SXM's compute (the
# same GH100; https://www.nvidia.com/en-us/data-center/h200/). Other boards
# (H100/H200 NVL) match 'H100'/'H200' and get the SXM figures: set
# --config.peak_tflops_per_device for them.
_TPU_BF16 = (
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),
    ('TPU v5e', 197e12),
    ('TPU v5p', 459e12),
    ('TPU v5', 459e12),
    ('TPU v6', 918e12),
)
PEAK_FLOPS = {
    'bfloat16': _TPU_BF16 + (
        ('H200', 989e12),
        ('H100 PCIe', 756e12),
        ('H100', 989e12),
        ('A100', 312e12),
    ),
    'float32': _TPU_BF16 + (
        ('H200', 494.5e12),
        ('H100 PCIe', 378e12),
        ('H100', 494.5e12),
        ('A100', 156e12),
    ),
}
PEAK_FLOPS['float16'] = PEAK_FLOPS['bfloat16']  # same tensor-core rate


def peak_flops_per_device(override_tflops: float,
                          dtype: str) -> Optional[float]:
  """Peak FLOP/s of one device for matmuls in `dtype` (the compute dtype).

  `override_tflops` > 0 wins; otherwise the PEAK_FLOPS entry of the default
  device's kind, or None for a device without one (a CPU: MFU then needs a
  measured peak, see `matmul_flops_per_second`).
  """
  if dtype not in PEAK_FLOPS:
    raise ValueError(f'No peak FLOP/s table for dtype {dtype!r}; known: '
                     f'{sorted(PEAK_FLOPS)}.')
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS[dtype]:
    if name in kind:
      return flops
  return None


def matmul_flops_per_second(n: int = 2048, dtype=jnp.float32,
                            calls: int = 5) -> float:
  """The best FLOP/s of an [n, n] x [n, n] jitted matmul on the default device.

  The measured peak for devices without a PEAK_FLOPS entry (a CPU): the rate
  XLA itself reaches on a large, well-shaped matmul, after one warm-up call.
  """
  a_NxN = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(a_NxN, a_NxN).block_until_ready()
  best = float('inf')
  for _ in range(calls):
    start = time.perf_counter()
    matmul(a_NxN, a_NxN).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def train_flops(cfg, seq_len: int, real_tokens: int, predictions: int,
                sparse_last_layer: bool = True) -> float:
  """FLOPs of one training step (forward + backward = 3x forward).

  Counts matmuls on real (non-pad) tokens, i.e. 6 x the non-embedding
  parameters per token; bidirectional attention in full (every query against
  all seq_len keys, local layers included, since the mask is applied to a
  full score matrix); and the MLM head at every executed prediction slot
  (the sparse head runs on max_predictions slots per row; a dense head, as
  Hugging Face's, on every position: pass predictions = B x L for it).
  With `sparse_last_layer` (ours: model.BertForMLM), the final layer runs
  at every token only for its keys and values, and at the prediction slots
  for the rest (queries, attention, output projection, MLP); pass False for
  a model that runs every layer at every position (Hugging Face's).
  """
  d, f = cfg.hidden_dim, cfg.mlp_dim
  mlp_matrices = 3 if cfg.activation == 'geglu' else 2  # GeGLU: two in, one out
  keys_values = 2 * (2 * d * d)
  queries_and_rest = 2 * (2 * d * d + mlp_matrices * d * f) + 4 * seq_len * d
  dense_layers = cfg.num_layers - (1 if sparse_last_layer else 0)
  per_token = dense_layers * (keys_values + queries_and_rest)
  # The decoder runs over the padded vocabulary.
  per_prediction = 2 * (d * d + d * cfg.padded_vocab_size)
  if sparse_last_layer:
    per_token += keys_values
    per_prediction += queries_and_rest
  return 3.0 * (real_tokens * per_token + predictions * per_prediction)


def summarize(sums: dict, prefix: str) -> dict:
  """{name: [sum, weight]} -> {prefix/name: sum / weight}."""
  out = {}
  for name, value in sums.items():
    total, weight = np.asarray(value, np.float64)
    out[f'{prefix}/{name}'] = float(total / weight) if weight else float('nan')
  return out


def _keep_records_up_to(path: str, step: int):
  """Moves records after `step` (and lines cut short) out of PATH, to a file
  beside it, PATH.replaced-<UTC time>; nothing is deleted.

  A run resumed from the checkpoint at `step` recomputes the later steps
  (exactly, on the same devices), so their old records would be duplicates
  in PATH; they stay on disk for a comparison or a post-mortem.
  """
  if not os.path.exists(path):
    return
  kept, moved = [], []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        record = None
      if isinstance(record, dict) and record.get('step', step + 1) <= step:
        kept.append(line)
      else:
        moved.append(line if line.endswith('\n') else line + '\n')
  if not moved:
    return
  stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
  replaced = f'{path}.replaced-{stamp}'
  with open(replaced, 'a') as f:  # 'a': two resumes in one second
    f.writelines(moved)
    f.flush()
    os.fsync(f.fileno())
  with open(path + '.tmp', 'w') as f:
    f.writelines(kept)
  os.replace(path + '.tmp', path)
  logging.warning('Moved %d metrics record(s) after step %d from %s to %s '
                  '(the resumed run writes those steps again).', len(moved),
                  step, path, replaced)


class Writer:
  """Writes scalars to WORKDIR/metrics.jsonl and TensorBoard (process 0 only).

  `start_step` is the step the run resumes from: records after it, written
  before a crash, are moved to a dated file beside metrics.jsonl.
  """

  def __init__(self, workdir: str, start_step: int = 0):
    self.active = jax.process_index() == 0
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, 'metrics.jsonl')
      _keep_records_up_to(path, start_step)
      self._jsonl = open(path, 'a')
      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def sync(self):
    """Puts the records written so far on disk (before a checkpoint commits)."""
    if self.active:
      os.fsync(self._jsonl.fileno())

  def write(self, step: int, scalars: dict):
    if not self.active:
      return
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self):
    if self.active:
      self._jsonl.close()
      self._tb.close()
