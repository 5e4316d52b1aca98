"""Derived, scalar columns of the mix (CONTRACTS.md §1) that the mix suite's built-in expectations check.

The mix rows hold nested `messages` and long `text`; Great Expectations checks them best through one scalar column
per rule, whose failing values and row ids then appear in the result and in Data Docs. Everything is computed with
pyarrow kernels and numpy over the flattened messages (no Python loop per row), so a seed-size mix (hundreds of
thousands of rows, gigabytes of text) derives in seconds.

Per row (`derive_rows`):
    id, source, doc_id, kind, chunk_index, split       copied
    n_messages          len(messages); NaN when messages is null
    roles               the roles joined by ',' (`system,user,assistant`), a null role as `<null>`; null when
                        messages is null
    n_turns             assistant replies (a turn = a user message and its reply)
    null_contents       messages whose content is null
    shortest_turn_chars shortest user/assistant content (chars); NaN when there is none
    longest_turn_chars  longest content of any message, system included (chars); NaN when there is none
    text_chars          len(text); NaN when text is null
    content_hash        16 hex of a 64-bit hash of the content (messages with their roles, else text)
    special_tokens      special-token strings found in the raw content (all tokens together)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from orca8k.model.tokenizer import ASSISTANT, BOS, EOS, PREFIX_BEGIN, PREFIX_END, PROMPTER, SYSTEM

# the strings that are special tokens in the OA format; found in raw text they are reported (the tokenizer keeps
# them plain text, see orca8k.data.chat_format), never a failure
SPECIAL_TOKEN_STRINGS = (SYSTEM, PROMPTER, ASSISTANT, BOS, EOS, PREFIX_BEGIN, PREFIX_END)

CONTRACT_COLUMNS: dict[str, pa.DataType] = {
    "id": pa.string(),
    "source": pa.string(),
    "doc_id": pa.string(),
    "kind": pa.string(),
    "messages": pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
    "text": pa.string(),
    "chunk_index": pa.int32(),
}
COPIED_COLUMNS = ("id", "source", "doc_id", "kind", "chunk_index")
_UNIT_SEP, _RECORD_SEP = "\x1f", "\x1e"


def canonical_type(t: pa.DataType) -> str:
    """An Arrow type as a string, large/view string and list variants folded (`large_string` → `string`)."""
    s = str(t)
    for a, b in (("large_string", "string"), ("string_view", "string"), ("large_list", "list")):
        s = s.replace(a, b)
    return s.replace("list<element:", "list<item:")


def schema_frame(schema: pa.Schema) -> pd.DataFrame:
    """One row per contract column: `column`, `expected_type`, `actual_type` (None when the column is missing)."""
    rows = []
    for name, expected in CONTRACT_COLUMNS.items():
        idx = schema.get_field_index(name)
        actual = canonical_type(schema.field(idx).type) if idx >= 0 else None
        rows.append({"column": name, "expected_type": canonical_type(expected), "actual_type": actual})
    return pd.DataFrame(rows, columns=["column", "expected_type", "actual_type"]).astype(object)


def _column(table: pa.Table, name: str, dtype: pa.DataType) -> pa.Array:
    """The column as one array of the contract type; all nulls when the table lacks it or it cannot be cast (the
    schema check reports both)."""
    if name not in table.column_names:
        return pa.nulls(table.num_rows, type=dtype)
    array = table.column(name).combine_chunks()
    if array.type == dtype:
        return array
    try:
        return array.cast(dtype)  # large_string → string and the like
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.nulls(table.num_rows, type=dtype)


def _per_row(parent: np.ndarray, values: np.ndarray, n_rows: int, how: str) -> np.ndarray:
    """Reduce flattened per-message `values` to one float per row (`sum`, `min` or `max`; NaN for no value)."""
    if how == "sum":
        return np.bincount(parent, weights=values, minlength=n_rows).astype(float)
    out = np.full(n_rows, np.nan)
    if len(values):
        reduced = pd.Series(values, dtype=float).groupby(parent).agg(how)
        out[reduced.index.to_numpy()] = reduced.to_numpy()
    return out


def _hash_hex(strings: pa.Array) -> list[str | None]:
    """16 hex of pandas' 64-bit hash of each string (None for null)."""
    values = strings.to_numpy(zero_copy_only=False)
    mask = pd.isna(values)
    hashes = pd.util.hash_array(np.where(mask, "", values).astype(object), categorize=False)
    return [None if m else f"{h:016x}" for h, m in zip(hashes.tolist(), mask.tolist(), strict=True)]


def derive_rows(table: pa.Table, split: str) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The derived scalar frame of one slice of the mix (see the module docstring), and per-row special-token counts.

    Args:
        table: rows in the contract schema (missing columns read as nulls).
        split: `train` or `val`, written into the `split` column.

    Returns:
        `(frame, token_counts)`: `frame` has one row per input row in input order; `token_counts[token]` is an int
        array of that token string's occurrences per row (text and every message content).
    """
    n = table.num_rows
    frame: dict[str, Any] = {}
    for name in COPIED_COLUMNS:
        frame[name] = _column(table, name, CONTRACT_COLUMNS[name]).to_numpy(zero_copy_only=False)
    frame["split"] = np.full(n, split, dtype=object)

    messages = _column(table, "messages", CONTRACT_COLUMNS["messages"])
    lengths = pc.list_value_length(messages)
    has_messages = lengths.is_valid().to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(messages)
    parent = pc.list_parent_indices(messages).to_numpy(zero_copy_only=False).astype(np.int64)
    roles = pc.fill_null(pc.struct_field(flat, "role"), "<null>")
    contents = pc.struct_field(flat, "content")
    content_chars = pc.utf8_length(contents).to_numpy(zero_copy_only=False)  # NaN where null
    offsets = np.concatenate([[0], np.cumsum(pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False))]).astype(np.int32)
    role_lists = pa.ListArray.from_arrays(pa.array(offsets), roles)
    roles_joined = pc.binary_join(role_lists, ",").to_numpy(zero_copy_only=False).astype(object)

    role_np = roles.to_numpy(zero_copy_only=False)
    content_null = pc.is_null(contents).to_numpy(zero_copy_only=False)
    turn = (role_np != "system") & ~content_null
    frame["n_messages"] = np.where(has_messages, pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False), np.nan)
    frame["roles"] = np.where(has_messages, roles_joined, None)
    frame["n_turns"] = _per_row(parent, (role_np == "assistant").astype(float), n, "sum")
    frame["null_contents"] = _per_row(parent, content_null.astype(float), n, "sum")
    frame["shortest_turn_chars"] = _per_row(parent[turn], content_chars[turn].astype(float), n, "min")
    frame["longest_turn_chars"] = _per_row(parent[~content_null], content_chars[~content_null].astype(float), n, "max")
    for col in ("n_turns", "null_contents"):
        frame[col] = np.where(has_messages, frame[col], np.nan)

    text = _column(table, "text", CONTRACT_COLUMNS["text"])
    frame["text_chars"] = pc.utf8_length(text).to_numpy(zero_copy_only=False).astype(float)

    # content: each message as role<US>content, joined with <RS>; text rows use the text
    flat_strings = pc.binary_join_element_wise(roles, pc.fill_null(contents, ""), _UNIT_SEP)
    chat_strings = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), flat_strings), _RECORD_SEP)
    content = pc.if_else(pa.array(has_messages), chat_strings, text)
    frame["content_hash"] = _hash_hex(content)

    token_counts: dict[str, np.ndarray] = {}
    for token in SPECIAL_TOKEN_STRINGS:
        in_messages = pc.fill_null(pc.count_substring(contents, token), 0).to_numpy(zero_copy_only=False)
        in_text = pc.fill_null(pc.count_substring(text, token), 0).to_numpy(zero_copy_only=False)
        token_counts[token] = np.bincount(parent, weights=in_messages, minlength=n).astype(np.int64) + in_text
    frame["special_tokens"] = sum(token_counts.values()) if token_counts else np.zeros(n, dtype=np.int64)
    return pd.DataFrame(frame).astype({"id": object, "source": object, "doc_id": object, "kind": object}), token_counts


def with_split_counts(rows: pd.DataFrame) -> pd.DataFrame:
    """The global frame: `id, source, doc_id, chunk_index, split, content_hash` plus
    `doc_splits` (splits holding the row's (source, doc_id); NaN for a null doc_id) and
    `content_splits` (splits holding the row's content_hash)."""
    out = rows[["id", "source", "doc_id", "chunk_index", "split", "content_hash"]].copy()
    out["doc_splits"] = out.groupby(["source", "doc_id"], dropna=True)["split"].transform("nunique").astype(float)
    out["content_splits"] = out.groupby("content_hash", dropna=True)["split"].transform("nunique").astype(float)
    return out


def special_token_report(
    rows: pd.DataFrame, token_counts: dict[str, np.ndarray], sources: Iterable[str], max_examples: int = 5
) -> dict[str, Any]:
    """Special-token strings found in raw content, per source: counts per token, rows holding any, example ids.

    Args:
        rows: the derived frame (both splits), aligned with `token_counts`.
        token_counts: per-row counts per token string (from `derive_rows`, concatenated in the same order).
        sources: the sources to report (params order); a source with no rows reports zeros.
    """
    report: dict[str, Any] = {}
    for source in sources:
        mask = (rows["source"] == source).to_numpy()
        counts = {t: int(c[mask].sum()) for t, c in token_counts.items()}
        holding = rows.loc[mask & (rows["special_tokens"] > 0).to_numpy(), "id"]
        report[source] = {
            "counts": counts,
            "total": int(sum(counts.values())),
            "rows_with_special_tokens": int(len(holding)),
            "rows": int(mask.sum()),
            "example_ids": [str(i) for i in holding.head(max_examples)],
        }
    return report
