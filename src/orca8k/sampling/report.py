"""Sampling reports: every prompt × every decoding configuration, as OA `SamplingReport` files plus a summary.

One report file per configuration (`{date}_{model}_sampling_{config}.json`, OA's naming), all from one run with one
date, an `index.html` that shows them side by side (`orca8k.sampling.html`), and `summary.json` with the counts the
registry gate reads: `{"outputs", "empty_outputs", "proper_end_rate", "files", ...}`.

Decoding follows OA's `sampling_report.py`: each configuration is merged over the file's `default`; sampled
configurations run `num_samples` times, greedy ones once. Unlike OA, prompts run in batches, and every output has
a seed of its own: sample i of a configuration is seeded with `derive_seed(seed, name, i)`, and its output for a
prompt draws from a generator seeded with `prompt_seed(that seed, the prompt's ids)` (`generate_batched`'s row
seeds). The samples of a configuration therefore run together, `num_samples` × prompts rows, and an output does not
depend on the batch size, the compaction, the other prompts or their order: one at a time gives the same report.
`sampling_params` records the parameters that acted (library defaults and the checkpoint's generation config
included), the seeds, the sampler and the model's dtype and RoPE settings — not just the file's `generate_args`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca8k.data.chat_format import ChatEncoder
from orca8k.sampling.generation import (
    COMPACT_EVERY,
    Generation,
    Mode,
    build_prompt_ids,
    derive_seed,
    effective_params,
    generate_batched,
    model_facts,
    prompt_seed,
    resolve_generation_config,
    sampler_name,
)
from orca8k.sampling.html import render_index
from orca8k.sampling.schema import (
    Configuration,
    PromptResults,
    SamplingReport,
    SamplingResult,
    drop_nulls,
    report_filename,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

def utc_now_iso() -> str:
    """Now as ISO-8601 UTC (`2026-11-29T10:15:00+00:00`); `SOURCE_DATE_EPOCH` (seconds) fixes it for reproducible
    builds."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    now = datetime.fromtimestamp(int(epoch), timezone.utc) if epoch else datetime.now(timezone.utc)
    return now.isoformat(timespec="seconds")


@dataclass
class ReportSet:
    """The reports of one run: one `SamplingReport` per configuration, and the generations behind them.

    Attributes:
        reports: configuration name → report (insertion order = the configuration file's order).
        generations: configuration name → per prompt → per sample `Generation`.
    """

    reports: dict[str, SamplingReport] = field(default_factory=dict)
    generations: dict[str, list[list[Generation]]] = field(default_factory=dict)

    def filenames(self) -> dict[str, str]:
        """Configuration name → report file name."""
        return {name: report_filename(r.date, r.model_name, name) for name, r in self.reports.items()}


def sample_reports(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    configuration: Configuration,
    prompts: Sequence[str],
    *,
    model_name: str,
    mode: Mode = "v3",
    num_samples: int = 2,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    compact_every: int | None = COMPACT_EVERY,
    skip_special_tokens: bool = True,
    seed: int = 0,
    date: str | None = None,
    args: dict[str, Any] | None = None,
) -> ReportSet:
    """Generate every prompt under every configuration and build one OA report per configuration.

    Args:
        model: the causal LM (eval mode) to sample from.
        tokenizer: its OA tokenizer (pad = eos = `</s>`).
        configuration: the decoding set (`orca8k.sampling.schema.load_configuration`).
        prompts: user prompts.
        model_name: written into each report and its file name.
        mode: `v3` (system block from `pre_text`) or `v2_5` (see `build_prompt_ids`).
        num_samples: outputs per prompt for a sampled configuration (greedy ones get 1; OA's `--num-samples`).
        max_new_tokens: overrides every configuration's `max_new_tokens` (the demo's shorter budget).
        batch_size: rows (prompt × sample) per `generate` call.
        compact_every: new tokens per `generate` call; finished rows leave the batch between calls
            (`generate_batched`; None keeps them to the end).
        skip_special_tokens: drop special tokens from the decoded outputs.
        seed: the run seed; sample i of configuration c is seeded with `derive_seed(seed, c, i)`.
        date: ISO-8601 UTC (default: now, or `SOURCE_DATE_EPOCH`).
        args: the run's arguments, written as the reports' `args` (nulls dropped).

    Returns:
        A `ReportSet`.

    Raises:
        ValueError: no prompts, `num_samples` < 1, or transformers rejects a configuration's `generate_args`.
    """
    if not prompts:
        raise ValueError("sample_reports: no prompts")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    date = date or utc_now_iso()
    encoder = ChatEncoder(tokenizer)
    facts = model_facts(model)
    out = ReportSet()
    for sc in configuration.merged():
        name = str(sc.name)
        generate_args = dict(sc.generate_args)
        if max_new_tokens is not None:
            generate_args["max_new_tokens"] = max_new_tokens
        gen_config = resolve_generation_config(
            model, generate_args, eos_token_id=encoder.eos_id, pad_token_id=tokenizer.pad_token_id
        )
        prompt_ids = [
            build_prompt_ids(encoder, p, mode=mode, pre_text=sc.pre_text, add_prefix_tokens=bool(sc.add_prefix_tokens))
            for p in prompts
        ]
        runs = 1 if not gen_config.do_sample else num_samples
        seeds = [derive_seed(seed, name, i) for i in range(runs)]
        # every sample of every prompt in one call: row (i, j) is prompt j, seeded as sample i of it
        outputs = generate_batched(
            model, tokenizer, [ids for _ in range(runs) for ids in prompt_ids], gen_config,
            batch_size=batch_size, compact_every=compact_every, skip_special_tokens=skip_special_tokens,
            row_seeds=[prompt_seed(s, ids) for s in seeds for ids in prompt_ids],
        )
        per_prompt = [[outputs[i * len(prompts) + j] for i in range(runs)] for j in range(len(prompts))]
        params = drop_nulls({
            **effective_params(gen_config),
            "seed": seed,
            "sample_seeds": seeds,
            "batch_size": batch_size,
            "compact_every": compact_every,
            "sampler": sampler_name(gen_config),
            "mode": mode,
            "pre_text": sc.pre_text or None,
            "add_prefix_tokens": bool(sc.add_prefix_tokens) if mode == "v2_5" and sc.pre_text else None,
            "skip_special_tokens": skip_special_tokens,
            **facts,
        })
        out.generations[name] = per_prompt
        out.reports[name] = SamplingReport(
            model_name=model_name,
            date=date,
            args=drop_nulls(dict(args or {})),
            prompts=[
                PromptResults(
                    prompt=p,
                    results=[SamplingResult(sampling_config=name, sampling_params=params, outputs=[g.text for g in gens])],
                )
                for p, gens in zip(prompts, per_prompt, strict=True)
            ],
        )
    return out


def summarize(report_set: ReportSet) -> dict[str, Any]:
    """Counts over all outputs, and per configuration: outputs, empty outputs, the share that ended with `</s>`
    within `max_new_tokens` (`proper_end_rate`), mean new tokens; plus the report file names."""

    def counts(gens: list[Generation]) -> dict[str, Any]:
        n = len(gens)
        return {
            "outputs": n,
            "empty_outputs": sum(g.empty for g in gens),
            "proper_end_rate": round(sum(g.ended for g in gens) / n, 6) if n else 0.0,
            "mean_new_tokens": round(sum(g.new_tokens for g in gens) / n, 3) if n else 0.0,
        }

    every: list[Generation] = []
    per_config = {}
    for name, per_prompt in report_set.generations.items():
        gens = [g for sample in per_prompt for g in sample]
        every += gens
        per_config[name] = counts(gens)
    first = next(iter(report_set.reports.values()))
    summary = counts(every)
    summary.pop("mean_new_tokens")
    return {
        **summary,
        "files": sorted(report_set.filenames().values()),
        "model_name": first.model_name,
        "date": first.date,
        "prompts": len(first.prompts),
        "configs": per_config,
    }


def write_report_set(report_set: ReportSet, out_dir: str | Path, *, summary_path: Path, index_path: Path) -> dict[str, Path]:
    """Write the report files into `out_dir`, plus the summary and the HTML page, replacing earlier report files.

    Earlier `*_sampling_*.json` files are removed first (their names carry another date or model), so the folder
    holds exactly one run — the DVC out.

    Args:
        report_set: from `sample_reports`.
        out_dir: folder of the report files (`Layout.sampling_reports`).
        summary_path: where `summary.json` goes (`Layout.sampling_summary`).
        index_path: where the HTML page goes (`Layout.sampling_index`).

    Returns:
        Output name → path: `summary`, `index`, and one entry per configuration name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*_sampling_*.json"):
        stale.unlink()
    written: dict[str, Path] = {}
    names = report_set.filenames()
    for name, report in report_set.reports.items():
        path = out_dir / names[name]
        path.write_text(report.to_json() + "\n", encoding="utf-8")
        written[name] = path
    summary = summarize(report_set)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    ended = {n: [[g.ended for g in sample] for sample in per_prompt] for n, per_prompt in report_set.generations.items()}
    index_path.write_text(render_index(report_set.reports, names, summary, ended), encoding="utf-8")
    written["summary"] = summary_path
    written["index"] = index_path
    return written
