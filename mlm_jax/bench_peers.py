"""The peers that `python -m mlm_jax.bench` times ours against.

Hugging Face's BERT, built offline from a local config (no hub download):
the tokenizer and data collator (masking on the host), FlaxBertForMaskedLM
with the train step of transformers' run_mlm_flax.py, and BertForMaskedLM
in the PyTorch loop transformers' Trainer runs. transformers and torch are
imported inside the functions: they come with the `bench` extra. Also the
commit every benchmark stamps on its JSON.
"""
import os
import subprocess
import tempfile

import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mlm_jax import hf
from mlm_jax import optimizer
from mlm_jax.data import tokenizer as tokenizer_lib

def commit() -> str:
  """The short git commit of this checkout, stamped on every benchmark's
  JSON ('unknown' outside a git checkout)."""
  try:
    return subprocess.run(
        ['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
        text=True, check=True,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


SPECIAL_IDS = tuple(tokenizer_lib.SPECIALS.values())
PAD = tokenizer_lib.SPECIALS['[PAD]']


def bert_tokenizer(vocab_size: int):
  """A BertTokenizerFast with our special ids, built offline from a vocab file.

  BertTokenizerFast rather than a bare `tokenizers` WordLevel model: it is
  what an HF BERT user has, and the collator calls `len(tokenizer)` every
  batch, whose cost depends on the backend model (WordPiece's is cheaper).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  by_id = sorted(tokenizer_lib.SPECIALS, key=tokenizer_lib.SPECIALS.get)
  words = by_id + [f'w{i}' for i in range(len(by_id), vocab_size)]
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'vocab.txt')
    with open(path, 'w') as f:
      f.write('\n'.join(words) + '\n')
    tokenizer = transformers.BertTokenizerFast(vocab_file=path)
  got = (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
         tokenizer.sep_token_id, tokenizer.mask_token_id, len(tokenizer))
  if got != (*SPECIAL_IDS, vocab_size):
    raise ValueError(f'HF tokenizer ids {got} != ours '
                     f'{(*SPECIAL_IDS, vocab_size)}')
  return tokenizer


def hf_flax_step(config, mcfg):
  """(step(state, batch, rng), state): run_mlm_flax.py's train step, jitted.

  As in transformers' examples/flax/language-modeling/run_mlm_flax.py: a
  flax TrainState with optax.adamw (decay mask: no biases or LayerNorm
  scales), the loss over labels > 0, the gradient divided by the label
  count; jit with the state donated (the script pmaps over 1 device here).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  hf_model = transformers.FlaxBertForMaskedLM(
      hf.bert_config(mcfg), seed=config.seed, dtype=getattr(jnp, mcfg.dtype))

  def decay_mask_fn(params):
    flat = flax.traverse_util.flatten_dict(params)
    return flax.traverse_util.unflatten_dict({
        path: path[-1] != 'bias' and path[-2:] != ('LayerNorm', 'scale')
        for path in flat})

  tx = optax.adamw(optimizer.learning_rate_schedule(config),
                   b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                   weight_decay=config.weight_decay, mask=decay_mask_fn)
  state = train_state.TrainState.create(apply_fn=hf_model.__call__,
                                        params=hf_model.params, tx=tx)

  def step(state, batch, dropout_rng):
    dropout_rng, new_dropout_rng = jax.random.split(dropout_rng)

    def loss_fn(params):
      labels = batch['labels']
      logits = state.apply_fn(
          input_ids=batch['input_ids'],
          attention_mask=batch['attention_mask'],
          token_type_ids=batch['token_type_ids'], params=params,
          dropout_rng=dropout_rng, train=True)[0]
      label_mask = jnp.where(labels > 0, 1.0, 0.0)
      loss = optax.softmax_cross_entropy(
          logits, jax.nn.one_hot(labels, logits.shape[-1])) * label_mask
      return loss.sum(), label_mask.sum()

    (loss, num_labels), grad = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    grad = jax.tree.map(lambda x: x / num_labels, grad)
    return (state.apply_gradients(grads=grad), {'loss': loss / num_labels},
            new_dropout_rng)

  return jax.jit(step, donate_argnums=(0,)), state


def hf_torch_step(config, mcfg, compile_model: bool):
  """step(batch): HF BertForMaskedLM's standard PyTorch loop body.

  What transformers' Trainer runs by default with torch >= 2.8: AdamW
  (fused, no decay on biases and LayerNorm weights), loss.backward(), the
  gradient clipped to norm 1.0, optimizer.step(), zero_grad; SDPA attention.
  """
  return hf_torch_trainer(config, mcfg, compile_model)[0]


def hf_torch_trainer(config, mcfg, compile_model: bool,
                     lr_schedule: bool = False):
  """(step(batch), the model): hf_torch_step's loop body and its model.

  lr_schedule: also step the Trainer's default scheduler after each update
  (linear warmup over config.warmup_steps, linear decay to 0 at
  config.num_steps, as optimizer.learning_rate_schedule); without it the
  rate stays at config.learning_rate (the step-time benchmark).
  """
  # pylint: disable=g-import-not-at-top
  import torch
  import transformers
  # pylint: enable=g-import-not-at-top
  torch.manual_seed(config.seed)
  hf_model = transformers.BertForMaskedLM(hf.bert_config(mcfg))
  hf_model.train()
  no_decay = ('bias', 'LayerNorm.weight')
  groups = [
      {'params': [p for n, p in hf_model.named_parameters()
                  if not n.endswith(no_decay)],
       'weight_decay': config.weight_decay},
      {'params': [p for n, p in hf_model.named_parameters()
                  if n.endswith(no_decay)], 'weight_decay': 0.0}]
  opt = torch.optim.AdamW(groups, lr=config.learning_rate,
                          betas=(config.adam_b1, config.adam_b2),
                          eps=config.adam_eps, fused=True)
  scheduler = None
  if lr_schedule:
    # transformers.get_linear_schedule_with_warmup, the Trainer's default.
    scheduler = transformers.get_linear_schedule_with_warmup(
        opt, config.warmup_steps, config.num_steps)
  forward = torch.compile(hf_model) if compile_model else hf_model

  def step(batch):
    loss = forward(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf_model.parameters(),
                                   config.grad_clip_norm)
    opt.step()
    if scheduler is not None:
      scheduler.step()
    opt.zero_grad(set_to_none=True)
    return loss

  return step, hf_model


def hf_batches(ids_BxL: np.ndarray, count: int, vocab_size: int, rate: float):
  """`count` batches masked by HF's collator on the host, as HF trains.

  Made before timing: the peers' masking runs in their data pipeline, not
  in their step (ours is in our step and timed).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  collator = transformers.DataCollatorForLanguageModeling(
      bert_tokenizer(vocab_size),
      mlm=True, mlm_probability=rate, return_tensors='np')
  out = []
  for _ in range(count):
    batch = collator(list(ids_BxL))
    out.append({'input_ids': batch['input_ids'].astype(np.int32),
                'labels': batch['labels'].astype(np.int32),
                'attention_mask': (ids_BxL != PAD).astype(np.int32),
                'token_type_ids': np.zeros_like(ids_BxL)})
  return out
