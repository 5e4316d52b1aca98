"""Perplexity vs context length on held-out long documents, every length scoring the same target tokens.

Method (sliding-window perplexity as in the position-interpolation paper, Chen et al. 2023, arXiv:2306.15595,
made strictly comparable across lengths): each held-out document is encoded once as plain text (`d`, the ids of
`ChatEncoder.encode_text` after its BOS, EOS kept). A *target block* is `tail` consecutive tokens `d[end - tail:end]`.
For a context length `L`, the model reads `L` positions: BOS (`ChatEncoder.add_bos`, the one BOS function of
training) followed by the `L - 1` tokens before `end - 1`, i.e. `input_ids = [BOS] + d[end - L:end - 1]`, and the
logit at input position `i` predicts `d[end - L + i]`; only the last `tail` predictions (the block) are scored.

Window ends are the same for every length, so all lengths score exactly the same targets and a longer context
only adds tokens *before* them: a model that uses its context can only do better. The longest length `L_max` fixes
where blocks may end (`end >= L_max`); blocks are non-overlapping (`end = L_max + j·tail`), taken round-robin over
the documents (block 0 of every document, then block 1, …) until the budget `tokens_per_length / tail` blocks is
met, so the sample spreads over documents. Documents shorter than `L_max` tokens are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca8k.errors import ConfigError, DataError
from orca8k.evaluation.scoring import TokenStats, score_logits

if TYPE_CHECKING:
    from orca8k.data.chat_format import ChatEncoder


@dataclass(frozen=True)
class Document:
    """A held-out text document: `ids` are its plain-text token ids (no BOS; the closing EOS kept); `head` is the
    start of its text (for the base-tokenizer check)."""

    id: str
    source: str
    ids: list[int]
    head: str = ""


@dataclass(frozen=True)
class TargetBlock:
    """Scored targets `documents[doc].ids[end - tail:end]`."""

    doc: int
    end: int


def context_lengths(native_context: int, factors: Sequence[float]) -> list[int]:
    """Context lengths in tokens: `round(native_context × factor)`, in the order of `factors`.

    Raises:
        ConfigError: a length is below 1 or two factors give the same length (names `evaluate.context_factors`).
    """
    lengths = [int(round(native_context * f)) for f in factors]
    if any(n < 1 for n in lengths):
        raise ConfigError(f"evaluate.context_factors {list(factors)}: a length below 1 token at native {native_context}")
    if len(set(lengths)) != len(lengths):
        raise ConfigError(f"evaluate.context_factors {list(factors)}: duplicate lengths {lengths}")
    return lengths


def load_documents(mix_val: Path, encoder: ChatEncoder) -> list[Document]:
    """The text rows (`kind == "text"`) of the validation mix, sorted by `id`, encoded with `encode_text`.

    Args:
        mix_val: `layout.mix_val` (parquet with `id`, `source`, `kind`, `text`).
        encoder: the fine-tuning tokenizer's `ChatEncoder`.

    Raises:
        DataError: a column is missing, or a text row has an empty `text` (names the file, row id and field).
    """
    import pandas as pd

    frame = pd.read_parquet(mix_val)
    for column in ("id", "source", "kind", "text"):
        if column not in frame.columns:
            raise DataError(f"{mix_val}: column {column!r} is missing")
    frame = frame[frame["kind"] == "text"].sort_values("id", kind="stable")
    docs = []
    for row in frame.itertuples(index=False):
        if not isinstance(row.text, str) or not row.text:
            raise DataError(f"{mix_val}: row id={row.id!r}: field 'text' is empty")
        ids = encoder.encode_text(row.text).input_ids[1:]  # drop BOS: each window adds its own
        docs.append(Document(str(row.id), str(row.source), ids, row.text[:4000]))
    return docs


def plan_targets(doc_lengths: Sequence[int], max_context: int, tail: int, budget_tokens: int) -> list[TargetBlock]:
    """Choose the scored target blocks: same for every length, round-robin over documents.

    Args:
        doc_lengths: tokens per document (`len(Document.ids)`).
        max_context: the longest context length evaluated (`L_max`): blocks end at `end >= L_max`.
        tail: scored tokens per window (`evaluate.scored_tail_tokens`).
        budget_tokens: scored tokens per length (`evaluate.tokens_per_length`); `budget_tokens // tail` blocks.

    Returns:
        Blocks in scoring order; fewer than the budget when the documents are too few or too short.

    Raises:
        ConfigError: `tail > max_context` or `budget_tokens < tail`.
    """
    if tail > max_context:
        raise ConfigError(f"evaluate.scored_tail_tokens={tail} exceeds the longest context {max_context}")
    if budget_tokens < tail:
        raise ConfigError(f"evaluate.tokens_per_length={budget_tokens} is below scored_tail_tokens={tail}")
    wanted = budget_tokens // tail
    ends = [list(range(max_context, n + 1, tail)) for n in doc_lengths]
    blocks: list[TargetBlock] = []
    j = 0
    while len(blocks) < wanted and any(len(e) > j for e in ends):
        for doc, doc_ends in enumerate(ends):
            if len(doc_ends) > j and len(blocks) < wanted:
                blocks.append(TargetBlock(doc, doc_ends[j]))
        j += 1
    return blocks


def window(doc_ids: Sequence[int], end: int, context_length: int, tail: int, encoder: ChatEncoder) -> tuple[list[int], list[int]]:
    """The model input of one window and its scored targets.

    Returns:
        `(input_ids [context_length], targets [tail])`: `input_ids = add_bos(d[end - L:end - 1])`, and the last
        `tail` input positions predict `targets = d[end - tail:end]`.

    Raises:
        ValueError: the window does not fit in the document (`end < context_length` or `end > len(d)`), or
            `tail > context_length`.
    """
    if end < context_length or end > len(doc_ids) or tail > context_length:
        raise ValueError(f"window end={end} L={context_length} tail={tail} does not fit a {len(doc_ids)}-token document")
    input_ids = encoder.add_bos(list(doc_ids[end - context_length : end - 1]))
    return input_ids, list(doc_ids[end - tail : end])


def perplexity_by_length(
    model: Any,
    documents: Sequence[Document],
    blocks: Sequence[TargetBlock],
    lengths: Sequence[int],
    tail: int,
    encoder: ChatEncoder,
    batch_size: int,
) -> dict[int, TokenStats]:
    """Score the same target blocks at every context length.

    Args:
        model: a causal LM in eval mode (its RoPE settings decide how positions beyond native are handled).
        documents: the held-out documents (`load_documents`).
        blocks: the target blocks (`plan_targets`, planned for `max(lengths)`).
        lengths: context lengths in tokens.
        tail: scored tokens per window.
        encoder: gives the BOS (`add_bos`).
        batch_size: windows per forward pass (all windows of a length have the same size: no padding).

    Returns:
        `{length: TokenStats}` over `len(blocks) × tail` targets each.

    Raises:
        DataError: a token id is outside the model's vocabulary (e.g. a base model scored with ids of a larger
            tokenizer).
    """
    import torch

    vocab = int(model.get_input_embeddings().weight.shape[0])
    top = max((max(documents[b.doc].ids) for b in blocks), default=0)
    if top >= vocab:
        raise DataError(f"token id {top} is outside the model's vocabulary of {vocab} rows")
    device = next(model.parameters()).device
    results: dict[int, TokenStats] = {}
    for length in lengths:
        stats = TokenStats()
        for start in range(0, len(blocks), batch_size):
            pairs = [window(documents[b.doc].ids, b.end, length, tail, encoder) for b in blocks[start : start + batch_size]]
            input_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=device)  # [batch, length]
            targets = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=device)  # [batch, tail]
            with torch.inference_mode():
                logits = model(input_ids=input_ids, logits_to_keep=tail, use_cache=False).logits  # [batch, tail, vocab]
                nll_sum, correct, tokens = score_logits(logits, targets)
            stats += TokenStats(float(nll_sum.sum()), int(correct.sum()), int(tokens.sum()))
        results[length] = stats
    return results
