"""Evaluation of a fine-tuned model: the numbers that show whether the context extension worked.

- `scoring`: the one token-level scorer (summed NLL, correct argmax predictions, counted tokens) over `labels`
  (HF convention: aligned to `input_ids`, -100 = not scored, the model's logits are shifted here).
- `per_source`: eval loss, perplexity and token accuracy per data source over the supervised tokens of the
  tokenized validation split (deterministic: every row, a fixed order).
- `context`: perplexity vs context length on held-out long documents, with every length scoring exactly the same
  target tokens (windows end at the same positions), for the unscaled base, the scaled-but-untrained base and the
  fine-tuned model.
- `passkey`: passkey retrieval (Mohtashami & Jaggi 2023; Chen et al. 2023): a number hidden at a depth of filler
  text; exact match of the greedily generated digits and the per-digit log-probability of the key.
- `plots`: PNG figures (matplotlib, Agg backend).
"""
