from setuptools import find_packages, setup

setup(
    name='mlm_jax',
    version='0.1.0',
    description='BERT-style masked language model pretraining in JAX/Flax.',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    # 3.11: a data worker that dies mid-task hangs 3.10's process pool when
    # tasks are larger than a pipe's buffer (CPython gh-94777); 3.10 is past
    # its end of life (October 2026).
    python_requires='>=3.11',
    packages=find_packages(include=['mlm_jax', 'mlm_jax.*', 'configs']),
    install_requires=[
        'absl-py',
        'array_record',
        'etils[epath]',  # paths in buckets (gs://), as TFDS reads them
        'flax>=0.12',
        'gensim>=4.3',  # ships the Wikipedia excerpt used as the demo corpus
        'grain>=0.2.12',
        'importlib_resources',  # tensorflow-datasets needs it without TF
        'jax>=0.6',
        'matplotlib',  # mlm_jax.plot: training curves to PNG
        'ml-collections',
        'mwparserfromhell>=0.6',
        'numpy',
        'optax>=0.2.4',
        'orbax-checkpoint>=0.11',
        'pyarrow',  # .parquet and datasets .arrow sources (tfds needs it too)
        'safetensors',  # Hugging Face weights in and out (mlm_jax.convert)
        'sentencepiece',
        'tensorboardX',
        'tensorflow-datasets>=4.9.7',
        'tokenizers',  # Hugging Face tokenizer.json files (imported checkpoints)
        'zstandard',  # .jsonl.zst and .zst text sources
    ],
    extras_require={
        # bench: HF's data collator (masking) and HF's FlaxBertForMaskedLM and
        # BertForMaskedLM (train step); 4.57 is the last release with both.
        # psutil: bench data sums the RSS of a build and its workers.
        'bench': ['transformers==4.57.*', 'torch==2.13.0', 'psutil'],
        # beam: dataset builds on a Beam runner (data.beam_runner).
        'beam': ['apache-beam>=2.60'],
        # gcs: gs:// sources (etils.epath reads them with gcsfs when
        # TensorFlow is not installed).
        'gcs': ['gcsfs'],
        # convert: importing a vocab.txt-only model, exporting a SentencePiece
        # vocabulary as an HF fast tokenizer; torch reads pytorch_model.bin.
        'hf': ['transformers==4.57.*', 'torch==2.13.0'],
        # torch: the HF parity tests run transformers' PyTorch BERT on CPU.
        # nbclient + ipykernel: CI executes launch/colab_tpu.ipynb on CPU.
        # psutil: bench data's test. pytest-xdist: the suite on 2 processes
        # (pytest.ini). Not apache-beam: it needs protobuf < 7,
        # which breaks sentencepiece 0.2.3's model proto (used by the HF
        # tokenizer tests); tests/data/test_beam.py makes its own environment.
        # fsspec: test_files serves gs:// from a local directory through it.
        # pytest-timeout: a test that hangs fails with its stack (pytest.ini)
        # instead of stalling CI until its limit.
        'test': ['pytest', 'pytest-xdist', 'pytest-timeout', 'hypothesis', 'scipy', 'torch==2.13.0',
                 'fsspec',
                 'transformers==4.57.*', 'nbclient', 'nbformat', 'ipykernel',
                 'psutil'],
    },
)
