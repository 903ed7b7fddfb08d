"""A BERT-style encoder for masked language modeling, in Flax NNX.

The default parameter layout follows Hugging Face's `BertForMaskedLM` (word,
position and token-type embeddings; post-LN blocks; GELU MLP; an MLM head
with a dense transform, GELU, LayerNorm and a decoder tied to the word
embeddings plus a bias), so weights can be exchanged with it (`hf.py`).
Knobs turn it into a modern encoder (ModernBERT, MosaicBERT, Cramming):
`pre_ln` moves each LayerNorm in front of its sublayer and adds a final one;
`position='rope'` rotates queries and keys instead of adding a position
table; `activation` picks GELU (erf), GELU-tanh or GeGLU; `type_vocab_size=0`
drops token-type embeddings; `use_bias=False` drops the biases of dense
layers and LayerNorms; `local_window` with `global_every` alternates sliding
window and global attention; `vocab_multiple` pads the vocabulary; `remat`
and `scan_layers` trade compute for memory and compile time.

Training is sparse at the top: `BertForMLM` runs the MLM head, and all of
the final layer except its keys and values, only at the K positions it
predicts (exact: nothing else reads the last layer's other outputs).

Shape letters used in names:
  B batch, L sequence length, K predictions per row, D hidden size,
  H attention heads, Dh head size (D / H), F MLP size, V vocabulary size
  (padded to a multiple of `vocab_multiple`), P maximum positions,
  N layers.
Every parameter carries logical axis names (`vocab, embed, heads, kv, mlp`,
and `layers` for the stacked blocks of `scan_layers`); `sharding.py` maps
them to mesh axes.
"""
import functools

from flax import nnx
import jax
import jax.numpy as jnp

from mlm_jax import attention
from mlm_jax import model_config
from mlm_jax import sharding

# jax.checkpoint policies by `remat` name ('none': no rematerialisation).
REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block
    'dots': jax.checkpoint_policies.checkpoint_dots,  # save every matmul output
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
assert set(REMAT_POLICIES) == set(model_config.REMAT_NAMES)


def _init(cfg: model_config.ModelConfig, names):
  return nnx.with_partitioning(
      nnx.initializers.normal(cfg.initializer_range), names)


def _dense(cfg, d_in, d_out, names, rngs):
  return nnx.Linear(
      d_in, d_out, use_bias=cfg.use_bias, dtype=cfg.dtype,
      param_dtype=cfg.param_dtype, kernel_init=_init(cfg, names),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, names[-1:]),
      rngs=rngs)


def _layer_norm(cfg, rngs):
  return nnx.LayerNorm(
      cfg.hidden_dim, epsilon=cfg.layer_norm_eps, use_bias=cfg.use_bias,
      dtype=cfg.dtype, param_dtype=cfg.param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones, ('embed',)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros, ('embed',)),
      rngs=rngs)


def _activation(name):
  return functools.partial(jax.nn.gelu, approximate=name == 'gelu_tanh')


class Dropout(nnx.Module):
  """Inverted dropout drawn from 16-bit random numbers.

  Each 32-bit Threefry word gives two draws, so this asks for half the
  random words of nnx.Dropout (one word per element): on a CPU, generating
  them was a large share of a BERT training step (BENCHMARKS.md, speed
  work). An element is dropped when its draw is below round(rate * 2^16):
  the drop probability is `rate` to within 2^-17. The words are drawn in
  the input's shape (last axis halved), so the mask does not depend on how
  the input is sharded.
  """

  def __init__(self, rate: float):
    self.rate = rate

  def __call__(self, x, *, deterministic: bool, rngs=None):
    if deterministic or self.rate == 0:
      return x
    if self.rate >= 1:
      return jnp.zeros_like(x)
    *lead, last = x.shape
    words = jax.random.bits(rngs.dropout(), (*lead, -(-last // 2)),
                            jnp.uint32)
    draws = jax.lax.bitcast_convert_type(words, jnp.uint16)
    draws = draws.reshape(*lead, -1)[..., :last]
    keep = draws >= jnp.uint16(round(self.rate * 65536))
    return jnp.where(keep, x / (1 - self.rate), 0).astype(x.dtype)


def positions_from_segments(segment_ids_BxL: jax.Array) -> jax.Array:
  """Position ids that restart at 0 where each packed segment starts."""
  seq_len = segment_ids_BxL.shape[1]
  idx_BxL = jnp.broadcast_to(jnp.arange(seq_len), segment_ids_BxL.shape)
  is_start_BxL = jnp.concatenate(
      [jnp.ones_like(segment_ids_BxL[:, :1], bool),
       segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]], axis=1)
  start_BxL = jax.lax.cummax(jnp.where(is_start_BxL, idx_BxL, 0), axis=1)
  return idx_BxL - start_BxL



def _lookup(embed: nnx.Embed, ids_BxL: jax.Array) -> jax.Array:
  """Rows of an embedding table, [B, L] -> [B, L, D], batch-sharded.

  Under FSDP the table's embed axis is sharded; a gather from it would come
  out split over embed, which XLA cannot reshard to the batch layout cheaply
  ("Involuntary full rematerialization" on a data x fsdp x tensor mesh). So
  the table is gathered whole first, as FSDP does with every other weight,
  and the rows come out in the activations' layout.
  """
  table_VxD = sharding.constrain(embed.embedding[...], 'vocab', None)
  x_BxLxD = jnp.take(table_VxD.astype(embed.dtype), ids_BxL, axis=0)
  return sharding.constrain(x_BxLxD, 'batch', 'length', None)


class Embeddings(nnx.Module):

  def __init__(self, cfg: model_config.ModelConfig, rngs: nnx.Rngs):
    def embed(n, names):
      return nnx.Embed(n, cfg.hidden_dim, dtype=cfg.dtype,
                       param_dtype=cfg.param_dtype,
                       embedding_init=_init(cfg, names), rngs=rngs)
    self.word = embed(cfg.padded_vocab_size, ('vocab', 'embed'))
    self.position = (embed(cfg.max_len, (None, 'embed'))
                     if cfg.position == 'learned' else None)
    self.token_type = (embed(cfg.type_vocab_size, (None, 'embed'))
                       if cfg.type_vocab_size else None)
    self.norm = _layer_norm(cfg, rngs)
    self.dropout = Dropout(cfg.dropout_rate)

  def __call__(self, ids_BxL, positions_BxL, token_types_BxL, *, deterministic,
               rngs):
    x_BxLxD = _lookup(self.word, ids_BxL)
    if self.token_type is not None:
      if token_types_BxL is None:
        token_types_BxL = jnp.zeros_like(ids_BxL)
      x_BxLxD = x_BxLxD + _lookup(self.token_type, token_types_BxL)
    if self.position is not None:
      x_BxLxD = x_BxLxD + _lookup(self.position, positions_BxL)
    return self.dropout(self.norm(x_BxLxD), deterministic=deterministic,
                        rngs=rngs)


class Block(nnx.Module):
  """One transformer layer: attention then MLP, each with a residual."""

  def __init__(self, cfg: model_config.ModelConfig, rngs: nnx.Rngs):
    self.pre_ln = cfg.pre_ln
    self.glu = cfg.activation == 'geglu'
    self.act = _activation(cfg.activation)
    dense = functools.partial(_dense, cfg)
    self.attention = attention.SelfAttention(cfg, dense, rngs, Dropout)
    self.attention_norm = _layer_norm(cfg, rngs)
    # GeGLU: one matmul makes both the gated half and the gate.
    self.mlp_in = dense(cfg.hidden_dim, cfg.mlp_dim * (2 if self.glu else 1),
                        ('embed', 'mlp'), rngs)
    self.mlp_out = dense(cfg.mlp_dim, cfg.hidden_dim, ('mlp', 'embed'), rngs)
    self.mlp_norm = _layer_norm(cfg, rngs)
    self.dropout = Dropout(cfg.dropout_rate)

  def _mlp(self, x_BxLxD):
    h_BxLxF = sharding.constrain(self.mlp_in(x_BxLxD), 'batch', 'length',
                                 'mlp')
    if self.glu:
      h_BxLxF, gate_BxLxF = jnp.split(h_BxLxF, 2, axis=-1)
      h_BxLxF = self.act(h_BxLxF) * gate_BxLxF
    else:
      h_BxLxF = self.act(h_BxLxF)
    return self.mlp_out(h_BxLxF)

  def __call__(self, x_BxLxD, allowed_BxLxL, positions_BxL, *, deterministic,
               rngs, queries_BxK=None):
    """[B, L, D] -> [B, L, D]; or [B, K, D] at the positions `queries_BxK`.

    Every sublayer but attention's keys and values works token by token, so
    outputs wanted only at K positions need only those rows computed: the
    final layer of a sparse MLM step (Q = L or K below).
    """
    drop = lambda t: self.dropout(t, deterministic=deterministic, rngs=rngs)
    attend = lambda t: self.attention(t, allowed_BxLxL, positions_BxL,
                                      deterministic=deterministic, rngs=rngs,
                                      queries_BxK=queries_BxK)
    x_BxQxD = x_BxLxD
    if queries_BxK is not None:
      x_BxQxD = jnp.take_along_axis(x_BxLxD, queries_BxK[..., None], axis=1)
    if self.pre_ln:
      x_BxQxD = x_BxQxD + drop(attend(self.attention_norm(x_BxLxD)))
      return x_BxQxD + drop(self._mlp(self.mlp_norm(x_BxQxD)))
    x_BxQxD = self.attention_norm(x_BxQxD + drop(attend(x_BxLxD)))
    return self.mlp_norm(x_BxQxD + drop(self._mlp(x_BxQxD)))


def _stacked_blocks(cfg: model_config.ModelConfig, rngs: nnx.Rngs) -> Block:
  """One Block whose parameters carry a leading [N] layer axis."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=0, out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def make(rngs):
    return Block(cfg, rngs)

  return make(rngs)


class Encoder(nnx.Module):
  """Token ids -> contextual vectors; packed segments never attend across."""

  def __init__(self, cfg: model_config.ModelConfig, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = Embeddings(cfg, rngs)
    if cfg.scan_layers:
      self.blocks = _stacked_blocks(cfg, rngs)
    else:
      self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = _layer_norm(cfg, rngs) if cfg.pre_ln else None

  def _layer_fn(self, graphdef, deterministic):
    """(block params, x, allowed, positions, dropout key) -> x, rematted."""
    cfg = self.config

    def apply(params, x_BxLxD, allowed_BxLxL, positions_BxL, key,
              queries_BxK=None):
      block = nnx.merge(graphdef, params)
      rngs = None if key is None else nnx.Rngs(dropout=key)
      return block(x_BxLxD, allowed_BxLxL, positions_BxL,
                   deterministic=deterministic, rngs=rngs,
                   queries_BxK=queries_BxK)

    if cfg.remat == 'none':
      return apply
    return jax.checkpoint(apply, policy=REMAT_POLICIES[cfg.remat])

  def __call__(self, ids_BxL, segment_ids_BxL, token_types_BxL=None, *,
               deterministic=True, rngs=None, outputs_at_BxK=None):
    """[B, L, D] vectors; or [B, K, D] at the positions `outputs_at_BxK`.

    With `outputs_at_BxK` the final layer runs only at those positions (its
    keys and values still see every token), which is exact: no other
    position's output of the last layer reaches them.
    """
    cfg = self.config
    positions_BxL = positions_from_segments(segment_ids_BxL)
    same_segment_BxLxL = attention.segment_mask(segment_ids_BxL)
    local_BxLxL = same_segment_BxLxL
    if cfg.local_window:
      local_BxLxL = same_segment_BxLxL & attention.window_mask(
          ids_BxL.shape[1], cfg.local_window)
    x_BxLxD = self.embeddings(ids_BxL, positions_BxL, token_types_BxL,
                              deterministic=deterministic, rngs=rngs)
    # Activations: rows split over the batch axes, features whole.
    pin = lambda x: sharding.constrain(x, 'batch', 'length', None)
    x_BxLxD = pin(x_BxLxD)
    layer_key = None
    if not deterministic and rngs is not None:
      layer_key = rngs.dropout()

    def allowed(layer):
      is_global = attention.is_global_layer(layer, cfg.local_window,
                                            cfg.global_every)
      if isinstance(is_global, bool):
        return same_segment_BxLxL if is_global else local_BxLxL
      return jnp.where(is_global, same_segment_BxLxL, local_BxLxL)

    key_of = lambda i: (None if layer_key is None
                        else jax.random.fold_in(layer_key, i))
    last = cfg.num_layers - 1
    if cfg.scan_layers:
      graphdef, params = nnx.split(self.blocks)
      apply = self._layer_fn(graphdef, deterministic)

      def body(x_BxLxD, layer_params_and_index):
        layer_params, i = layer_params_and_index
        return pin(apply(layer_params, x_BxLxD, allowed(i), positions_BxL,
                         key_of(i))), None

      # The scan runs every layer but the last, which may be sparse.
      x_BxLxD, _ = jax.lax.scan(
          body, x_BxLxD,
          (jax.tree.map(lambda p: p[:last], params), jnp.arange(last)))
      x_BxLxD = apply(jax.tree.map(lambda p: p[last], params), x_BxLxD,
                      allowed(last), positions_BxL, key_of(last),
                      outputs_at_BxK)
    else:
      for i, block in enumerate(self.blocks):
        queries_BxK = outputs_at_BxK if i == last else None
        if cfg.remat == 'none':
          x_BxLxD = block(x_BxLxD, allowed(i), positions_BxL,
                          deterministic=deterministic,
                          rngs=None if layer_key is None
                          else nnx.Rngs(dropout=key_of(i)),
                          queries_BxK=queries_BxK)
        else:
          graphdef, params = nnx.split(block)
          x_BxLxD = self._layer_fn(graphdef, deterministic)(
              params, x_BxLxD, allowed(i), positions_BxL, key_of(i),
              queries_BxK)
        if i < last:
          x_BxLxD = pin(x_BxLxD)
    if self.final_norm is not None:
      x_BxLxD = self.final_norm(x_BxLxD)
    return x_BxLxD  # [B, K, D] when outputs_at_BxK is given


class MLMHead(nnx.Module):
  """Dense + GELU + LayerNorm, then the tied decoder; logits in float32.

  Padded vocabulary rows (ids >= vocab_size) get the lowest float32 logit, so
  they take no probability mass in the softmax.
  """

  def __init__(self, cfg: model_config.ModelConfig, rngs: nnx.Rngs):
    self.vocab_size = cfg.vocab_size
    # GeGLU recipes keep a plain GELU in the head, as ModernBERT does.
    self.act = _activation(cfg.activation)
    self.transform = _dense(cfg, cfg.hidden_dim, cfg.hidden_dim,
                            ('embed', 'mlp'), rngs)
    self.norm = _layer_norm(cfg, rngs)
    self.bias = nnx.Param(jnp.zeros((cfg.padded_vocab_size,), cfg.param_dtype),
                          out_sharding=('vocab',))

  def __call__(self, h_BxKxD, word_embedding_VxD):
    h_BxKxD = self.norm(self.act(self.transform(h_BxKxD)))
    logits_BxKxV = jnp.einsum('bkd,vd->bkv', h_BxKxD,
                              word_embedding_VxD.astype(h_BxKxD.dtype))
    logits_BxKxV = (logits_BxKxV.astype(jnp.float32) +
                    self.bias.astype(jnp.float32))
    if logits_BxKxV.shape[-1] > self.vocab_size:
      real_V = jnp.arange(logits_BxKxV.shape[-1]) < self.vocab_size
      logits_BxKxV = jnp.where(real_V, logits_BxKxV,
                               jnp.finfo(jnp.float32).min)
    return logits_BxKxV


class BertForMLM(nnx.Module):

  def __init__(self, cfg: model_config.ModelConfig, rngs: nnx.Rngs):
    self.config = cfg
    self.encoder = Encoder(cfg, rngs)
    self.mlm_head = MLMHead(cfg, rngs)

  def __call__(self, ids_BxL, segment_ids_BxL, positions_BxK, *,
               token_types_BxL=None, deterministic=True, rngs=None):
    """Logits only at `positions_BxK`: the last layer and head are sparse.

    Args:
      ids_BxL: token ids.
      segment_ids_BxL: packed-document ids (1, 2, ...; 0 on padding).
        Positions restart and attention stays inside each segment.
      positions_BxK: where to predict.
      token_types_BxL: BERT's sentence A/B ids; None: all 0.
      deterministic: no dropout if True.
      rngs: with a `dropout` stream when not deterministic.

    Returns:
      float32 logits_BxKxV (V: the padded vocabulary).
    """
    # The final layer runs only at the K positions (Encoder.__call__).
    h_BxKxD = self.encoder(ids_BxL, segment_ids_BxL, token_types_BxL,
                           deterministic=deterministic, rngs=rngs,
                           outputs_at_BxK=positions_BxK)
    return self.mlm_head(h_BxKxD, self.encoder.embeddings.word.embedding[...])


def create(cfg: model_config.ModelConfig, seed_key: jax.Array) -> BertForMLM:
  """Builds the model; under jax.eval_shape this allocates nothing."""
  attention.log_choice(cfg)
  with nnx.use_eager_sharding(False):
    return BertForMLM(cfg, nnx.Rngs(params=seed_key))
