"""The mix suite: what the `validate` stage checks on the sampled mix (issue 4), as built-in GX expectations on the
derived columns of `orca8k.validation.mix_frames`.

Batches and suites (every check appears in Data Docs under its name):

- `schema.train`, `schema.val` (suite `mix.schema`): every contract column present with its type.
- `<source>.<split>` for every source in `data.sources` and both splits (suite `mix.<source>`): at least
  `validate.min_rows` rows (a missing source gives an empty batch, which fails); required fields non-null and
  non-empty; `kind` matches the source's format; chat rows: roles alternate user/assistant after an optional
  leading system message, at least one turn, no null or empty user/assistant content, every message within
  `validate.max_turn_chars`; text rows: text within `[validate.min_text_chars, validate.max_text_chars]`;
  duplicate content under `validate.max_duplicate_fraction`.
- `all` (suite `mix.all`, both splits): sources are the params' sources, ids unique, no (source, doc_id) in both
  splits, (source, doc_id, chunk_index) unique, content shared by the two splits under the duplicate bound.
- `manifest` (suite `mix.manifest`, one row per source and split): the manifest's row counts equal the parquet
  files', the realised train fraction is within `validate.fraction_tolerance` of `data.sources.<s>.fraction`, and
  the val size within the same relative tolerance of `min(max_val_set, val rows available)`.

Special-token strings in raw text are counted per source and reported (never a failure).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orca8k.config import Config, SourceConfig, ValidateConfig
from orca8k.errors import DataError
from orca8k.validation.harness import Batch, Check, Suite
from orca8k.validation.mix_frames import (
    CONTRACT_COLUMNS,
    derive_rows,
    schema_frame,
    special_token_report,
    with_split_counts,
)

SPLITS = ("train", "val")
READ_BATCH_ROWS = 1024  # rows per record batch read (≤ 1024 × 65,535 chars of text in memory at a time)
ROLES_REGEX = r"^(?:system)?(?:(?:^|,)user,assistant)*$"
# manifest["sources"][name][split][...] (written by the mix stage): rows written, and the rows (chunks of the split's
# documents) available before the val cap / the train fraction draw
MANIFEST_ROWS_KEY = "rows"
MANIFEST_AVAILABLE_KEY = "chunks"


# ----------------------------------------------------------------------------------------------------- suites
def _required(column: str, what: str) -> list[Check]:
    return [
        Check(f"{column}_not_null", gxe.ExpectColumnValuesToNotBeNull(column=column), f"{what} is never null"),
        Check(
            f"{column}_not_empty",
            gxe.ExpectColumnValueLengthsToBeBetween(column=column, min_value=1),
            f"{what} is never an empty string",
        ),
    ]


def _duplicates(v: ValidateConfig) -> Check:
    return Check(
        "duplicate_rate",
        gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(column="content_hash", min_value=1 - v.max_duplicate_fraction),
        f"duplicate content (content_hash) at most validate.max_duplicate_fraction = {v.max_duplicate_fraction} "
        "of the rows (unique share ≥ 1 − bound)",
    )


def source_suite(name: str, source: SourceConfig, v: ValidateConfig) -> Suite:
    """Checks for one source's rows (shared by its train and val batches); chat or text checks by its format."""
    kind = "chat" if source.is_chat else "text"
    checks = [*_required("id", "id"), *_required("doc_id", "doc_id"), *_required("kind", "kind")]
    checks.append(
        Check("kind_matches_format", gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=[kind]),
              f"kind is {kind!r} (data.sources.{name}.format = {source.format})")
    )
    checks.append(Check("chunk_index_not_null", gxe.ExpectColumnValuesToNotBeNull(column="chunk_index"),
                        "chunk_index is never null"))
    if source.is_chat:
        checks += [
            Check("chunk_index_zero", gxe.ExpectColumnValuesToBeInSet(column="chunk_index", value_set=[0]),
                  "chunk_index is 0 (chat rows are never chunked)"),
            Check("messages_not_null", gxe.ExpectColumnValuesToNotBeNull(column="n_messages"),
                  "messages is never null (n_messages = len(messages))"),
            Check("no_text_on_chat_rows", gxe.ExpectColumnValuesToBeNull(column="text_chars"),
                  "text is null on chat rows (text_chars = len(text))"),
            Check("roles_alternate", gxe.ExpectColumnValuesToMatchRegex(column="roles", regex=ROLES_REGEX),
                  "roles are an optional leading system message, then user/assistant pairs, ending with assistant "
                  f"(roles = the roles joined by ',' must match {ROLES_REGEX})"),
            Check("at_least_one_turn", gxe.ExpectColumnValuesToBeBetween(column="n_turns", min_value=1),
                  "at least 1 turn (n_turns = assistant replies ≥ 1)"),
            Check("contents_not_null", gxe.ExpectColumnValuesToBeBetween(column="null_contents", max_value=0),
                  "no message content is null (null_contents = 0)"),
            Check("turns_not_empty", gxe.ExpectColumnValuesToBeBetween(column="shortest_turn_chars", min_value=1),
                  "no user/assistant content is empty (shortest_turn_chars ≥ 1; an empty system prompt is allowed)"),
            Check("turn_chars_max",
                  gxe.ExpectColumnValuesToBeBetween(column="longest_turn_chars", max_value=v.max_turn_chars),
                  f"every message within validate.max_turn_chars = {v.max_turn_chars} chars (longest_turn_chars)"),
        ]
    else:
        checks += [
            Check("chunk_index_non_negative", gxe.ExpectColumnValuesToBeBetween(column="chunk_index", min_value=0),
                  "chunk_index ≥ 0"),
            Check("text_not_null", gxe.ExpectColumnValuesToNotBeNull(column="text_chars"),
                  "text is never null (text_chars = len(text))"),
            Check("no_messages_on_text_rows", gxe.ExpectColumnValuesToBeNull(column="n_messages"),
                  "messages is null on text rows (n_messages = len(messages))"),
            Check("text_not_empty", gxe.ExpectColumnValuesToBeBetween(column="text_chars", min_value=1),
                  "text is never an empty string (text_chars ≥ 1)"),
            Check("text_chars_within_bounds",
                  gxe.ExpectColumnValuesToBeBetween(column="text_chars", min_value=v.min_text_chars,
                                                    max_value=v.max_text_chars),
                  f"text length within [validate.min_text_chars, validate.max_text_chars] = "
                  f"[{v.min_text_chars}, {v.max_text_chars}] chars"),
        ]
    checks.append(_duplicates(v))
    return Suite(f"mix.{name}", tuple(checks), min_rows=v.min_rows)


def global_suite(cfg: Config) -> Suite:
    """Checks across both splits and all sources."""
    v = cfg.validate_
    names = list(cfg.data.sources)
    checks = (
        Check("source_not_null", gxe.ExpectColumnValuesToNotBeNull(column="source"), "source is never null"),
        Check("source_in_params", gxe.ExpectColumnValuesToBeInSet(column="source", value_set=names),
              f"source is one of data.sources: {names}"),
        Check("id_unique", gxe.ExpectColumnValuesToBeUnique(column="id"), "id is unique across both splits"),
        Check("doc_in_one_split", gxe.ExpectColumnValuesToBeInSet(column="doc_splits", value_set=[1]),
              "no (source, doc_id) in both splits (doc_splits = splits holding the row's document = 1)"),
        Check("chunk_unique",
              gxe.ExpectCompoundColumnsToBeUnique(column_list=["source", "doc_id", "chunk_index"]),
              "(source, doc_id, chunk_index) is unique across both splits"),
        Check("cross_split_duplicates",
              gxe.ExpectColumnValuesToBeInSet(column="content_splits", value_set=[1],
                                              mostly=1 - v.max_duplicate_fraction),
              "content found in both splits (content_splits = 2) on at most validate.max_duplicate_fraction = "
              f"{v.max_duplicate_fraction} of the rows"),
    )
    return Suite("mix.all", checks, min_rows=v.min_rows)


def manifest_suite(v: ValidateConfig) -> Suite:
    """Checks of the manifest's counts and of the realised fraction / val sizes against the params."""
    tol = v.fraction_tolerance
    checks = (
        Check("manifest_lists_split", gxe.ExpectColumnValuesToNotBeNull(column="manifest_rows"),
              f"the manifest has sources.<source>.<split>.{MANIFEST_ROWS_KEY} for every source and split"),
        Check("manifest_rows_match", gxe.ExpectColumnPairValuesToBeEqual(column_A="rows", column_B="manifest_rows"),
              "the manifest's row count equals the rows in the parquet file (rows = manifest_rows)"),
        Check("manifest_available_rows", gxe.ExpectColumnValuesToNotBeNull(column="available_rows"),
              f"the manifest has sources.<source>.<split>.{MANIFEST_AVAILABLE_KEY} (available_rows: rows before "
              "the val cap / the train fraction draw)"),
        Check("train_fraction",
              gxe.ExpectColumnValuesToBeBetween(column="fraction_error", min_value=0, max_value=tol),
              "realised train fraction (rows / available_rows) within validate.fraction_tolerance = "
              f"{tol} of data.sources.<source>.fraction, one row of rounding allowed "
              "(fraction_error = max(0, |realised − fraction| − 1 / available_rows))"),
        Check("val_size",
              gxe.ExpectColumnValuesToBeBetween(column="val_size_error", min_value=0, max_value=tol),
              "val rows within a relative validate.fraction_tolerance = "
              f"{tol} of min(data.sources.<source>.max_val_set, available_rows) (val_size_error)"),
    )
    return Suite("mix.manifest", checks, min_rows=None)  # one row per params source and split: never empty


def schema_suite() -> Suite:
    """Checks of the parquet schema against the contract (CONTRACTS.md §1)."""
    checks = (
        Check("column_present", gxe.ExpectColumnValuesToNotBeNull(column="actual_type"),
              f"every contract column is present: {list(CONTRACT_COLUMNS)}"),
        Check("column_type", gxe.ExpectColumnPairValuesToBeEqual(column_A="actual_type", column_B="expected_type"),
              "every contract column has its contract type (large/view variants folded)"),
    )
    return Suite("mix.schema", checks, min_rows=None)  # one row per contract column: never empty


# ----------------------------------------------------------------------------------------------------- frames
def _derive_split(path: Path, split: str, names: list[str]) -> tuple[dict[str | None, list], pa.Schema]:
    """Stream one parquet file in record batches of `READ_BATCH_ROWS` rows and derive each source's rows.

    Returns:
        `({source or None: [(frame, token_counts), ...]}, schema)`; None collects rows whose source is null or not
        in `names` (or every row, when the file has no `source` column).

    Raises:
        DataError: the file cannot be read (names it).
    """
    parts: dict[str | None, list] = {name: [] for name in [*names, None]}
    try:
        reader = pq.ParquetFile(path)
        schema = reader.schema_arrow
        has_source = schema.get_field_index("source") >= 0
        for record_batch in reader.iter_batches(batch_size=READ_BATCH_ROWS):
            table = pa.Table.from_batches([record_batch])
            if not has_source:
                parts[None].append(derive_rows(table, split))
                continue
            source = table.column("source")
            for name in names:
                picked = table.filter(pc.fill_null(pc.equal(source, name), False))
                if picked.num_rows:
                    parts[name].append(derive_rows(picked, split))
            other = table.filter(pc.invert(pc.fill_null(pc.is_in(source, pa.array(names, pa.string())), False)))
            if other.num_rows:
                parts[None].append(derive_rows(other, split))
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: cannot read the parquet file: {err}") from None
    return parts, schema


def _concat(parts: list, split: str) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """One frame and token counts from a list of derived pieces (an empty frame of the right columns if none)."""
    if not parts:
        empty = pa.table({n: pa.array([], t) for n, t in CONTRACT_COLUMNS.items()})
        return derive_rows(empty, split)
    frame = pd.concat([p[0] for p in parts], ignore_index=True)
    counts = {t: np.concatenate([p[1][t] for p in parts]) for t in parts[0][1]}
    return frame, counts


def _manifest_entry(manifest: dict[str, Any], source: str, split: str) -> dict[str, Any]:
    entry = manifest.get("sources", {}).get(source, {}) if isinstance(manifest.get("sources"), dict) else {}
    entry = entry.get(split) if isinstance(entry, dict) else None
    return entry if isinstance(entry, dict) else {}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def manifest_frame(cfg: Config, manifest: dict[str, Any], rows: dict[tuple[str, str], int]) -> pd.DataFrame:
    """One row per (source in params, split): rows in the parquet, the manifest's counts, realised fraction and
    val size against the params, and their errors (NaN where a figure is missing or does not apply)."""
    records = []
    for name, src in cfg.data.sources.items():
        for split in SPLITS:
            entry = _manifest_entry(manifest, name, split)
            n = rows.get((name, split), 0)
            available = _number(entry.get(MANIFEST_AVAILABLE_KEY))
            rec: dict[str, Any] = {
                "key": f"{name}.{split}",
                "source": name,
                "split": split,
                "rows": float(n),
                "manifest_rows": _number(entry.get(MANIFEST_ROWS_KEY)),
                "available_rows": available,
                "fraction": src.fraction if split == "train" else math.nan,
                "realised_fraction": math.nan,
                "fraction_error": math.nan,
                "expected_val_rows": math.nan,
                "val_size_error": math.nan,
            }
            if split == "train" and available > 0:
                # one row of rounding (floor, or the mix's minimum of one row) is not an error
                rec["realised_fraction"] = n / available
                rec["fraction_error"] = max(0.0, abs(n / available - src.fraction) - 1.0 / available)
            elif split == "train" and available == 0:
                rec["realised_fraction"] = 0.0
                rec["fraction_error"] = 0.0 if n == 0 else math.inf
            if split == "val" and not math.isnan(available):
                expected = available if src.max_val_set is None else min(src.max_val_set, available)
                rec["expected_val_rows"] = expected
                rec["val_size_error"] = abs(n - expected) / max(expected, 1.0)
            records.append(rec)
    return pd.DataFrame(records)


@dataclass
class MixBatches:
    """What `build_mix_batches` returns: the batches to run, the special-token report and the row counts."""

    batches: list[Batch]
    special_tokens: dict[str, Any]
    rows: dict[str, dict[str, int]]


def build_mix_batches(cfg: Config, train: Path, val: Path, manifest: dict[str, Any]) -> MixBatches:
    """Read the mix (streamed in record batches: memory holds the derived columns, not the text) and build every
    batch.

    Args:
        cfg: the config (`data.sources.*.format/fraction/max_val_set`, `validate.*`).
        train, val: the mix's parquet files.
        manifest: the parsed mix manifest.

    Returns:
        `MixBatches`: batches `schema.<split>`, `<source>.<split>`, `all`, `manifest`; special tokens per source;
        rows per source and split.

    Raises:
        DataError: a parquet file cannot be read.
    """
    v = cfg.validate_
    names = list(cfg.data.sources)
    batches: list[Batch] = []
    derived: list[pd.DataFrame] = []
    token_counts: dict[str, list[np.ndarray]] = {}
    rows: dict[tuple[str, str], int] = {}
    suites = {name: source_suite(name, src, v) for name, src in cfg.data.sources.items()}
    for split, path in zip(SPLITS, (train, val), strict=True):
        parts, schema = _derive_split(path, split, names)
        batches.append(Batch(f"schema.{split}", schema_suite(), schema_frame(schema), id_column="column"))
        for name, pieces in parts.items():
            frame, counts = _concat(pieces, split)
            derived.append(frame)
            for token, c in counts.items():
                token_counts.setdefault(token, []).append(c)
            if name is not None:
                rows[(name, split)] = len(frame)
                batches.append(Batch(f"{name}.{split}", suites[name], frame))
    all_rows = pd.concat(derived, ignore_index=True)
    batches.append(Batch("all", global_suite(cfg), with_split_counts(all_rows)))
    batches.append(Batch("manifest", manifest_suite(v), manifest_frame(cfg, manifest, rows), id_column="key"))
    counts_all = {t: np.concatenate(c) for t, c in token_counts.items()}
    return MixBatches(
        batches=batches,
        special_tokens=special_token_report(all_rows, counts_all, names),
        rows={name: {split: rows.get((name, split), 0) for split in SPLITS} for name in names},
    )


def read_manifest(path: Path) -> dict[str, Any]:
    """The mix manifest as a dict.

    Raises:
        DataError: not JSON, or not an object at the top level (names the file).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read the mix manifest: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the mix manifest must be a JSON object")
    return data
