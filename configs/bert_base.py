"""BERT-base pretraining recipe: sequence 128, bfloat16 compute, Wikipedia.

The model is the `bert` recipe (base.py's model defaults, recipes.RECIPES['bert']):
exactly Hugging Face's BertForMaskedLM, so `convert to_hf` exports it.

The platform configs (tpu_v4.py, gpu_h100.py) take this and set the batch
for their hardware. Point data.source at a Wikipedia dump; the tokenizer and
packed dataset are built once into data.data_dir.
"""
from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.num_steps = 100_000
  c.batch_size = 1024
  c.seq_len = 128
  c.learning_rate = 1e-3
  c.warmup_steps = 5_000
  c.log_every = 100
  c.eval_every = 5_000
  c.eval_batches = 50
  c.checkpoint_every = 5_000
  c.model.size = 'base'
  c.model.dtype = 'bfloat16'
  c.data.vocab_size = 32_768
  return c
