"""The facts printed before step 0 (nanoGPT-style): what this run will do, from the loaded model and data.

`orca8k plan` predicts the same numbers from params alone; here they come from the objects that will train (the
resized model, the tokenized rows, the Trainer's step count), so a mismatch with the plan shows before any compute.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca8k.data.chat_format import IGNORE_INDEX
from orca8k.model.rope import effective_context, scaling_of

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel

    from orca8k.config import Config


@dataclass
class TokenCounts:
    """Tokens in the train rows: `rows`, `tokens` (real, before batch padding), `supervised_tokens`."""

    rows: int
    tokens: int
    supervised_tokens: int

    @property
    def supervised_share(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0


def count_tokens(dataset: Dataset, batch_rows: int = 4096) -> TokenCounts:
    """Count rows, tokens and supervised tokens of a tokenized dataset, streaming over Arrow record batches (memory
    bounded by `batch_rows`; a few seconds per billion tokens)."""
    import numpy as np
    import pyarrow.compute as pc

    tokens = supervised = 0
    arrow = dataset.select_columns(["input_ids", "labels"]).with_format("arrow")
    for batch in arrow.iter(batch_size=batch_rows):  # pyarrow.Table
        tokens += int(pc.sum(pc.list_value_length(batch.column("input_ids"))).as_py() or 0)
        labels = pc.list_flatten(batch.column("labels")).to_numpy(zero_copy_only=False)
        supervised += int(np.count_nonzero(labels != IGNORE_INDEX))
    return TokenCounts(rows=len(dataset), tokens=tokens, supervised_tokens=supervised)


def counts_from_metrics(path: Path) -> TokenCounts | None:
    """`TokenCounts` of the train split from the tokenize stage's metrics (`["train"]["rows"|"tokens"|
    "supervised_tokens"]`), or None if the file or a key is missing."""
    if not path.is_file():
        return None
    try:
        train = json.loads(path.read_text())["train"]
        return TokenCounts(int(train["rows"]), int(train["tokens"]), int(train["supervised_tokens"]))
    except (KeyError, TypeError, ValueError):
        return None


def _numel(p) -> int:
    return int(getattr(p, "ds_numel", None) or p.numel())  # ZeRO-3 partitions weights: ds_numel is the full size


def parameter_counts(model: PreTrainedModel) -> dict[str, int]:
    """`{"total", "non_embedding"}`: non-embedding excludes the input embedding only (the 6·N convention).
    Full sizes also under ZeRO-3, where each rank holds only a partition."""
    total = sum(_numel(p) for p in model.parameters())
    embedding = _numel(model.get_input_embeddings().weight)
    return {"total": total, "non_embedding": total - embedding}


def derived_facts(
    cfg: Config, model: PreTrainedModel, counts: TokenCounts, *, packing: bool, max_steps: int, world_size: int,
    precision: str, zero_stage: int | None, attn_implementation: str, resumed_from: int | None,
) -> dict[str, Any]:
    """The run's facts as plain data (also written into the train metrics)."""
    t = cfg.train
    rows_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * world_size
    mean_row_tokens = counts.tokens / counts.rows if counts.rows else 0.0
    rope = scaling_of(model.config)
    params = parameter_counts(model)
    return {
        "parameters": params["total"],
        "parameters_non_embedding": params["non_embedding"],
        "vocab_size": int(model.config.vocab_size),
        "native_context_tokens": model.config.max_position_embeddings,
        "rope_type": rope["rope_type"],
        "rope_factor": float(rope.get("factor", 1.0)),
        "effective_context_tokens": effective_context(model.config),
        "max_length_tokens": cfg.tokenize.max_length,
        "packing": packing,
        "world_size": world_size,
        "precision": precision,
        "zero_stage": zero_stage,
        "attn_implementation": attn_implementation,
        "gradient_checkpointing": t.gradient_checkpointing,
        "rows_per_optimizer_step": rows_per_step,
        "max_tokens_per_optimizer_step": rows_per_step * cfg.tokenize.max_length,
        "mean_tokens_per_optimizer_step": round(rows_per_step * mean_row_tokens),
        "train_rows": counts.rows,
        "train_tokens": counts.tokens,
        "supervised_token_share": round(counts.supervised_share, 4),
        "optimizer_steps": max_steps,
        "epochs": round(max_steps * rows_per_step / counts.rows, 3) if counts.rows else None,
        "warmup_steps": t.warmup_steps,
        "warmup_shape": t.warmup_shape,
        "lr_scheduler_type": t.lr_scheduler_type,
        "learning_rate": t.learning_rate,
        "resumed_from_step": resumed_from,
    }


def format_facts(f: dict[str, Any]) -> list[str]:
    """Printable lines, one fact each."""
    resumed = f"resumed from step {f['resumed_from_step']}" if f["resumed_from_step"] else "fresh start"
    return [
        f"parameters               {f['parameters']:,} ({f['parameters_non_embedding']:,} non-embedding, vocab {f['vocab_size']:,})",
        f"context                  native {f['native_context_tokens']:,} × RoPE {f['rope_type']} {f['rope_factor']:g} = "
        f"effective {f['effective_context_tokens']:,} tokens; rows of ≤ {f['max_length_tokens']:,} (packing {f['packing']})",
        f"processes                {f['world_size']}, {f['precision']}, ZeRO stage {f['zero_stage'] if f['zero_stage'] is not None else '-'}, "
        f"attention {f['attn_implementation']}, gradient checkpointing {f['gradient_checkpointing']}",
        f"per optimizer step       {f['rows_per_optimizer_step']:,} rows, ≈ {f['mean_tokens_per_optimizer_step']:,} tokens "
        f"(at most {f['max_tokens_per_optimizer_step']:,})",
        f"train data               {f['train_rows']:,} rows, {f['train_tokens']:,} tokens, supervised share "
        f"{f['supervised_token_share']:.3f}",
        f"optimizer steps          {f['optimizer_steps']:,} (≈ {f['epochs']} epochs), warm-up {f['warmup_steps']} ({f['warmup_shape']}) "
        f"then {f['lr_scheduler_type']} at lr {f['learning_rate']:g}; {resumed}",
    ]
