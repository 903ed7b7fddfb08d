"""Small Hugging Face BERT directories built offline, for interop tests.

The vocabulary mimics bert-base-uncased's layout: [PAD]=0, [unused*] up to
99, then [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103, so code that assumed our
SentencePiece ids (PAD0 UNK1 CLS2 SEP3 MASK4) fails here.
"""
import os
import string

TEXT = (
    'the cat sat on the mat . the dog sat on the log . a cat and a dog ran '
    'to the park , and the cat saw a bird in the tree . the bird sang a song '
    'for the cat . the dog ate the food on the mat and slept in the sun . '
    'a small bird sat in the tall tree , the cat watched the bird from the '
    'mat . the dog and the cat are friends , they play in the park .')
UNUSED = 99


def vocab() -> list[str]:
  words = sorted(set(TEXT.split()))
  chars = list(string.ascii_lowercase) + list('.,!?\'"-')
  pieces = (['[PAD]'] + [f'[unused{i}]' for i in range(UNUSED)] +
            ['[UNK]', '[CLS]', '[SEP]', '[MASK]'] + chars +
            ['##' + c for c in string.ascii_lowercase] + words +
            ['##ing', '##ed'])
  return list(dict.fromkeys(pieces))  # without repeats, in order


def tokenizer(directory: str):
  """Writes a BertTokenizerFast (vocab.txt, tokenizer.json, ...) there."""
  import transformers  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, 'vocab.txt')
  with open(path, 'w') as f:
    f.write('\n'.join(vocab()) + '\n')
  tok = transformers.BertTokenizerFast(vocab_file=path)
  tok.save_pretrained(directory)
  return tok


def bert_dir(directory: str, *, head: bool = True, safetensors: bool = True,
             hidden: int = 32, layers: int = 2, seed: int = 0) -> str:
  """A BertForMaskedLM (or BertModel without head) with random weights."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  tok = tokenizer(directory)
  torch.manual_seed(seed)
  config = transformers.BertConfig(
      vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
      num_attention_heads=4, intermediate_size=2 * hidden,
      max_position_embeddings=64, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0)
  cls = transformers.BertForMaskedLM if head else transformers.BertModel
  model = cls(config)
  with torch.no_grad():  # non-zero biases and LayerNorm shifts too
    for name, p in model.named_parameters():
      p.normal_(mean=1.0 if name.endswith('LayerNorm.weight') else 0.0,
                std=0.1)
  model.save_pretrained(directory, safe_serialization=safetensors)
  return directory
