"""The `modern` encoder recipe (ModernBERT's choices) on the BERT-base recipe.

Pre-LN, rotary positions, GeGLU, no biases or token types, sliding-window
attention (128 wide) with a global layer every 3, vocabulary padded to a
multiple of 128, no dropout. The argument picks the size; `tiny` runs on a
CPU on the demo corpus:

  python -m mlm_jax.main --config=configs/modern.py:tiny --workdir=/tmp/modern \
      --config.data.source=demo --config.num_steps=400 --config.batch_size=32

Not exportable to transformers' BertForMaskedLM (convert to_hf refuses it);
the `bert` recipe (configs/bert_base.py, base.py's model defaults) is.
"""
from configs import bert_base
from configs import recipes


def get_config(arg=None):
  c = bert_base.get_config()
  c.model.update(recipes.RECIPES['modern'])
  if arg:
    c.model.size = arg
  if c.model.size == 'tiny':  # a CPU-sized run
    c.model.dtype = 'float32'
    c.seq_len = c.model.max_len = 128
  return c
