"""Stage `evaluate`: per-source metrics, perplexity vs context length (three models) and passkey retrieval.

Reads the fine-tuned model (`layout.model`), the base (`orca8k.model.base.resolve_base`), the fine-tuning tokenizer
(`layout.tokenizer`), the tokenized validation split (`layout.tokenized_val`) and the validation mix
(`layout.mix_val`, its text rows). Writes `layout.eval_metrics` (the keys of CONTRACTS §7, read by the registry
gate), the DVC plot tables `layout.ppl_vs_context` and `layout.passkey`, and PNG figures under
`layout.eval_reports`. Everything is deterministic: the same checkpoint gives the same numbers on every run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from orca8k.config import Config
from orca8k.errors import DataError, StageInputMissing
from orca8k.layout import Layout
from orca8k.stages import StageResult

# PPL-vs-length models: name → how the RoPE settings are set before load (see `_load`).
MODELS = ("base_unscaled", "base_scaled", "fine_tuned")
MODEL_LABELS = {
    "base_unscaled": "base, plain RoPE",
    "base_scaled": "base + linear RoPE scaling, untrained",
    "fine_tuned": "fine-tuned (linear RoPE scaling)",
}


def run(cfg: Config) -> StageResult:
    """Evaluate the fine-tuned model and write the metrics, plot tables and figures.

    Raises:
        StageInputMissing: an input of an upstream stage is missing (the message names it).
        ConfigError: the scored tail or the budget do not fit the lengths, or a passkey length is too short.
        DataError: the validation data break their contract, or the base and fine-tuning tokenizers disagree.
    """
    from orca8k.data.chat_format import ChatEncoder
    from orca8k.data.collate import CausalLMCollator
    from orca8k.evaluation import context as ctx
    from orca8k.evaluation import passkey as pk
    from orca8k.evaluation.per_source import evaluate_per_source, per_source_metrics
    from orca8k.evaluation.plots import plot_passkey, plot_ppl_vs_context
    from orca8k.model.base import resolve_base
    from orca8k.model.tokenizer import load_tokenizer

    layout = Layout.from_config(cfg)
    ev = cfg.evaluate
    native = cfg.base.native_context
    for path in (layout.model, layout.tokenizer, layout.tokenized_val, layout.mix_val):
        if not path.exists():
            raise StageInputMissing(f"{path}: missing (run the upstream stages: `dvc repro evaluate`)")
    seconds: dict[str, float] = {}
    stage_start = clock = time.perf_counter()
    cpu_start = time.process_time()
    device = _device()
    dtype = _dtype(cfg, device)

    tokenizer = load_tokenizer(layout.tokenizer)
    encoder = ChatEncoder(tokenizer, train_on_system=cfg.tokenize.train_on_system)

    # 1. per-source metrics of the fine-tuned model over the supervised tokens of the tokenized val split
    fine_tuned = _load(cfg, "fine_tuned", layout.model, device, dtype)
    rows = _val_rows(layout.tokenized_val)
    collate = CausalLMCollator(pad_token_id=tokenizer.pad_token_id, padding_side="right")
    stats = evaluate_per_source(fine_tuned, rows, collate, ev.per_device_eval_batch_size)
    eval_section = per_source_metrics(stats)
    seconds["per_source"] = _lap(clock)
    clock = time.perf_counter()

    # 2. passkey retrieval (fine-tuned model only)
    passkey_lengths = ctx.context_lengths(native, ev.passkey.context_factors)
    trials = pk.make_trials(encoder, passkey_lengths, ev.passkey.depths, ev.passkey.trials, ev.passkey.digits, cfg.seed)
    passkey_results = pk.evaluate_passkey(fine_tuned, tokenizer, trials)
    passkey_rows = pk.passkey_table(passkey_results)
    seconds["passkey"] = _lap(clock)
    clock = time.perf_counter()

    # 3. perplexity vs context length: the same target blocks at every length, for three models
    lengths = ctx.context_lengths(native, ev.context_factors)
    documents = ctx.load_documents(layout.mix_val, encoder)
    blocks = ctx.plan_targets([len(d.ids) for d in documents], max(lengths), ev.scored_tail_tokens, ev.tokens_per_length)
    if not blocks:
        raise DataError(
            f"{layout.mix_val}: no text row has {max(lengths)} tokens (the longest context); "
            f"{len(documents)} text rows, longest {max((len(d.ids) for d in documents), default=0)} tokens"
        )
    base_dir = resolve_base(cfg)
    _check_base_tokenizer(base_dir, encoder, documents)
    ppl: dict[str, dict[int, Any]] = {}
    ppl["fine_tuned"] = ctx.perplexity_by_length(
        fine_tuned, documents, blocks, lengths, ev.scored_tail_tokens, encoder, ev.per_device_eval_batch_size
    )
    del fine_tuned
    _free(device)
    for name in ("base_unscaled", "base_scaled"):
        model = _load(cfg, name, base_dir, device, dtype)
        ppl[name] = ctx.perplexity_by_length(
            model, documents, blocks, lengths, ev.scored_tail_tokens, encoder, ev.per_device_eval_batch_size
        )
        del model
        _free(device)
    seconds["ppl_vs_context"] = _lap(clock)

    table = [
        {
            "model": name,
            "context_length": length,
            "context_factor": length / native,
            "perplexity": ppl[name][length].perplexity,
            "eval_loss": ppl[name][length].eval_loss,
            "token_accuracy": ppl[name][length].token_accuracy,
            "scored_tokens": ppl[name][length].tokens,
        }
        for name in MODELS
        for length in lengths
    ]
    context_section = _context_section(cfg, ppl, native, lengths, documents, blocks)
    metrics = {
        "eval": eval_section,
        "context": context_section,
        "passkey": pk.passkey_summary(passkey_results),
        "acceptance": _acceptance(cfg, context_section),
        "forward_tokens": {  # the work, from params and data: what the seconds above paid for
            "per_source": sum(len(r["input_ids"]) for r in rows),
            "ppl_vs_context": len(MODELS) * len(blocks) * sum(lengths),
            "passkey": sum(len(t.prompt_ids) + len(t.answer_ids) for t in trials),
        },
    }

    layout.eval_reports.mkdir(parents=True, exist_ok=True)
    layout.metrics.mkdir(parents=True, exist_ok=True)
    _write_json(layout.ppl_vs_context, table)
    _write_json(layout.passkey, passkey_rows)
    plot_ppl_vs_context(table, native, MODEL_LABELS, layout.ppl_vs_context_png)
    plot_passkey(passkey_rows, layout.passkey_png)
    _write_json(layout.passkey_trials, [r.to_dict() for r in passkey_results])
    seconds["total"] = _lap(stage_start)
    # wall seconds per part; cpu_seconds of the whole process (÷ threads ≈ wall on an idle machine: the CPU is shared)
    metrics["seconds"] = {**{k: round(v, 2) for k, v in seconds.items()},
                          "cpu_seconds": round(time.process_time() - cpu_start, 2), "torch_threads": _threads()}
    _write_json(layout.eval_metrics, metrics)
    return StageResult(
        stage="evaluate",
        outputs={
            "eval_metrics": layout.eval_metrics,
            "ppl_vs_context": layout.ppl_vs_context,
            "passkey": layout.passkey,
            "ppl_vs_context_png": layout.ppl_vs_context_png,
            "passkey_png": layout.passkey_png,
            "passkey_trials": layout.passkey_trials,
        },
        summary={
            **{f"{s}.eval_loss": round(m["eval_loss"], 4) for s, m in eval_section.items()},
            "ppl_1x": round(context_section["ppl_1x"], 3),
            "ppl_2x": round(context_section["ppl_2x"], 3),
            "scaled_base_ppl_2x": round(context_section["scaled_base_ppl_2x"], 3),
            "unscaled_base_ppl_ratio_2x_over_1x": round(context_section["unscaled_base_ppl_ratio_2x_over_1x"], 3),
            "passkey_accuracy": metrics["passkey"]["accuracy"],
            "acceptance_passed": metrics["acceptance"]["passed"],
        },
    )


# ----------------------------------------------------------------------------------------------------- helpers
def _lap(start: float) -> float:
    return time.perf_counter() - start


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _free(device: str) -> None:
    """Release a deleted model's memory before the next one loads (three 13B models do not fit at once)."""
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _dtype(cfg: Config, device: str) -> str:
    """fp32 on CPU (half-precision matmuls are unusable there); on GPU the training precision."""
    if device == "cpu":
        return "fp32"
    return "bf16" if cfg.train.bf16 else "fp16" if cfg.train.fp16 else "fp32"


def _load(cfg: Config, name: str, path: Path, device: str, dtype: str) -> Any:
    """Load one of `MODELS`, RoPE set in the config before the weights load (`load_causal_lm`)."""
    from orca8k.model.loading import KEEP, load_causal_lm

    rope = {"base_unscaled": None, "base_scaled": cfg.model.rope_scaling, "fine_tuned": KEEP}[name]
    model = load_causal_lm(
        path,
        rope_scaling=rope,
        native_context=cfg.base.native_context if name == "base_scaled" else None,
        dtype=dtype,
        attn_implementation=cfg.model.attn_implementation,
        device=device,
    )
    return model.eval()


def _check_base_tokenizer(base_dir: Path, encoder: Any, documents: list[Any]) -> None:
    """Plain text must tokenize identically with the base tokenizer and the fine-tuning tokenizer (the OA tokens are
    appended after the base vocabulary), or the base models' perplexities would score other ids.

    Raises:
        DataError: the two tokenizers give different ids for the start of a held-out document.
    """
    from orca8k.model.tokenizer import load_base_tokenizer

    base_tok = load_base_tokenizer(base_dir)
    for doc in documents[:3]:
        ours = encoder.segment_ids(doc.head, first=True)
        theirs = base_tok(doc.head, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), min(len(ours), len(theirs)))
            raise DataError(
                f"{base_dir}: the base tokenizer and the fine-tuning tokenizer disagree on document {doc.id!r} at "
                f"token {at}: base PPLs would score other ids"
            )


def _val_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of the tokenized validation split (`input_ids`, `labels`, `source`).

    Raises:
        DataError: a column is missing.
    """
    from datasets import load_from_disk

    ds = load_from_disk(str(path))
    missing = [c for c in ("input_ids", "labels", "source") if c not in ds.column_names]
    if missing:
        raise DataError(f"{path}: columns {missing} are missing (have {ds.column_names})")
    return ds.select_columns(["input_ids", "labels", "source"]).to_list()


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def _context_section(
    cfg: Config, ppl: dict[str, dict[int, Any]], native: int, lengths: list[int], documents: list[Any], blocks: list[Any]
) -> dict[str, Any]:
    one, two = int(round(native * 1.0)), int(round(native * 2.0))
    used_docs = sorted({b.doc for b in blocks})
    by_source: dict[str, int] = {}
    for d in used_docs:
        by_source[documents[d].source] = by_source.get(documents[d].source, 0) + 1
    section: dict[str, Any] = {
        "native_context": native,
        "ppl_1x": ppl["fine_tuned"][one].perplexity,
        "ppl_2x": ppl["fine_tuned"][two].perplexity,
        "ppl_ratio_2x_over_1x": _ratio(ppl["fine_tuned"][two].perplexity, ppl["fine_tuned"][one].perplexity),
        "scaled_base_ppl_1x": ppl["base_scaled"][one].perplexity,
        "scaled_base_ppl_2x": ppl["base_scaled"][two].perplexity,
        "scaled_base_ppl_ratio_2x_over_1x": _ratio(ppl["base_scaled"][two].perplexity, ppl["base_scaled"][one].perplexity),
        "unscaled_base_ppl_1x": ppl["base_unscaled"][one].perplexity,
        "unscaled_base_ppl_2x": ppl["base_unscaled"][two].perplexity,
        "unscaled_base_ppl_ratio_2x_over_1x": _ratio(
            ppl["base_unscaled"][two].perplexity, ppl["base_unscaled"][one].perplexity
        ),
        "scored_tail_tokens": cfg.evaluate.scored_tail_tokens,
        "scored_tokens_per_length": len(blocks) * cfg.evaluate.scored_tail_tokens,
        "budget_tokens_per_length": cfg.evaluate.tokens_per_length,
        "windows_per_length": len(blocks),
        "documents": len(used_docs),
        "documents_by_source": by_source,
    }
    return section


def _acceptance(cfg: Config, context: dict[str, Any]) -> dict[str, Any]:
    """The demo's acceptance of the context extension, reported (the registry gate enforces it):
    fine-tuned PPL at 2× ≤ `register.gate.max_ppl_ratio_2x_over_1x` × PPL at 1×, and below the scaled-but-untrained
    base's PPL at 2×."""
    max_ratio = cfg.register_.gate.max_ppl_ratio_2x_over_1x
    ratio_ok = bool(context["ppl_ratio_2x_over_1x"] <= max_ratio)
    beats_scaled = bool(context["ppl_2x"] < context["scaled_base_ppl_2x"])
    return {
        "passed": ratio_ok and beats_scaled,
        "ppl_ratio_2x_over_1x_ok": ratio_ok,
        "max_ppl_ratio_2x_over_1x": max_ratio,
        "ppl_2x_below_scaled_base": beats_scaled,
    }


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf → None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")
