"""Stage `sampling-report`: OA sampling reports of the fine-tuned model (every prompt × every decoding config).

Reads `layout.model` (safetensors + OA tokenizer, RoPE settings as saved), `sampling.config_file` (OA
`Configuration`) and `sampling.prompts_file` (JSONL strings); writes under `layout.sampling_reports` one OA
`SamplingReport` JSON per configuration, `index.html` (per prompt, the configurations side by side) and
`summary.json` (outputs, empty outputs, proper-end rate: the registry gate reads it).

Params read: `seed`, `sampling.*`, `model.attn_implementation`.
"""

from __future__ import annotations

from orca8k.config import Config
from orca8k.layout import Layout
from orca8k.stages import StageResult


def run(cfg: Config) -> StageResult:
    """Sample every prompt under every configuration and write the report set.

    Raises:
        orca8k.errors.StageInputMissing: no model at `layout.model` (run `orca8k train`).
        orca8k.errors.DataError: the configuration or prompts file is missing or malformed (names file and line).
    """
    from orca8k.layout import repo_file
    from orca8k.sampling.loading import load_local_model
    from orca8k.sampling.report import sample_reports, write_report_set
    from orca8k.sampling.schema import load_configuration, load_prompts

    layout = Layout.from_config(cfg)
    s = cfg.sampling
    configuration = load_configuration(repo_file(s.config_file))
    prompts = load_prompts(repo_file(s.prompts_file))
    model, tokenizer = load_local_model(
        layout.model, dtype=s.dtype, device=s.device, attn_implementation=cfg.model.attn_implementation
    )
    args = {
        "model": str(layout.model),
        "config_file": s.config_file,
        "prompts_file": s.prompts_file,
        "mode": s.mode,
        "num_samples": s.num_samples,
        "max_new_tokens": s.max_new_tokens,
        "batch_size": s.batch_size,
        "compact_every": s.compact_every,
        "skip_special_tokens": s.skip_special_tokens,
        "dtype": s.dtype,
        "device": s.device,
        "seed": cfg.seed,
        "n": len(prompts),
    }
    report_set = sample_reports(
        model, tokenizer, configuration, prompts,
        model_name=s.model_name, mode=s.mode, num_samples=s.num_samples, max_new_tokens=s.max_new_tokens,
        batch_size=s.batch_size, compact_every=s.compact_every, skip_special_tokens=s.skip_special_tokens, seed=cfg.seed,
        args=args,
    )
    written = write_report_set(
        report_set, layout.sampling_reports, summary_path=layout.sampling_summary, index_path=layout.sampling_index
    )
    from orca8k.sampling.report import summarize

    summary = summarize(report_set)
    return StageResult(
        stage="sampling-report",
        outputs=written,
        summary={k: summary[k] for k in ("prompts", "outputs", "empty_outputs", "proper_end_rate")},
    )
