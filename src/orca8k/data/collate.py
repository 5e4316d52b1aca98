"""The training/evaluation collator and a loss that stays finite on batches without supervised tokens.

`CausalLMCollator` batches what `orca8k tokenize` writes, in either form:

- **examples** (`packing: false`, and every val set): rows with `input_ids`, `labels`. The batch is padded to its
  longest row (optionally to a multiple) on `padding_side` (right for training; left for batched generation-style
  scoring) and gets an `attention_mask` built from the row lengths — never by comparing ids with the pad id, since
  pad = eos = `</s>` is also a real, supervised token.
- **packed rows** (`packing: true`): rows with `input_ids`, `labels`, `position_ids` (restarting at 0 at each example).
  Rows are right-padded to the longest; the padding is one more pseudo-example (its `position_ids` restart at 0,
  labels -100) and the batch carries **no** `attention_mask`: transformers then derives a block-diagonal causal mask
  from the `position_ids` restarts (sdpa, eager, flash-attention-2), so no token attends across examples.
  Call the model with `use_cache=False` (the Trainer sets `config.use_cache = args.use_cache`, False by default):
  with a cache, transformers 5.24 skips the packed-sequence detection and attention would cross examples.

Output (all `torch.long`, `[batch, seq_len]`): `input_ids`, `labels` (-100 where no loss), `position_ids`, and
`attention_mask` for examples only. With `sources` set and rows that name theirs (an example's `source`, a packed
row's `sources`, one per example), also `supervised_tokens_by_source` (`[len(sources)]`: the batch's supervised
tokens per source, for the training curves; pop it before the forward). Count supervised tokens as `(labels != -100).sum()` (position 0 of every
example is -100, so this equals the number of shifted targets HF's loss uses, and `num_items_in_batch` in the
Trainer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from orca8k.data.chat_format import IGNORE_INDEX

SOURCE_TOKENS_KEY = "supervised_tokens_by_source"

if TYPE_CHECKING:
    import torch


@dataclass
class CausalLMCollator:
    """Collate tokenized examples or packed rows into model inputs (see the module docstring for the contract).

    Args:
        pad_token_id: id written into padding (`tokenizer.pad_token_id`; = eos for the OA tokenizer).
        padding_side: "right" (training) or "left"; packed rows are always right-padded.
        pad_to_multiple_of: round `seq_len` up to a multiple of this (tensor-core friendly); None: the longest row.
        max_length: if set, a row longer than this raises (a guard against an upstream bug; rows are never cut here).
        sources: if set, count each batch's supervised tokens per source into `supervised_tokens_by_source` (in this
            order) from the rows' `source` (examples) or `sources` (packed rows: one name per example, in order).

    Raises (on call):
        ValueError: an empty batch, rows mixing packed and unpacked form, `input_ids`/`labels`/`position_ids` of
            different lengths in a row, or a row longer than `max_length`.
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None
    max_length: int | None = None
    sources: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={self.padding_side!r}: use 'right' or 'left'")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        if not features:
            raise ValueError("collate: empty batch")
        packed = ["position_ids" in f and f["position_ids"] is not None for f in features]
        if any(packed) and not all(packed):
            raise ValueError("collate: a batch mixes packed rows (with position_ids) and plain examples")
        rows = [(list(f["input_ids"]), list(f["labels"]), list(f["position_ids"]) if packed[0] else None)
                for f in features]
        for i, (ids, labels, pos) in enumerate(rows):
            if len(ids) != len(labels) or (pos is not None and len(pos) != len(ids)):
                raise ValueError(f"collate: row {i}: input_ids, labels and position_ids differ in length")
            if self.max_length is not None and len(ids) > self.max_length:
                raise ValueError(f"collate: row {i} has {len(ids)} tokens > max_length={self.max_length}")
        by_source = self._by_source(features, rows) if self.sources is not None else None
        seq_len = max(len(r[0]) for r in rows)
        if self.pad_to_multiple_of:
            seq_len = -(-seq_len // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(rows)
        input_ids = torch.full((batch, seq_len), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((batch, seq_len), dtype=torch.long)
        if packed[0]:
            for i, (ids, lab, pos) in enumerate(rows):
                n = len(ids)
                input_ids[i, :n] = torch.tensor(ids, dtype=torch.long)
                labels[i, :n] = torch.tensor(lab, dtype=torch.long)
                position_ids[i, :n] = torch.tensor(pos, dtype=torch.long)
                position_ids[i, n:] = torch.arange(seq_len - n)  # the padding: one more pseudo-example
            out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
            return out if by_source is None else {**out, SOURCE_TOKENS_KEY: by_source}
        attention_mask = torch.zeros((batch, seq_len), dtype=torch.long)
        for i, (ids, lab, _) in enumerate(rows):
            n = len(ids)
            span = slice(0, n) if self.padding_side == "right" else slice(seq_len - n, seq_len)
            input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
            labels[i, span] = torch.tensor(lab, dtype=torch.long)
            attention_mask[i, span] = 1
            position_ids[i, span] = torch.arange(n)
        out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}
        return out if by_source is None else {**out, SOURCE_TOKENS_KEY: by_source}

    def _by_source(self, features: Sequence[dict[str, Any]], rows: list) -> torch.Tensor | None:
        """Supervised tokens per source of the batch (`[len(sources)]`), or None when the rows name no source."""
        import torch

        index = {name: i for i, name in enumerate(self.sources or ())}
        counts = np.zeros(len(index), dtype=np.int64)
        for i, (f, (_, labels, pos)) in enumerate(zip(features, rows, strict=True)):
            supervised = (np.asarray(labels) != IGNORE_INDEX).astype(np.int64)
            if pos is None:
                if f.get("source") is None:
                    return None
                names, per_example = [f["source"]], [int(supervised.sum())]
            else:
                if f.get("sources") is None:
                    return None
                starts = np.flatnonzero(np.asarray(pos) == 0)
                if starts.size == 0 or starts[0] != 0:
                    raise ValueError(f"collate: row {i}: position_ids do not start at 0")
                names, per_example = list(f["sources"]), np.add.reduceat(supervised, starts).tolist()
                if len(names) != len(per_example):
                    raise ValueError(f"collate: row {i}: {len(names)} sources for {len(per_example)} packed examples")
            for name, n in zip(names, per_example, strict=True):
                if name not in index:
                    raise ValueError(f"collate: row {i}: source {name!r} not in {sorted(index)}")
                counts[index[name]] += n
        return torch.from_numpy(counts)


def causal_lm_loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
                   ) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised targets; 0 (not NaN) when there is none.

    Usable as `transformers.Trainer(compute_loss_func=causal_lm_loss)`: with gradient accumulation the Trainer passes
    `num_items_in_batch` = the supervised targets of the whole accumulation window (all ranks when
    `average_tokens_across_devices`), so every target weighs the same whatever micro-batch it sits in (the seed
    averaged per micro-batch instead). Without it, the mean is over this batch's targets.

    Args:
        outputs: model output with `.logits` `[batch, seq_len, vocab]` (or the logits tensor itself).
        labels: `[batch, seq_len]`, aligned to the inputs (shifted here), -100 = no loss.
        num_items_in_batch: divisor; None = the supervised targets in `labels`.

    Returns:
        Scalar loss (float32): sum of target log-losses / max(num_items, 1).
    """
    import torch
    import torch.nn.functional as F

    logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
    # The labels move, not the logits: position t's target is labels[t + 1], the last position's none. Slicing
    # `logits[:, :-1]` instead would copy the whole [batch, seq_len, vocab] tensor forward and again, zero-filled, in
    # the backward (≈ 3 % of a training step on the demo model on CPU; `benchmarks/bench_train.py`).
    targets = F.pad(labels.to(logits.device), (0, 1), value=IGNORE_INDEX)[:, 1:]  # [batch, seq_len]
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(count, torch.Tensor):
        return total / count.to(total.device).clamp(min=1)
    return total / max(int(count), 1)


_COMPILED_LOSS: dict[tuple[str, str | None], Any] = {}


def training_loss(torch_compile: bool, backend: str = "inductor", mode: str | None = None):
    """The Trainer's `compute_loss_func`: `causal_lm_loss`, under `torch.compile` when the model is compiled.

    The Trainer compiles the model only: the loss (the logits' float cast, `log_softmax` and the target gather over
    `[batch · seq_len, vocab]`) would stay eager, as separate full passes over the logits forward and backward. With
    `train.torch_compile` inductor fuses them too: ≈ 3 % of a step on the demo model on CPU
    (`benchmarks/bench_train.py`, `packing_torch_compile`). The compiled function is built once per (backend, mode)
    and shared, so dynamo's cache (and its switch to a dynamic length at the second shape) carries across calls.

    Args:
        torch_compile: `train.torch_compile`.
        backend, mode: as for `torch.compile` (the Trainer's `torch_compile_backend`/`torch_compile_mode`).

    Returns:
        A callable with `causal_lm_loss`'s signature and results (equal up to fused-kernel rounding).
    """
    if not torch_compile:
        return causal_lm_loss
    key = (backend, mode)
    if key not in _COMPILED_LOSS:
        import torch

        _COMPILED_LOSS[key] = torch.compile(causal_lm_loss, backend=backend, mode=mode)
    return _COMPILED_LOSS[key]
