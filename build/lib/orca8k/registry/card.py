"""What travels with the registered model besides the weights: a model card (`README.md`) and a
`generation_config.json` with the OA stop/pad tokens and the OA default decoding settings.

Both are built from files and from the training run's logged params (the config that trained the model, not
today's params file): the recipe (learning rate, schedule, batch, context, RoPE, DeepSpeed), the mix counts from
`layout.mix_manifest`, the metrics from `layout.eval_metrics` and the sampling summary, the licences of the sources
(`data.sources.<name>.license`) and of the base (`register.base_license`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orca8k.errors import DataError
from orca8k.model.tokenizer import ASSISTANT, BOS, EOS, PROMPTER, SYSTEM

GENERATION_KEYS = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                   "repetition_penalty", "typical_p", "num_beams")


def special_token_ids(model_dir: Path) -> dict[str, int]:
    """Ids of `<s>`, `</s>` and the OA role tokens, read from the checkpoint's `tokenizer.json` (no tokenizer load).

    Raises:
        DataError: `tokenizer.json` is missing or lacks one of those tokens (named).
    """
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path}: missing (the model dir must hold the OA tokenizer)")
    data = json.loads(path.read_text(encoding="utf-8"))
    ids = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    vocab = (data.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, dict):
        for token in (BOS, EOS):
            if token not in ids and token in vocab:
                ids[token] = int(vocab[token])
    out = {}
    for token in (BOS, EOS, SYSTEM, PROMPTER, ASSISTANT):
        if token not in ids:
            raise DataError(f"{path}: special token {token!r} not found")
        out[token] = ids[token]
    return out


def oa_default_generate_args(config_file: Path) -> dict[str, Any]:
    """The OA default decoding settings: `default.generate_args` of the sampling configuration file.

    Raises:
        DataError: the file is missing or has no `default.generate_args` object.
    """
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
        args = data["default"]["generate_args"]
        if not isinstance(args, dict):
            raise TypeError("not an object")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{config_file}: field default.generate_args unreadable ({err})") from None
    return {k: v for k, v in args.items() if k in GENERATION_KEYS}


def generation_config(model_dir: Path, config_file: Path) -> dict[str, Any]:
    """`generation_config.json` for the registered model: the checkpoint's own (if any) with bos/eos/pad set to the
    OA tokenizer's `<s>`/`</s>` (pad = eos, as in training) and the OA default decoding settings.

    Raises:
        DataError: the checkpoint's `config.json` names an eos id other than the tokenizer's `</s>`.
    """
    ids = special_token_ids(model_dir)
    own = model_dir / "generation_config.json"
    out: dict[str, Any] = json.loads(own.read_text(encoding="utf-8")) if own.is_file() else {}
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    eos = config.get("eos_token_id")
    if eos is not None and eos != ids[EOS] and not (isinstance(eos, list) and ids[EOS] in eos):
        raise DataError(f"{model_dir / 'config.json'}: eos_token_id {eos} is not the tokenizer's </s> id {ids[EOS]}")
    out.update(oa_default_generate_args(config_file))
    out.update({"bos_token_id": ids[BOS], "eos_token_id": ids[EOS], "pad_token_id": ids[EOS]})
    out.setdefault("transformers_version", config.get("transformers_version"))
    return out


def _p(params: dict[str, str], key: str, default: str = "—") -> str:
    value = params.get(key)
    return default if value in (None, "", "None", "null") else value


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def model_card(
    *, model_name: str, run_id: str, params: dict[str, str], lineage: dict[str, str], manifest: dict[str, Any] | None,
    eval_metrics: dict[str, Any], sampling_summary: dict[str, Any], base_license: str, facts: dict[str, Any],
) -> str:
    """The model card (Markdown with Hugging Face front matter) for a registered version.

    Args:
        model_name: registered model name.
        run_id: the training run.
        params: the training run's params (flat, as logged).
        lineage: the `lineage.*` tags.
        manifest: `layout.mix_manifest` (None when absent: the counts table says so).
        eval_metrics: `layout.eval_metrics`.
        sampling_summary: the sampling report's `summary.json`.
        base_license: `register.base_license`.
        facts: `lineage.model_facts` of the checkpoint (RoPE, context, dtype).
    """
    sources = sorted({k.split(".")[2] for k in params if k.startswith("data.sources.") and k.endswith(".fraction")})
    rope = facts.get("rope_parameters") or {}
    native = facts.get("max_position_embeddings")
    factor = rope.get("factor", 1.0)
    effective = int(native * factor) if isinstance(native, int) and isinstance(factor, int | float) else "?"
    base = lineage.get("lineage.base_model", "unknown")
    licences = sorted({_p(params, f"data.sources.{s}.license", "unknown") for s in sources} | {base_license})
    lines = [
        "---",
        "license: other",
        f"license_name: {json.dumps('; '.join(licences))}",
        f"base_model: {base}",
        "pipeline_tag: text-generation",
        "tags: [orca8k, llama, rope-scaling, long-context]",
        "---",
        f"# {model_name}",
        "",
        f"Full fine-tune of `{base}` (revision `{lineage.get('lineage.base_revision', 'none')}`) to a context of "
        f"{effective} tokens with linear RoPE scaling ×{factor} (position interpolation, Chen et al. 2023) on a "
        f"mix of {', '.join(sources) or 'unknown sources'}. The config keeps `max_position_embeddings = {native}` (the "
        "native context) and carries the scaling in `rope_parameters`, so a server scales exactly once.",
        "",
        f"Training run `{run_id}`; weights in `{facts.get('dtype')}` safetensors.",
        "",
        "## Prompt format (OpenAssistant v3)",
        "",
        "```",
        f"{BOS}{SYSTEM}{{system}}{EOS}{PROMPTER}{{prompt}}{EOS}{ASSISTANT}",
        "```",
        f"Generation stops at `{EOS}` (eos = pad). `generation_config.json` holds the OA default decoding settings.",
        "",
        "## Recipe",
        "",
        "| key | value |",
        "|---|---|",
    ]
    for key in ("seed", "tokenize.max_length", "tokenize.packing", "model.rope_scaling.type", "model.rope_scaling.factor",
                "train.learning_rate", "train.lr_scheduler_type", "train.warmup_steps", "train.weight_decay",
                "train.adam_beta1", "train.adam_beta2", "train.adam_epsilon", "train.max_grad_norm",
                "train.per_device_train_batch_size", "train.gradient_accumulation_steps", "train.nproc_per_node",
                "train.num_nodes", "train.num_train_epochs", "train.max_steps", "train.gradient_checkpointing",
                "train.fp16", "train.bf16", "train.deepspeed", "model.attn_implementation"):
        lines.append(f"| `{key}` | {_p(params, key)} |")
    lines += ["", "## Data mix", "", "| source | fraction | train rows | val rows | licence |", "|---|---|---|---|---|"]
    counts = (manifest or {}).get("sources", {}) if isinstance(manifest, dict) else {}
    for s in sources:
        c = counts.get(s, {}) if isinstance(counts, dict) else {}
        train_rows = (c.get("train") or {}).get("rows", "?") if isinstance(c, dict) else "?"
        val_rows = (c.get("val") or {}).get("rows", "?") if isinstance(c, dict) else "?"
        lines.append(f"| {s} | {_p(params, f'data.sources.{s}.fraction')} | {train_rows} | {val_rows} | "
                     f"{_p(params, f'data.sources.{s}.license', 'unknown')} |")
    if manifest is None:
        lines.append("\n(mix manifest not found: counts unknown)")
    lines += ["", "## Metrics", "", "| source | eval_loss | perplexity | token_accuracy | supervised_tokens |",
              "|---|---|---|---|---|"]
    for s, m in sorted((eval_metrics.get("eval") or {}).items()):
        lines.append(f"| {s} | " + " | ".join(_fmt(m.get(k, "—")) for k in
                                              ("eval_loss", "perplexity", "token_accuracy", "supervised_tokens")) + " |")
    ctx = eval_metrics.get("context") or {}
    if ctx:
        lines += ["", "Context extension: " + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in ctx.items())]
    passkey = eval_metrics.get("passkey") or {}
    if "accuracy" in passkey:
        lines.append(f"Passkey retrieval accuracy: {_fmt(passkey['accuracy'])}")
    lines.append("Sampling report: " + ", ".join(f"`{k}` = {_fmt(sampling_summary.get(k))}"
                                                 for k in ("outputs", "empty_outputs", "proper_end_rate")))
    lines += ["", "## Licences", "", f"- base `{base}`: {base_license}"]
    lines += [f"- {s}: {_p(params, f'data.sources.{s}.license', 'unknown')}" for s in sources]
    lines += ["", "## Lineage", "", "| tag | value |", "|---|---|"]
    lines += [f"| `{k}` | `{v}` |" for k, v in sorted(lineage.items())]
    lines += ["", "## Use", "", "```python", "import mlflow",
              f'components = mlflow.transformers.load_model("models:/{model_name}@champion", return_type="components")',
              "```", ""]
    return "\n".join(lines)
