"""Every config key, declared once with its default. Other configs override.

Run: python -m mlm_jax.main --config=configs/base.py --workdir=/tmp/run
"""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0                      # root of every random key (init, masks, dropout, data order)
  c.num_steps = 10_000            # optimizer updates in the whole run
  c.steps_per_run = 0             # stop (checkpointed) after this many steps; 0 = run to num_steps
  c.batch_size = 256              # global batch (rows), split over devices and hosts
  c.seq_len = 128                 # tokens per packed row

  c.learning_rate = 1e-3          # peak learning rate
  c.warmup_steps = 1_000          # linear warmup steps from 0, then linear decay to 0; 0 = none (step 1 at the peak)
  c.weight_decay = 0.01           # AdamW decay (not on LayerNorm or biases)
  c.adam_b1 = 0.9                 # AdamW beta1
  c.adam_b2 = 0.98                # AdamW beta2
  c.adam_eps = 1e-6               # AdamW epsilon
  c.grad_clip_norm = 1.0          # global gradient-norm clip; 0 = no clipping (as HF Trainer's max_grad_norm=0)

  c.log_every = 100               # steps between train metric reports
  c.eval_every = 1_000            # steps between evals (and at the end)
  c.eval_batches = 0              # eval batches per eval; 0 = the whole held-out split
  c.checkpoint_every = 1_000      # steps between checkpoints (and at the end)
  c.keep_checkpoints = 3          # newest checkpoints kept on disk
  c.async_checkpointing = True    # write checkpoints in the background
  c.init_from = ''                # params-only checkpoint to start from when the workdir has none ('' = random init)
  c.allow_fresh_start = False     # start at step 0 when every checkpoint of the workdir was set aside as damaged (checkpoints.corrupt/)
  c.nonfinite = 'stop'            # non-finite loss/gradient: 'stop' the run, or 'skip' the update (counted)
  c.keep_freed_host_memory = True  # CPU-only runs: glibc keeps freed memory, so XLA:CPU does not page-fault its buffers every step (host_memory.py)
  c.peak_tflops_per_device = 0.0  # for MFU; 0 = look up by device kind (none on CPU)

  c.model = ml_collections.ConfigDict()
  c.model.size = 'base'           # preset: tiny, mini, small, medium, base, large
  c.model.num_layers = 0          # 0 = from the size preset
  c.model.hidden_dim = 0          # 0 = from the size preset
  c.model.num_heads = 0           # 0 = from the size preset
  c.model.mlp_dim = 0             # 0 = from the size preset
  c.model.max_len = 512           # learned position embeddings (>= seq_len)
  c.model.type_vocab_size = 2     # token-type embeddings (BERT's segment A/B)
  c.model.dropout_rate = 0.1      # hidden dropout
  c.model.attention_dropout_rate = 0.1  # dropout on attention probabilities
  c.model.layer_norm_eps = 1e-12  # LayerNorm epsilon (BERT's value)
  c.model.initializer_range = 0.02  # std of the normal initializer
  c.model.pre_ln = False          # False: BERT's post-LN; True: pre-LN + final LN
  c.model.position = 'learned'    # 'learned' absolute (BERT) or 'rope' (rotary)
  c.model.rope_base = 10_000.0    # RoPE frequency base
  c.model.activation = 'gelu'     # MLP: 'gelu' (erf, BERT), 'gelu_tanh', or 'geglu'
  c.model.use_bias = True         # biases in dense layers and LayerNorms (the decoder bias stays)
  c.model.local_window = 0        # sliding-window attention width; 0 = every layer global
  c.model.global_every = 1        # with local_window: layer i is global iff i % global_every == 0
  c.model.attention = 'xla'       # attention kernel: 'xla' or 'cudnn' (GPU, 16-bit, no attn dropout)
  c.model.remat = 'none'          # per-block rematerialisation: none, full, dots, dots_no_batch
  c.model.scan_layers = False     # stack the blocks and apply them with lax.scan
  c.model.vocab_multiple = 1      # pad the vocabulary to a multiple of this (128 on TPU/GPU)
  c.model.dtype = 'float32'       # compute dtype (bfloat16 on TPU/GPU)
  c.model.param_dtype = 'float32' # parameter storage dtype

  c.mask = ml_collections.ConfigDict()
  c.mask.strategy = 'token'       # token (BERT), whole_word, or span (SpanBERT)
  c.mask.rate = 0.15              # fraction of maskable tokens predicted per row (training)
  c.mask.schedule = 'constant'    # mask-rate schedule: constant, linear or cosine from rate to final_rate
  c.mask.final_rate = 0.15        # rate at the last step (linear/cosine schedules)
  c.mask.eval_rate = 0.15         # rate at eval, whatever the training rate
  c.mask.mask_prob = 0.8          # of those: replaced by [MASK]
  c.mask.random_prob = 0.1        # of those: replaced by a random non-special token
  c.mask.max_predictions = 0      # static predictions per row; 0 = floor(max train rate * seq_len + 0.5)
  c.mask.span_p = 0.2             # span strategy: geometric p of span lengths (in words)
  c.mask.span_max_words = 10      # span strategy: longest span (the law is truncated there)

  c.data = ml_collections.ConfigDict()
  c.data.source = 'demo'          # 'demo', or comma-separated files/globs: pages-articles*.xml.bz2 dumps, text, .jsonl[.gz|.zst], .parquet, datasets dirs
  c.data.data_dir = ''            # tokenizer + dataset cache; '' = $MLM_JAX_DATA_DIR or ~/.cache/mlm_jax
  c.data.tokenizer = ''           # an existing SentencePiece .model; '' = train one from the source
  c.data.vocab_size = 8192        # vocabulary size when training a tokenizer
  c.data.eval_fraction = 0.05     # fraction of documents held out for eval
  c.data.text_field = 'text'      # the text field of .jsonl records, the text column of .parquet / datasets .arrow files
  c.data.workers = 0              # processes cleaning, tokenizing and writing the dataset; 0 = all cores, 1 = in-process
  c.data.beam_runner = ''         # '' = build on this host; else an Apache Beam runner: DirectRunner, DataflowRunner, FlinkRunner, SparkRunner
  c.data.beam_options = ''        # that runner's pipeline flags, e.g. '--project=P --region=R --temp_location=gs://B/tmp'

  c.parallelism = 'pjit'          # 'pjit': jit over the mesh with shardings; 'pmap': data parallel, replicated state
  c.grad_accum_steps = 1          # micro-batches per update (each batch_size / this rows; one's activations alive)
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                # data-parallel devices (batch split, state replicated); one axis may be -1 = the rest
  c.mesh.fsdp = 1                 # fully sharded data-parallel devices (batch split, params + optimizer state sharded)
  c.mesh.tensor = 1               # tensor-parallel devices (attention heads and MLP split)
  c.mesh.dcn_data = 1             # slices (data-parallel across DCN); the sizes above are per slice
  return c
