"""The encoder recipes: the `model` knobs each one sets.

Plain data, so config files (configs/modern.py, experiments/) and tests can
apply a recipe with `c.model.update(recipes.RECIPES[name])`.
"""

RECIPES = {
    # Exactly Hugging Face's BertForMaskedLM (base.py's model defaults):
    # exportable with convert to_hf.
    'bert': dict(pre_ln=False, position='learned', activation='gelu',
                 type_vocab_size=2, use_bias=True, local_window=0,
                 global_every=1, vocab_multiple=1, layer_norm_eps=1e-12),
    # ModernBERT's recipe: pre-LN, RoPE, GeGLU, no biases or token types,
    # local attention (128) with a global layer every 3, vocab padded to 128.
    'modern': dict(pre_ln=True, position='rope', activation='geglu',
                   type_vocab_size=0, use_bias=False, local_window=128,
                   global_every=3, vocab_multiple=128, layer_norm_eps=1e-5,
                   dropout_rate=0.0, attention_dropout_rate=0.0),
}
