"""Builds the tokenizer and packed dataset of a config, without training.

  python -m mlm_jax.data --config=configs/bert_base.py \
      --config.data.source='/data/c4/en/c4-train.*.json.gz' --config.data.workers=0

On a Beam cluster (the files and data_dir readable by every worker):

  python -m mlm_jax.data --config=configs/bert_base.py \
      --config.data.source='/mnt/corpus/*.parquet' --config.data.tokenizer=sp.model \
      --config.data.data_dir=/mnt/mlm_jax_data --config.data.beam_runner=FlinkRunner \
      --config.data.beam_options='--flink_master=host:8081 --environment_type=LOOPBACK'

A later training run with the same data settings reuses the build.
"""

from absl import app
from ml_collections import config_flags

from mlm_jax import data

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config (its data.* and seq_len matter here).',
    lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  prepared = data.prepare(config.data, config.seq_len)
  print(f"Built {prepared.info['data_dir']}: {prepared.info}")


if __name__ == '__main__':
  app.run(main)
