"""Per-source eval loss, perplexity and token accuracy over the supervised tokens of the validation split.

Deterministic by construction: every row is scored (no sampling, no random windows), in a fixed order (source, then
length, then row index), and sums are kept in float64. `eval_loss` is the token-weighted mean NLL over all supervised
tokens of a source (HF Trainer averages per-batch means instead, which depends on the batch size); `perplexity` is
`exp(eval_loss)`; `token_accuracy` is the share of supervised tokens whose arg-max prediction is the label.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from orca8k.evaluation.scoring import TokenStats, score_batch

if TYPE_CHECKING:
    import torch

Collate = Callable[[list[dict[str, Any]]], dict[str, "torch.Tensor"]]


def evaluation_order(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Row indices in the fixed scoring order: by source, then longest first, then row index."""
    return sorted(range(len(rows)), key=lambda i: (rows[i]["source"], -len(rows[i]["input_ids"]), i))


def evaluate_per_source(
    model: Any, rows: Sequence[dict[str, Any]], collate: Collate, batch_size: int
) -> dict[str, TokenStats]:
    """Score every supervised token of every row, grouped by the row's `source`.

    Args:
        model: a causal LM in eval mode.
        rows: examples with `input_ids` and `labels` (`[seq_len]` lists, labels aligned to inputs, -100 = not
            supervised) and `source` (one example per row: the tokenized validation split).
        collate: turns a list of rows into a batch (`input_ids`, `labels`, `attention_mask`, `position_ids`
            `[batch, seq_len]`): the training collator, `orca8k.data.collate.CausalLMCollator`.
        batch_size: rows per forward pass (`evaluate.per_device_eval_batch_size`).

    Returns:
        `{source: TokenStats}` in sorted source order.

    Raises:
        ValueError: a row lacks `source`, `input_ids` or `labels`, or its labels and inputs differ in length
            (the message names the row index).
    """
    for i, r in enumerate(rows):
        for key in ("source", "input_ids", "labels"):
            if key not in r or r[key] is None:
                raise ValueError(f"row {i}: field {key!r} is missing")
        if len(r["labels"]) != len(r["input_ids"]):
            raise ValueError(f"row {i}: field 'labels' has {len(r['labels'])} ids, 'input_ids' {len(r['input_ids'])}")
    order = evaluation_order(rows)
    stats: dict[str, TokenStats] = {}
    start = 0
    while start < len(order):
        source = rows[order[start]]["source"]
        stop = start
        while stop < len(order) and stop - start < batch_size and rows[order[stop]]["source"] == source:
            stop += 1
        batch_rows = [{k: rows[i][k] for k in ("input_ids", "labels")} for i in order[start:stop]]
        nll_sum, correct, tokens = score_batch(model, collate(batch_rows))
        stats.setdefault(source, TokenStats()).__iadd__(
            TokenStats(float(nll_sum.sum()), int(correct.sum()), int(tokens.sum()))
        )
        start = stop
    return dict(sorted(stats.items()))


def per_source_metrics(stats: dict[str, TokenStats]) -> dict[str, dict[str, float | int]]:
    """The `eval` section of `layout.eval_metrics`: `{source: {eval_loss, perplexity, token_accuracy,
    supervised_tokens}}` (HF names; loss in nats per token)."""
    return {
        source: {
            "eval_loss": s.eval_loss,
            "perplexity": s.perplexity,
            "token_accuracy": s.token_accuracy,
            "supervised_tokens": s.tokens,
        }
        for source, s in stats.items()
    }
