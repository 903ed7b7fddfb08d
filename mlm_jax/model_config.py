"""The encoder's static description (ModelConfig) and its checks.

On the ground floor: the model, attention, sharding, build and the HF
converter all read a ModelConfig, and none of them has to import the model to
make or check one. `from_config` turns a run config's `model` section (a
size preset plus overrides) into one; every check runs when it is made, so a
bad knob fails before anything is built or compiled.
"""
import dataclasses

import jax

# name -> (num_layers, hidden_dim, num_heads, mlp_dim): Google's BERT sizes.
PRESETS = {
    'tiny': (2, 128, 2, 512),
    'mini': (4, 256, 4, 1024),
    'small': (4, 512, 8, 2048),
    'medium': (8, 512, 8, 2048),
    'base': (12, 768, 12, 3072),
    'large': (24, 1024, 16, 4096),
}
ACTIVATIONS = ('gelu', 'gelu_tanh', 'geglu')
# Rematerialisation policies (model.REMAT_POLICIES maps them to jax's).
REMAT_NAMES = ('full', 'dots', 'dots_no_batch')
# Attention kernels (attention.py runs them).
ATTENTION_KERNELS = ('xla', 'cudnn')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The encoder's static description; validated when made."""
  vocab_size: int               # the tokenizer's vocabulary (unpadded)
  num_layers: int = 2
  hidden_dim: int = 128
  num_heads: int = 2
  mlp_dim: int = 512
  max_len: int = 512
  type_vocab_size: int = 2      # 0: no token-type embeddings
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  pre_ln: bool = False
  position: str = 'learned'     # 'learned' (BERT) or 'rope' (rotary, in attention)
  rope_base: float = 10_000.0
  activation: str = 'gelu'      # 'gelu' (erf), 'gelu_tanh' or 'geglu'
  use_bias: bool = True         # biases of dense layers and LayerNorms
  local_window: int = 0         # sliding-window width; 0: every layer global
  global_every: int = 1         # with local_window: layer i global iff i % this == 0
  attention: str = 'xla'        # kernel: 'xla' or 'cudnn'
  remat: str = 'none'           # 'none' or one of REMAT_NAMES
  scan_layers: bool = False     # one stacked block, applied with lax.scan
  vocab_multiple: int = 1       # pad the vocabulary rows to a multiple of this
  dtype: str = 'float32'        # compute dtype
  param_dtype: str = 'float32'  # storage dtype

  def __post_init__(self):
    if self.position not in ('learned', 'rope'):
      raise ValueError(f"model.position={self.position!r} must be 'learned' "
                       "or 'rope'.")
    if self.hidden_dim % self.num_heads:
      raise ValueError(f'model hidden_dim={self.hidden_dim} is not divisible '
                       f'by num_heads={self.num_heads}.')
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'model.activation={self.activation!r}; choose one of '
                       f'{ACTIVATIONS}.')
    if self.remat != 'none' and self.remat not in REMAT_NAMES:
      raise ValueError(f"model.remat={self.remat!r}; choose 'none' or one of "
                       f'{sorted(REMAT_NAMES)}.')
    if self.local_window < 0 or self.global_every < 1:
      raise ValueError(f'model.local_window={self.local_window} must be >= 0 '
                       f'and model.global_every={self.global_every} >= 1.')
    if self.vocab_multiple < 1 or self.type_vocab_size < 0:
      raise ValueError(f'model.vocab_multiple={self.vocab_multiple} must be '
                       f'>= 1 and type_vocab_size={self.type_vocab_size} >= 0.')
    _check_attention_kernel(self)

  @property
  def padded_vocab_size(self) -> int:
    m = self.vocab_multiple
    return -(-self.vocab_size // m) * m


def _check_attention_kernel(cfg: ModelConfig) -> None:
  """Raises ValueError for a kernel choice that cannot run as configured."""
  if cfg.attention not in ATTENTION_KERNELS:
    raise ValueError(f'model.attention={cfg.attention!r}; choose one of '
                     f'{ATTENTION_KERNELS}.')
  if cfg.attention != 'cudnn':
    return
  problems = []
  if jax.default_backend() != 'gpu':
    problems.append(f'it needs a GPU (the backend is {jax.default_backend()})')
  if cfg.dtype not in ('bfloat16', 'float16'):
    problems.append(f'it needs 16-bit compute (model.dtype={cfg.dtype})')
  if cfg.attention_dropout_rate > 0:
    problems.append('it has no attention dropout (model.attention_dropout_rate'
                    f'={cfg.attention_dropout_rate}; set it to 0)')
  if problems:
    raise ValueError("model.attention='cudnn' cannot run here: " +
                     '; '.join(problems) + ". Use model.attention='xla'.")


_FROM_PRESET = ('num_layers', 'hidden_dim', 'num_heads', 'mlp_dim')


def from_config(config, vocab_size: int) -> ModelConfig:
  """The ModelConfig of a run config's `model` section.

  `model.size` picks a preset for the four sizes; a nonzero
  `model.num_layers` (hidden_dim, num_heads, mlp_dim) overrides it. Every
  other field of ModelConfig is read from the key of the same name.
  """
  c = config.model
  if c.size not in PRESETS:
    raise ValueError(f'Unknown model.size={c.size!r}; choose one of '
                     f'{sorted(PRESETS)}.')
  sizes = {name: c[name] or preset
           for name, preset in zip(_FROM_PRESET, PRESETS[c.size])}
  knobs = {f.name: c[f.name] for f in dataclasses.fields(ModelConfig)
           if f.name not in _FROM_PRESET and f.name != 'vocab_size'}
  return ModelConfig(vocab_size=vocab_size, **sizes, **knobs)
