"""Fill-mask: the top-k candidates, with probabilities, for each [MASK].

  python -m mlm_jax.fill_mask --workdir=W "The [MASK] sat on the mat."
  python -m mlm_jax.fill_mask --workdir=W --top_k=3 --json "a [MASK] b" ...

W is a training run (its newest checkpoint) or a `convert from_hf` output;
either tokenizer kind works. Text is split at each [MASK] and the pieces
between are tokenized on their own, the mask taking the space before it (a
masked word's first piece carries its space), as Hugging Face's fill-mask
pipeline does; each text is one segment between [CLS] and [SEP].
"""
import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mlm_jax import run_dir

MASK_TEXT = '[MASK]'


def encode(tok, text: str) -> list[int]:
  """[CLS] pieces with the mask id at each [MASK] [SEP]."""
  mask_text = tok.id_to_piece(tok.mask_id)
  chunks = text.split(mask_text)
  ids = [tok.cls_id]
  for i, chunk in enumerate(chunks):
    if i < len(chunks) - 1:
      chunk = chunk.rstrip()
    if chunk.strip():
      ids += tok.encode(chunk)
    if i < len(chunks) - 1:
      ids.append(tok.mask_id)
  return ids + [tok.sep_id]


def predict(bert, tok, texts: list[str], top_k: int = 5) -> list[list[list]]:
  """For each text, for each mask: [{id, token, score}] best first."""
  rows = [encode(tok, t) for t in texts]
  for text, row in zip(texts, rows):
    if tok.mask_id not in row:
      raise ValueError(f'No {MASK_TEXT} in {text!r}.')
  length = max(map(len, rows))
  ids = np.full((len(rows), length), tok.pad_id, np.int32)
  segments = np.zeros_like(ids)
  masks = [[j for j, i in enumerate(row) if i == tok.mask_id] for row in rows]
  positions = np.zeros((len(rows), max(map(len, masks))), np.int32)
  for r, row in enumerate(rows):
    ids[r, :len(row)] = row
    segments[r, :len(row)] = 1
    positions[r, :len(masks[r])] = masks[r]
  logits_BxKxV = bert(jnp.asarray(ids), jnp.asarray(segments),
                      jnp.asarray(positions), deterministic=True)
  probs_BxKxV = np.asarray(jax.nn.softmax(
      logits_BxKxV[..., :tok.vocab_size], axis=-1))
  out = []
  for r in range(len(rows)):
    per_mask = []
    for k in range(len(masks[r])):
      best = np.argsort(-probs_BxKxV[r, k], kind='stable')[:top_k]
      per_mask.append([{'id': int(i), 'token': tok.id_to_piece(i),
                        'score': float(probs_BxKxV[r, k, i])} for i in best])
    out.append(per_mask)
  return out


def format_text(texts, results) -> str:
  lines = []
  for text, per_mask in zip(texts, results):
    lines.append(text)
    for k, candidates in enumerate(per_mask):
      best = ', '.join(f"{c['token']} {c['score']:.4f}" for c in candidates)
      lines.append(f'  {MASK_TEXT} {k + 1}: {best}')
  return '\n'.join(lines)


def main(argv):
  args = flags.FLAGS
  texts = argv[1:]
  if not texts:
    raise app.UsageError('Give one or more texts with [MASK] in them.')
  _, _, tok, bert, _ = run_dir.load(args.workdir)
  results = predict(bert, tok, texts, args.top_k)
  if args.json:
    print(json.dumps([{'text': t, 'masks': r}
                      for t, r in zip(texts, results)], indent=2))
  else:
    print(format_text(texts, results))


if __name__ == '__main__':
  # Defined only when run as a tool, so importing the module adds no flags.
  flags.DEFINE_string('workdir', None, 'A training run or an import.',
                      required=True)
  flags.DEFINE_integer('top_k', 5, 'Candidates per mask.')
  flags.DEFINE_bool('json', False, 'Print JSON: [{text, masks: '
                    '[[{id, token, score}]]}].')
  app.run(main)
