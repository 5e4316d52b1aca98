"""Stage `mix`: the three sources → a seeded, documented train/val mix.

Reads `paths.data` (one local snapshot per source), writes `layout.mix_train` / `layout.mix_val` (parquet,
`orca8k.data.mix_output.MIX_SCHEMA`), `layout.mix_manifest`, `layout.mix_quarantine` and the DVC metrics
`layout.mix_metrics`. Semantics: `orca8k.data.mixing` (hold out by document, chunk, draw rows without
replacement, keyed-hash seeded). Two streaming passes per source, so memory stays flat in the data size apart
from a per-document index of ~40 bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from orca8k.config import Config, DataConfig
from orca8k.data.mix_output import MIX_SCHEMA, ParquetSink, QuarantineWriter, emit_source
from orca8k.data.mixing import SourceIndex, SourcePlan, index_source, plan_source
from orca8k.data.readers import file_sha256
from orca8k.data.sources import source_path
from orca8k.errors import DataError, StageInputMissing
from orca8k.layout import Layout
from orca8k.stages import StageResult

MANIFEST_VERSION = 1


def run(cfg: Config) -> StageResult:
    """Build the mix from the local source snapshots.

    Returns:
        `StageResult` with the five outputs and the train/val row counts per source.

    Raises:
        StageInputMissing: `paths.data` does not exist (run `orca8k demo-data` or `orca8k fetch-data`).
        DataError: a source is empty, lacks its required field in every row, has more quarantined rows than
            `data.max_reject_fraction`, has fewer than 2 usable documents, or changed during the run; the message
            names the source, the file and the field. The quarantine file is still written.
    """
    layout = Layout.from_config(cfg)
    if not layout.data.is_dir():
        raise StageInputMissing(
            f"{layout.data}: no source data (paths.data). Run `orca8k demo-data` for the demo, or "
            f"`orca8k fetch-data --params <recipe>` for the hub sources."
        )
    layout.mix.mkdir(parents=True, exist_ok=True)
    layout.metrics.mkdir(parents=True, exist_ok=True)
    finals = [layout.mix_train, layout.mix_val, layout.mix_manifest, layout.mix_quarantine, layout.mix_metrics]
    tmp = {p: p.with_name(f".{p.name}.tmp") for p in finals}
    quarantine = QuarantineWriter(tmp[layout.mix_quarantine])
    try:
        indexes = _index_all(cfg, layout, quarantine)
        quarantine.close()
        manifest = _write_mix(cfg, layout, indexes, tmp, quarantine.rows)
    except BaseException:
        quarantine.close()
        os.replace(tmp[layout.mix_quarantine], layout.mix_quarantine)  # kept: it explains the failure
        for p in finals:
            if p != layout.mix_quarantine:
                tmp[p].unlink(missing_ok=True)
                p.unlink(missing_ok=True)  # no stale outputs beside a failed run's quarantine
        raise
    for p in finals:
        os.replace(tmp[p], p)
    return StageResult(
        stage="mix",
        outputs={"train": layout.mix_train, "val": layout.mix_val, "manifest": layout.mix_manifest,
                 "quarantine": layout.mix_quarantine, "metrics": layout.mix_metrics},
        summary={
            "train_rows": manifest["totals"]["train"]["rows"],
            "val_rows": manifest["totals"]["val"]["rows"],
            "quarantined_rows": manifest["quarantine"]["malformed"],
            "duplicate_documents": manifest["quarantine"]["duplicates"],
        },
    )


def _index_all(cfg: Config, layout: Layout, quarantine: QuarantineWriter) -> dict[str, SourceIndex]:
    """Pass 1 over every source, with the source-level checks, before anything is written."""
    indexes = {}
    for name, src in cfg.data.sources.items():
        index = index_source(name, src, layout.data, cfg.data.max_row_bytes, quarantine)
        _check_source(index, src_path=source_path(src, layout.data), data=cfg.data, quarantine_file=layout.mix_quarantine)
        indexes[name] = index
        print(
            f"[mix] {name}: read {index.rows_read} rows from {len(index.files)} file(s): {index.quarantined} "
            f"quarantined, {index.duplicates} duplicate(s) dropped, {index.documents} documents",
            flush=True,
        )
    return indexes


def _write_mix(cfg: Config, layout: Layout, indexes: dict[str, SourceIndex], tmp: dict[Path, Path], quarantined: int) -> dict[str, Any]:
    """Plan and emit every source (pass 2), then write the manifest and metrics (to the temp paths)."""
    train, val = ParquetSink(tmp[layout.mix_train]), ParquetSink(tmp[layout.mix_val])
    snapshot = _snapshot(layout)
    sources: dict[str, Any] = {}
    try:
        for name, src in cfg.data.sources.items():
            try:
                plan = plan_source(indexes[name], src, cfg.seed, cfg.data.val_split)
            except ValueError as err:
                raise DataError(f"source '{name}' ({source_path(src, layout.data)}): {err}") from None
            ids = emit_source(plan, src.max_chunk_size, train, val)
            sources[name] = _source_manifest(plan, src.model_dump(mode="json"), ids, snapshot.get(name))
            print(
                f"[mix] {name}: {plan.train.documents_held} train / {plan.val.documents_held} val documents → "
                f"{plan.train.rows} train rows (of {plan.train.chunks}), {plan.val.rows} val rows (of {plan.val.chunks})",
                flush=True,
            )
            if src.expected_train_rows is not None and src.expected_train_rows != plan.train.rows:
                print(f"[mix] {name}: note: {plan.train.rows} train rows; the card's count is {src.expected_train_rows}", flush=True)
    finally:
        train.close()
        val.close()
    outputs = {
        "train": {"file": layout.mix_train.name, "rows": train.rows, "sha256": file_sha256(train.path)},
        "val": {"file": layout.mix_val.name, "rows": val.rows, "sha256": file_sha256(val.path)},
    }
    manifest = _manifest(cfg, sources, {"file": layout.mix_quarantine.name, "rows": quarantined}, outputs)
    tmp[layout.mix_manifest].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp[layout.mix_metrics].write_text(json.dumps(_metrics(manifest), indent=2) + "\n", encoding="utf-8")
    return manifest


def _check_source(index: SourceIndex, src_path: Path, data: DataConfig, quarantine_file: Path) -> None:
    """The source-level failures (see `run`)."""
    where = f"source '{index.name}' ({src_path})"
    if not index.files:
        raise DataError(f"{where}: no .json/.jsonl/.parquet files")
    files = ", ".join(f.file for f in index.files)
    if index.rows_read == 0:
        raise DataError(f"{where}: empty — no rows in {files}")
    if index.missing_required == index.rows_read:
        raise DataError(f"{where}: field '{index.required_field}' is missing in every row of {files}")
    share = index.quarantined / index.rows_read
    if share > data.max_reject_fraction:
        top = sorted(index.reasons.items(), key=lambda kv: -kv[1])[:3]
        reasons = "; ".join(f"{n} × {r}" for r, n in top)
        raise DataError(
            f"{where}: {index.quarantined} of {index.rows_read} rows quarantined ({share:.2%}), more than "
            f"data.max_reject_fraction={data.max_reject_fraction}; top reasons: {reasons}. See {quarantine_file}"
        )


def _snapshot(layout: Layout) -> dict[str, Any]:
    """Per-source entries of the fetch snapshot (`layout.data_snapshot`), when the data came from the hub."""
    if layout.data_snapshot.is_file():
        return json.loads(layout.data_snapshot.read_text(encoding="utf-8")).get("sources", {})
    return {}


def _split_manifest(sp: Any, ids_sha256: str) -> dict[str, Any]:
    return {
        "rows": sp.rows,
        "documents": int(len(np.unique(sp.doc))),
        "characters": int(sp.chars.sum()),
        "chunks": sp.chunks,
        "documents_held": sp.documents_held,
        "chunked_rows": int((sp.chunk_index > 0).sum()),
        "ids_sha256": ids_sha256,
        "draw": sp.draw,
    }


def _source_manifest(plan: SourcePlan, params: dict[str, Any], ids: dict[str, str], snapshot: dict[str, Any] | None) -> dict[str, Any]:
    index = plan.index
    inputs = [{"file": f.file, "bytes": f.bytes, "sha256": f.sha256, "rows": f.rows, "position": f.position_key} for f in index.files]
    return {
        "format": index.format,
        "kind": index.kind,
        "params": params,
        "inputs": {"files": inputs, "sha256": _sha256_json([[f["file"], f["sha256"]] for f in inputs])},
        "snapshot": snapshot,
        "read": {
            "rows": index.rows_read,
            "quarantined": index.quarantined,
            "quarantine_reasons": index.reasons,
            "reject_fraction": round(index.quarantined / index.rows_read, 6),
            "duplicates": index.duplicates,
            "documents": index.documents,
            "characters": int(index.chars.sum()),
            "chunks": int(plan.chunk_counts.sum()),
        },
        "split": plan.split,
        "train": _split_manifest(plan.train, ids["train"]),
        "val": _split_manifest(plan.val, ids["val"]),
        "expected_train_rows": params.get("expected_train_rows"),
    }


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _manifest(cfg: Config, sources: dict[str, Any], quarantine: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    quarantine = {
        **quarantine,
        "malformed": sum(s["read"]["quarantined"] for s in sources.values()),
        "duplicates": sum(s["read"]["duplicates"] for s in sources.values()),
    }
    totals = {
        split: {
            "rows": sum(s[split]["rows"] for s in sources.values()),
            "documents": sum(s[split]["documents"] for s in sources.values()),
            "characters": sum(s[split]["characters"] for s in sources.values()),
        }
        for split in ("train", "val")
    }
    return {
        "format_version": MANIFEST_VERSION,
        "params": {"seed": cfg.seed, "data": cfg.to_dict()["data"]},
        "semantics": (
            "per source: quarantine malformed rows, drop exact duplicate documents; hold out "
            "ceil(val_split x documents) documents (keyed hash); chunk text into max_chunk_size characters; "
            "val rows = min(rows, max_val_set), train rows = max(1, floor(fraction x rows)), both drawn without "
            "replacement (keyed hash); rows ordered by source, input order, chunk_index"
        ),
        "schema": {f.name: str(f.type) for f in MIX_SCHEMA},
        "sources": sources,
        "totals": totals,
        "quarantine": quarantine,
        "outputs": outputs,
    }


def _metrics(manifest: dict[str, Any]) -> dict[str, Any]:
    """DVC metrics: totals and, per source, rows / documents / characters per split and the reject counts."""
    per_source = {}
    for name, s in manifest["sources"].items():
        per_source[name] = {
            "train_rows": s["train"]["rows"],
            "val_rows": s["val"]["rows"],
            "train_documents": s["train"]["documents"],
            "val_documents": s["val"]["documents"],
            "train_chars": s["train"]["characters"],
            "val_chars": s["val"]["characters"],
            "quarantined_rows": s["read"]["quarantined"],
            "duplicate_documents": s["read"]["duplicates"],
            "reject_fraction": s["read"]["reject_fraction"],
        }
    t = manifest["totals"]
    return {
        "train_rows": t["train"]["rows"],
        "val_rows": t["val"]["rows"],
        "train_chars": t["train"]["characters"],
        "val_chars": t["val"]["characters"],
        "quarantined_rows": manifest["quarantine"]["malformed"],
        "duplicate_documents": manifest["quarantine"]["duplicates"],
        "sources": per_source,
    }
