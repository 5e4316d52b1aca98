"""Stage `validate`: Great Expectations on the sampled mix, before anything is trained on it.

Reads `layout.mix_train`, `layout.mix_val` and `layout.mix_manifest`; runs the mix suite
(`orca8k.validation.mix_suite`) through the shared harness; writes `layout.validation_result` (JSON: `success`,
`run_id`, statistics, the failing checks with example ids, every check, special-token counts per source, input
hashes) and the Data Docs site under `layout.data_docs`; prints a short summary. On failure the result JSON and Data
Docs are written first, then `ValidationFailed` is raised: the CLI exits 1, so `dvc repro` (which records no
outputs of a failed stage) and the Prefect flow stop before training.

Params read: `validate.*`, `data.sources.<name>.format`, `.fraction`, `.max_val_set` (dvc.yaml lists exactly these).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from orca8k.config import Config
from orca8k.errors import StageInputMissing
from orca8k.layout import Layout
from orca8k.stages import StageResult


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dotted(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data[part]
    return data


def _format_special_tokens(report: dict[str, Any]) -> list[str]:
    lines = ["[validate] special-token strings in raw text (reported, not a failure):"]
    for source, info in report.items():
        found = {t: n for t, n in info["counts"].items() if n}
        detail = ", ".join(f"{t} ×{n}" for t, n in found.items()) if found else "none"
        lines.append(f"[validate]   {source}: {detail} ({info['rows_with_special_tokens']} of {info['rows']} rows)")
    return lines


def params_read(cfg: Config) -> list[str]:
    """The dotted params keys this stage reads (dvc.yaml's `params:` for `validate` lists exactly these)."""
    keys = ["validate"]
    for name in cfg.data.sources:
        keys += [f"data.sources.{name}.{k}" for k in ("format", "fraction", "max_val_set")]
    return keys


def run(cfg: Config) -> StageResult:
    """Validate the mix; write the result JSON and Data Docs; raise if any check failed.

    Args:
        cfg: the config (`paths.mix`, `paths.validation`, `validate.*`, `data.sources.*`).

    Returns:
        `StageResult` with outputs `validation_result` and `data_docs`, and summary `success`, `run_id`,
        `checks`, `failed_checks`, `rows`, and timings: `validation_seconds` (all but imports), `import_seconds`
        (Great Expectations ≈ 4–9 s), `read_derive_seconds`, `checks_seconds`, `data_docs_seconds`.

    Raises:
        StageInputMissing: a mix file is missing (run `orca8k mix` first).
        DataError: a parquet file or the manifest cannot be read (names the file).
        ValidationFailed: any check failed; the message names the checks, batches and example ids. The result
            JSON and Data Docs are written before it is raised.
    """
    layout = Layout.from_config(cfg)
    for path in (layout.mix_train, layout.mix_val, layout.mix_manifest):
        if not path.is_file():
            raise StageInputMissing(f"{path}: not found; run `orca8k mix` first")

    start = time.perf_counter()
    from orca8k.validation import run_validation
    from orca8k.validation.mix_suite import build_mix_batches, read_manifest

    import_seconds = time.perf_counter() - start
    manifest = read_manifest(layout.mix_manifest)
    derive_start = time.perf_counter()
    mix = build_mix_batches(cfg, layout.mix_train, layout.mix_val, manifest)
    derive_seconds = time.perf_counter() - derive_start
    report = run_validation(mix.batches, run_name="mix", data_docs_dir=layout.data_docs)
    extra = {
        "rows": mix.rows,
        "special_tokens": mix.special_tokens,
        "inputs": {p.name: {"sha256": _sha256(p)} for p in (layout.mix_train, layout.mix_val, layout.mix_manifest)},
        "params": {key: _dotted(cfg.to_dict(), key) for key in params_read(cfg)},
    }
    report.write_json(layout.validation_result, extra=extra)
    seconds = time.perf_counter() - start

    for line in _format_special_tokens(mix.special_tokens):
        print(line)
    print(f"[validate] {seconds:.1f} s (imports {import_seconds:.1f} s); result: {layout.validation_result}")
    if report.success:  # on failure the same summary is the message of ValidationFailed (printed by the CLI)
        for line in report.summary().splitlines():
            print(f"[validate] {line}")
    report.raise_for_failure(f"the mix ({layout.mix})")
    return StageResult(
        stage="validate",
        outputs={"validation_result": layout.validation_result, "data_docs": layout.data_docs / "index.html"},
        summary={
            "success": report.success,
            "run_id": report.run_id,
            "checks": len(report.checks),
            "failed_checks": len(report.failures()),
            "rows": sum(sum(s.values()) for s in mix.rows.values()),
            "validation_seconds": round(seconds - import_seconds, 2),
            "import_seconds": round(import_seconds, 2),
            "read_derive_seconds": round(derive_seconds, 2),
            **{k: round(v, 2) for k, v in report.timings.items()},
        },
    )
