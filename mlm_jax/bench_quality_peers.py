"""The contenders of `python -m mlm_jax.bench quality`, each a small trainer.

Four ways to pretrain the same-sized BERT-style encoder on the same packed
corpus and tokenizer, each with the same small interface, so the race in
bench_quality.py drives them alike:

  trainer = make(name, config, prepared)   # built, nothing run yet
  tokens = trainer.step()        # one optimizer update; real tokens trained on
  trainer.sync()                 # wait for every update dispatched so far
  logits_BxKxV = trainer.logits(inputs_BxL, attention_BxL, positions_BxK)

  mlm_jax_bert  ours (build.build + its train step: masking on device, packed
                rows, the sparse head) with the BERT recipe: post-LN, learned
                positions, dropout 0.1, HF's architecture exactly.
  mlm_jax_best  ours with our best CPU recipe (configs/cpu.py: pre-LN, RoPE,
                no dropout; or configs/modern.py with --quality_best=modern).
  hf_flax       transformers' FlaxBertForMaskedLM trained as
                examples/flax/language-modeling/run_mlm_flax.py trains it: the
                texts grouped into blocks, a host-side
                DataCollatorForLanguageModeling, a shuffled epoch of batches,
                adamw with linear warmup and decay (bench_peers.hf_flax_step).
  hf_torch      transformers' BertForMaskedLM in the loop Trainer runs by
                default: the collator on the host, fused AdamW, the gradient
                clipped to norm 1, a linear warmup/decay LambdaLR.

`logits` scores rows the caller gives it (eval mode, no dropout) at the
given positions: the shared eval (bench_quality.score) turns them into loss
and accuracy, so every contender is scored by one code path.

Must not: score (bench_quality.score does), time, or choose learning rates.
"""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from configs import cpu
from configs import modern
from mlm_jax import bench_peers
from mlm_jax import build
from mlm_jax import model_config
from mlm_jax.data import pipeline
from mlm_jax.data import tokenizer as tokenizer_lib

NAMES = ('mlm_jax_bert', 'mlm_jax_best', 'hf_flax', 'hf_torch')
BEST_RECIPES = ('demo', 'modern')
PAD, CLS, SEP = (tokenizer_lib.SPECIALS[k] for k in ('[PAD]', '[CLS]',
                                                    '[SEP]'))


def contender_config(name: str, *, size: str, batch: int, seq_len: int,
                     learning_rate: float, num_steps: int, warmup_frac: float,
                     seed: int, data_config, best: str = 'demo'):
  """The run config of a contender: our configs, one size and shape for all.

  The peers run the BERT recipe's model config (base.py's model defaults);
  the optimizer settings (betas, epsilon, weight decay, warmup fraction) are
  base.py's for every contender, only the learning rate differs.
  """
  if name == 'mlm_jax_best' and best == 'modern':
    c = modern.get_config(size)
    c.model.dtype = 'float32'
  elif name == 'mlm_jax_best':
    c = cpu.get_config()
  else:
    c = base.get_config()
  c.model.size = size
  c.seq_len = c.model.max_len = seq_len
  c.batch_size, c.seed = batch, seed
  c.learning_rate, c.num_steps = learning_rate, num_steps
  c.warmup_steps = int(round(warmup_frac * num_steps))
  c.data = data_config
  return c


def hf_blocks(train_source, seq_len: int) -> np.ndarray:
  """int32 [N, L] blocks of the training documents, as run_mlm_flax makes them.

  The packed rows hold the documents' token stream (row r is [CLS] and
  stream[r(L-1) : (r+1)(L-1)], each document ending in [SEP]): split back
  into documents, each is tokenized as HF would ([CLS] doc [SEP]), and
  `group_texts` concatenates them all and cuts blocks of L, dropping the
  remainder.
  """
  rows = np.stack([np.asarray(train_source[i]['input_ids'])
                   for i in range(len(train_source))])
  stream = rows[:, 1:].ravel()
  stream = stream[stream != PAD]
  docs = np.split(stream, np.flatnonzero(stream == SEP) + 1)[:-1]
  concat = np.concatenate([np.concatenate([[CLS], d]) for d in docs])
  usable = len(concat) // seq_len * seq_len
  return concat[:usable].reshape(-1, seq_len).astype(np.int32)


class Ours:
  """mlm_jax's own step (build.build) over the packed rows (grain loader)."""

  def __init__(self, config, prepared):
    self.built = build.build(config, tokenizer=prepared.tokenizer)
    self.state = self.built.init()
    self.batches = pipeline.train_iterator(
        prepared.train_source, config.batch_size, config.seed, 0, 1)
    self.in_flight = None  # the last step's metrics, fetched one step late
    graphdef = self.built.graphdef

    @jax.jit
    def logits(params, inputs_BxL, segment_ids_BxL, positions_BxK):
      return nnx.merge(graphdef, params)(inputs_BxL, segment_ids_BxL,
                                         positions_BxK, deterministic=True)
    self._logits = logits

  def step(self) -> int:
    local = next(self.batches)
    self.state, metrics = self.built.train_step(
        self.state, self.built.to_device(local))
    if self.in_flight is not None:  # as train.py: wait one step late
      jax.block_until_ready(self.in_flight)
    self.in_flight = metrics
    return int(np.count_nonzero(local['segment_ids']))

  def sync(self):
    jax.block_until_ready((self.state, self.in_flight))

  def logits(self, inputs_BxL, attention_BxL, positions_BxK) -> np.ndarray:
    # One segment per eval row (bench_quality.eval_set): segment ids are
    # the attention mask, positions count from 0 as in HF's BERT.
    with jax.set_mesh(self.built.mesh):
      return np.asarray(self._logits(self.state.params, inputs_BxL,
                                     attention_BxL, positions_BxK))


class _HFData:
  """run_mlm_flax's data loop: shuffled epochs of blocks, the collator on
  the host (numpy's global RNG, seeded once, as the script's masking)."""

  def __init__(self, blocks_NxL, batch: int, seed: int, vocab_size: int,
               tensors: str):
    import transformers  # pylint: disable=g-import-not-at-top
    if len(blocks_NxL) < batch:
      raise ValueError(f'{len(blocks_NxL)} blocks of text, fewer than one '
                       f'batch of {batch}.')
    self.blocks, self.batch = blocks_NxL, batch
    self.rng = np.random.default_rng(seed)
    np.random.seed(seed)
    self.collator = transformers.DataCollatorForLanguageModeling(
        bench_peers.bert_tokenizer(vocab_size), mlm=True,
        mlm_probability=0.15, return_tensors=tensors)
    self.order, self.at = [], 0

  def __next__(self):
    if self.at + self.batch > len(self.order):  # a new epoch, remainder dropped
      self.order, self.at = self.rng.permutation(len(self.blocks)), 0
    idx = self.order[self.at:self.at + self.batch]
    self.at += self.batch
    return self.collator(list(self.blocks[idx]))


def _gather_BxKxV(logits_BxLxV, positions_BxK):
  return jnp.take_along_axis(logits_BxLxV, positions_BxK[:, :, None], axis=1)


class HFFlax:
  """FlaxBertForMaskedLM with run_mlm_flax.py's step (bench_peers)."""

  def __init__(self, config, mcfg, blocks_NxL):
    self.step_fn, self.state = bench_peers.hf_flax_step(config, mcfg)
    self.rng = jax.random.key(config.seed)
    self.data = _HFData(blocks_NxL, config.batch_size, config.seed,
                        mcfg.vocab_size, 'np')
    self.tokens = config.batch_size * config.seq_len
    self.in_flight = None
    apply = self.state.apply_fn

    @jax.jit
    def logits(params, inputs_BxL, attention_BxL, positions_BxK):
      out = apply(input_ids=inputs_BxL, attention_mask=attention_BxL,
                  token_type_ids=jnp.zeros_like(inputs_BxL), params=params,
                  train=False)[0]
      return _gather_BxKxV(out, positions_BxK)
    self._logits = logits

  def step(self) -> int:
    b = next(self.data)
    ids = b['input_ids'].astype(np.int32)
    batch = {'input_ids': ids, 'labels': b['labels'].astype(np.int32),
             'attention_mask': np.ones_like(ids),
             'token_type_ids': np.zeros_like(ids)}
    self.state, metrics, self.rng = self.step_fn(self.state, batch, self.rng)
    if self.in_flight is not None:
      jax.block_until_ready(self.in_flight)
    self.in_flight = metrics
    return self.tokens

  def sync(self):
    jax.block_until_ready((self.state, self.in_flight))

  def logits(self, inputs_BxL, attention_BxL, positions_BxK) -> np.ndarray:
    return np.asarray(self._logits(self.state.params, inputs_BxL,
                                   attention_BxL, positions_BxK))


class HFTorch:
  """BertForMaskedLM in the Trainer's default loop (bench_peers)."""

  def __init__(self, config, mcfg, blocks_NxL):
    self.step_fn, self.model = bench_peers.hf_torch_trainer(
        config, mcfg, compile_model=False, lr_schedule=True)
    self.data = _HFData(blocks_NxL, config.batch_size, config.seed,
                        mcfg.vocab_size, 'pt')
    self.tokens = config.batch_size * config.seq_len

  def step(self) -> int:
    self.step_fn(next(self.data))
    return self.tokens

  def sync(self):
    pass  # eager on the CPU: each step has finished when it returns

  def logits(self, inputs_BxL, attention_BxL, positions_BxK) -> np.ndarray:
    import torch  # pylint: disable=g-import-not-at-top
    self.model.eval()
    try:
      with torch.no_grad():
        out = self.model(
            input_ids=torch.from_numpy(np.asarray(inputs_BxL, np.int64)),
            attention_mask=torch.from_numpy(np.asarray(attention_BxL,
                                                       np.int64))).logits
        index = torch.from_numpy(np.asarray(positions_BxK, np.int64))
        return torch.take_along_dim(out, index[:, :, None], dim=1).numpy()
    finally:
      self.model.train()


def make(name: str, config, prepared, blocks_NxL=None):
  """A fresh trainer of contender `name` for `config` (contender_config);
  the peers train on `blocks_NxL` (hf_blocks of the same corpus)."""
  if name in ('mlm_jax_bert', 'mlm_jax_best'):
    return Ours(config, prepared)
  mcfg = model_config.from_config(config, prepared.tokenizer.vocab_size)
  if blocks_NxL is None:
    blocks_NxL = hf_blocks(prepared.train_source, config.seq_len)
  if name == 'hf_flax':
    return HFFlax(config, mcfg, blocks_NxL)
  if name == 'hf_torch':
    return HFTorch(config, mcfg, blocks_NxL)
  raise ValueError(f'Unknown contender {name!r}; known: {NAMES}.')
