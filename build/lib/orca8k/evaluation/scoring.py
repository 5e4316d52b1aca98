"""The token-level scorer shared by every evaluation: summed NLL, correct predictions and token counts.

Labels follow the HF convention: `labels` is aligned to `input_ids` and the logit at position `t` predicts the label
at `t + 1`; `IGNORE_INDEX` (-100) marks positions that are not scored. Sums are accumulated in float64 so that the
order of batches does not change the result beyond the model's own arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orca8k.data.chat_format import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


@dataclass
class TokenStats:
    """Accumulated scores over a set of target tokens.

    Attributes:
        nll_sum: summed negative log-likelihood of the targets (nats).
        correct: targets whose arg-max prediction equals the target.
        tokens: scored targets.
    """

    nll_sum: float = 0.0
    correct: int = 0
    tokens: int = 0

    def __iadd__(self, other: TokenStats) -> TokenStats:
        self.nll_sum += other.nll_sum
        self.correct += other.correct
        self.tokens += other.tokens
        return self

    @property
    def eval_loss(self) -> float:
        """Mean NLL per scored token (nats); NaN when nothing was scored."""
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        """`exp(eval_loss)`; inf when the loss overflows, NaN when nothing was scored."""
        loss = self.eval_loss
        if math.isnan(loss):
            return math.nan
        return math.exp(loss) if loss < 700 else math.inf

    @property
    def token_accuracy(self) -> float:
        """Share of targets predicted exactly by the arg-max (greedy) prediction."""
        return self.correct / self.tokens if self.tokens else math.nan


def score_logits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row NLL sums, correct counts and token counts of already-aligned logits and targets.

    Args:
        logits: `[batch, n, vocab]`, where `logits[:, i]` predicts `targets[:, i]` (already shifted).
        targets: `[batch, n]` token ids, `IGNORE_INDEX` where nothing is scored.

    Returns:
        `(nll_sum [batch] float64, correct [batch] int64, tokens [batch] int64)`.
    """
    import torch

    mask = targets != IGNORE_INDEX  # [batch, n]
    rows, cols = mask.nonzero(as_tuple=True)  # only scored positions go through the softmax (memory)
    selected = logits[rows, cols].float()  # [k, vocab]
    wanted = targets[rows, cols]  # [k]
    nll = -torch.log_softmax(selected, dim=-1).gather(-1, wanted.unsqueeze(-1)).squeeze(-1)  # [k]
    hit = selected.argmax(dim=-1) == wanted  # [k]
    batch = targets.shape[0]
    nll_sum = torch.zeros(batch, dtype=torch.float64, device=logits.device).index_add_(0, rows, nll.double())
    correct = torch.zeros(batch, dtype=torch.int64, device=logits.device).index_add_(0, rows, hit.long())
    return nll_sum, correct, mask.sum(dim=-1)


def score_batch(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score one batch of HF-style examples: the logit at `t` predicts `labels[t + 1]`.

    Args:
        model: a causal LM (`model(input_ids=..., attention_mask=..., position_ids=...)` returns `.logits`).
        batch: `input_ids [batch, seq_len]`, `labels [batch, seq_len]` (-100 = not scored), optional
            `attention_mask [batch, seq_len]` and `position_ids [batch, seq_len]`.

    Returns:
        Per-row `(nll_sum [batch] float64, correct [batch] int64, tokens [batch] int64)`.

    Raises:
        ValueError: `labels` and `input_ids` differ in shape.
    """
    import torch

    input_ids, labels = batch["input_ids"], batch["labels"]
    if input_ids.shape != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} and input_ids {tuple(input_ids.shape)} differ in shape")
    device = next(model.parameters()).device
    kwargs = {k: batch[k].to(device) for k in ("attention_mask", "position_ids") if k in batch}
    with torch.inference_mode():
        # use_cache=False: with a cache transformers skips the packed-sequence mask derived from position_ids
        logits = model(input_ids=input_ids.to(device), use_cache=False, **kwargs).logits  # [batch, seq_len, vocab]
        return tuple(t.cpu() for t in score_logits(logits[:, :-1], labels[:, 1:].to(device)))  # type: ignore[return-value]
