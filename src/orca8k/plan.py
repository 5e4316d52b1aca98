"""`orca8k plan`: validate a params file and print the run's derived facts without data, weights or a GPU.

Facts (nanoGPT-style, printed before anything expensive): rows and tokens per optimiser step, optimiser steps,
effective context, RoPE factor, parameter count, a per-GPU memory estimate, and — when the upstream outputs exist —
the realised row counts and supervised-token share. Train rows come from the mix manifest when it exists and was
made from the same `seed` and `data` params (a demo mix in the same checkout is not the recipe's), else
from `data.sources.*.expected_train_rows` (the card's counts in the recipe).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from orca8k.config import ArchitectureConfig, Config
from orca8k.layout import Layout

# The seed's special tokens: <|system|>, <|prompter|>, <|assistant|>, <|prefix_begin|>, <|prefix_end|>.
NUM_ADDED_SPECIAL_TOKENS = 5
GIB = 1024**3


def padded_vocab_size(vocab_size: int, multiple: int, added: int = NUM_ADDED_SPECIAL_TOKENS) -> int:
    """Vocabulary rows after adding the special tokens and padding to a multiple (32,000 + 5 → 32,016)."""
    return int(math.ceil((vocab_size + added) / multiple) * multiple)


def count_parameters(arch: ArchitectureConfig, vocab_size: int | None = None) -> dict[str, int]:
    """Exact parameter count of a `LlamaForCausalLM` with this architecture (no biases, RMSNorm weights only).

    Returns:
        `{"total", "embedding", "non_embedding"}`; `non_embedding` excludes the input embedding only (the
        lm_head counts, as in the 6·N FLOPs convention of Kaplan et al. 2020 where it matters).
    """
    v = vocab_size or arch.vocab_size
    d, i, n = arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers
    head_dim = d // arch.num_attention_heads
    kv = arch.num_key_value_heads * head_dim
    attn = d * d + 2 * d * kv + d * d  # q, k, v, o
    mlp = 3 * d * i  # gate, up, down
    per_layer = attn + mlp + 2 * d  # two RMSNorms
    embedding = v * d
    lm_head = 0 if arch.tie_word_embeddings else v * d
    total = embedding + n * per_layer + d + lm_head
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def _zero_stage(cfg: Config) -> int:
    if not cfg.train.deepspeed:
        return 0
    path = Path(cfg.train.deepspeed)
    if not path.is_file():
        return -1
    return int(json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0))


def estimate_memory_bytes(cfg: Config, n_params: int) -> dict[str, float]:
    """Rough per-GPU memory for full fine-tuning with AdamW (GiB).

    Mixed precision keeps 16-bit weights (2 B) and grads (2 B) plus fp32 master weights and Adam moments (12 B);
    fp32 training keeps 4 + 4 + 8 B. ZeRO-1 partitions the optimizer states, ZeRO-2 also the grads, ZeRO-3 also the
    weights, over the data-parallel world (Rajbhandari et al. 2020). Activations: with gradient checkpointing the
    layer inputs (L·b·s·h half-precision values) plus one layer's working set (≈ 34·b·s·h bytes, Korthikanti et al.
    2022, no s² term with flash/SDPA attention), plus fp32 logits (b·s·V·4 B, twice for the loss).
    """
    t = cfg.train
    arch = cfg.base.architecture
    half = t.fp16 or t.bf16
    w_bytes, g_bytes, o_bytes = (2, 2, 12) if half else (4, 4, 8)
    stage = max(_zero_stage(cfg), 0)
    world = t.world_size
    weights = n_params * w_bytes / (world if stage >= 3 else 1)
    grads = n_params * g_bytes / (world if stage >= 2 else 1)
    optim = n_params * o_bytes / (world if stage >= 1 else 1)
    b, s, h, L = t.per_device_train_batch_size, cfg.tokenize.max_length, arch.hidden_size, arch.num_hidden_layers
    act_bytes = 2 if half else 4
    layer_set = 34 * b * s * h * (act_bytes / 2)
    acts = (L * b * s * h * act_bytes + layer_set) if t.gradient_checkpointing else L * layer_set
    vocab = padded_vocab_size(arch.vocab_size, cfg.model.pad_vocab_size_multiple)
    logits = 2 * b * s * vocab * 4
    total = weights + grads + optim + acts + logits
    return {
        "weights_gib": weights / GIB,
        "grads_gib": grads / GIB,
        "optimizer_gib": optim / GIB,
        "activations_gib": acts / GIB,
        "logits_gib": logits / GIB,
        "total_gib": total / GIB,
        "zero_stage": stage,
    }


def _train_rows(cfg: Config, layout: Layout) -> tuple[int | None, str]:
    if layout.mix_manifest.is_file():
        manifest = json.loads(layout.mix_manifest.read_text())
        try:
            # a mix made from other `seed`/`data` params (e.g. the demo's, in the same checkout) is not this one's
            if manifest["params"] != {"seed": cfg.seed, "data": cfg.to_dict()["data"]}:
                raise ValueError("the manifest's params differ")
            rows = sum(int(s["train"]["rows"]) for s in manifest["sources"].values())
            return rows, f"mix manifest ({layout.mix_manifest})"
        except (KeyError, TypeError, ValueError):
            pass
    expected = [s.expected_train_rows for s in cfg.data.sources.values()]
    if all(e is not None for e in expected):
        return sum(expected), "data.sources.*.expected_train_rows"
    return None, "unknown until `orca8k mix` has run (set data.sources.*.expected_train_rows to plan ahead)"


def make_plan(cfg: Config) -> dict[str, Any]:
    """The derived facts of a config as plain data (see module docstring)."""
    layout = Layout.from_config(cfg)
    t = cfg.train
    arch = cfg.base.architecture
    vocab = padded_vocab_size(arch.vocab_size, cfg.model.pad_vocab_size_multiple)
    params = count_parameters(arch, vocab)
    rows_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * t.world_size
    max_tokens_per_step = rows_per_step * cfg.tokenize.max_length
    rows, rows_from = _train_rows(cfg, layout)
    steps_note = ""
    if t.max_steps > 0:
        steps: int | None = t.max_steps
        steps_note = "train.max_steps"
    elif rows is None:
        steps = None
        steps_note = rows_from
    elif cfg.tokenize.packing:
        # packed rows are counted by `tokenize`; before that, the row count is an upper bound on packed rows
        packed = _packed_rows(cfg, layout)
        basis = packed if packed is not None else rows
        steps = int(basis // rows_per_step * t.num_train_epochs)
        steps_note = "packed rows from tokenize" if packed is not None else "upper bound: rows before packing"
    else:
        steps = int(rows // rows_per_step * t.num_train_epochs)
        remainder = rows % rows_per_step
        steps_note = f"full steps of {rows_per_step} rows from {rows_from}"
        if remainder:
            steps_note += f"; {remainder} leftover rows form one partial step in transformers >= 4.46"
    facts: dict[str, Any] = {
        "base_model": cfg.base.model_name_or_path or "demo (built by `orca8k base`)",
        "native_context_tokens": cfg.base.native_context,
        "rope_scaling": cfg.model.rope_scaling.model_dump(),
        "effective_context_tokens": cfg.effective_context,
        "max_length_tokens": cfg.tokenize.max_length,
        "packing": cfg.tokenize.packing,
        "packing_strategy": cfg.tokenize.packed_by,
        "world_size": t.world_size,
        "rows_per_optimizer_step": rows_per_step,
        "max_tokens_per_optimizer_step": max_tokens_per_step,
        "train_rows": rows,
        "train_rows_from": rows_from,
        "optimizer_steps": steps,
        "optimizer_steps_note": steps_note,
        "warmup_steps": t.warmup_steps,
        "vocab_size_padded": vocab,
        "parameters": params["total"],
        "parameters_non_embedding": params["non_embedding"],
        "dtype": "fp16" if t.fp16 else "bf16" if t.bf16 else "fp32",
        "memory_per_gpu": {k: round(v, 2) if isinstance(v, float) else v for k, v in estimate_memory_bytes(cfg, params["total"]).items()},
        "supervised_token_share": _supervised_share(cfg, layout),
        "warnings": _warnings(cfg),
    }
    return facts


def _tokenize_stats(cfg: Config, layout: Layout) -> dict[str, Any]:
    """The token stats' `train` section, if they exist and were made with this `max_length`, `packing` and
    `packing_strategy` (stats of another profile in the same checkout, e.g. the demo's, are not this run's; stats
    written before `packing_strategy` existed were made by `bfd`)."""
    if not layout.tokenize_metrics.is_file():
        return {}
    data = json.loads(layout.tokenize_metrics.read_text())
    t = cfg.tokenize
    made_by = data.get("packing_strategy", "bfd" if data.get("packing") else None)
    if (data.get("max_length"), data.get("packing"), made_by) != (
            t.max_length, t.packing, t.packed_by):
        return {}
    return data["train"] if isinstance(data.get("train"), dict) else {}


def _packed_rows(cfg: Config, layout: Layout) -> int | None:
    value = _tokenize_stats(cfg, layout).get("rows")
    return int(value) if value is not None else None


def _supervised_share(cfg: Config, layout: Layout) -> float | None:
    train = _tokenize_stats(cfg, layout)
    if train.get("tokens"):
        return round(train.get("supervised_tokens", 0) / train["tokens"], 4)
    return None


def _warnings(cfg: Config) -> list[str]:
    out = []
    revs = {"base.revision": cfg.base.revision} if cfg.base.model_name_or_path else {}
    for name, src in cfg.data.sources.items():
        if src.hub is not None:
            revs[f"data.sources.{name}.hub.revision"] = src.hub.revision
    for key, rev in revs.items():
        if rev is None or len(rev) != 40 or any(c not in "0123456789abcdef" for c in rev):
            out.append(f"{key}={rev!r} is not a pinned commit sha; the fetch records the resolved sha")
    if cfg.train.fp16:
        out.append("train.fp16: the seed's dtype; bf16 is recommended where supported (no loss scaling)")
    if cfg.train.deepspeed and not Path(cfg.train.deepspeed).is_file():
        out.append(f"train.deepspeed={cfg.train.deepspeed}: file not found from {Path.cwd()}")
    return out


def format_plan(facts: dict[str, Any]) -> str:
    """Human-readable plan, one fact per line."""
    mem = facts["memory_per_gpu"]
    steps = facts["optimizer_steps"]
    lines = [
        f"base model               {facts['base_model']}",
        f"context                  native {facts['native_context_tokens']:,} × RoPE {facts['rope_scaling']['type']} "
        f"{facts['rope_scaling']['factor']} = effective {facts['effective_context_tokens']:,} tokens "
        f"(max_length {facts['max_length_tokens']:,}, packing {facts['packing']}"
        + (f", {facts['packing_strategy']})" if facts.get("packing_strategy") else ")"),
        f"parameters               {facts['parameters']:,} ({facts['parameters_non_embedding']:,} non-embedding; "
        f"vocab padded to {facts['vocab_size_padded']:,})",
        f"world size               {facts['world_size']} process{'es' if facts['world_size'] != 1 else ''}, "
        f"{facts['dtype']}",
        f"per optimizer step       {facts['rows_per_optimizer_step']:,} rows × {facts['max_length_tokens']:,} = "
        f"{facts['max_tokens_per_optimizer_step']:,} tokens (at most)",
        f"train rows               {facts['train_rows']:,} ({facts['train_rows_from']})"
        if facts["train_rows"] is not None
        else f"train rows               ? ({facts['train_rows_from']})",
        f"optimizer steps          {steps:,} ({facts['optimizer_steps_note']})"
        if steps is not None
        else f"optimizer steps          ? ({facts['optimizer_steps_note']})",
        f"warm-up steps            {facts['warmup_steps']}",
        f"memory per GPU (est.)    {mem['total_gib']:.1f} GiB = weights {mem['weights_gib']:.1f} + grads "
        f"{mem['grads_gib']:.1f} + optimizer {mem['optimizer_gib']:.1f} + activations {mem['activations_gib']:.1f} + "
        f"logits {mem['logits_gib']:.1f} (ZeRO stage {mem['zero_stage']})",
        f"supervised-token share   {facts['supervised_token_share'] if facts['supervised_token_share'] is not None else '? (after tokenize)'}",
    ]
    lines += [f"warning                  {w}" for w in facts["warnings"]]
    return "\n".join(lines)
