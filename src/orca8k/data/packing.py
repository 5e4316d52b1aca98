"""Packing tokenized examples into rows of at most `max_length` tokens without cross-contamination.

A packed row is the concatenation of whole examples; `position_ids` restart at 0 at each example. transformers
(5.24, `masking_utils.find_packed_sequence_indices`) reads a restart of `position_ids` as a sequence boundary when
the batch has *no* `attention_mask` and the forward has no cache: the sdpa/eager mask becomes block-diagonal causal,
and flash-attention-2 runs varlen over the same boundaries. Each example's position 0 (`<s>`) is labelled -100
(`orca8k.data.chat_format`), so no example is trained to predict the next one's first token. Together: the loss,
gradients and logits of a packed row equal those of its examples run one by one (tests/test_packing.py).

Rows are planned by best-fit decreasing bin packing (Johnson 1973; deterministic: ties broken by example index),
which fills rows to > 95 % on typical length mixes, far above sequential greedy packing.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa


def plan_bins(lengths: Sequence[int] | np.ndarray, max_length: int) -> list[list[int]]:
    """Best-fit decreasing: group example indices into bins whose total length is at most `max_length`.

    Examples are taken longest first (ties: lower index first); each goes to the fullest bin it fits in, or opens a
    new bin. Inside a bin, indices are in insertion order (longest first).

    Args:
        lengths: tokens per example.
        max_length: capacity of a bin (tokens).

    Returns:
        Bins, each a list of example indices; every index appears exactly once.

    Raises:
        ValueError: an example is longer than `max_length` or not longer than 0.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and (lengths.max() > max_length or lengths.min() <= 0):
        bad = int(np.argmax((lengths > max_length) | (lengths <= 0)))
        raise ValueError(f"example {bad}: length {int(lengths[bad])} is outside 1..max_length={max_length}")
    order = np.lexsort((np.arange(lengths.size), -lengths))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin index), sorted
    for i in order.tolist():
        n = int(lengths[i])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            bins.append([i])
            rest, b = max_length - n, len(bins) - 1
        else:
            rest, b = free.pop(k)
            bins[b].append(i)
            rest -= n
        if rest > 0:
            bisect.insort(free, (rest, b))
    return bins


def pack_table(table: pa.Table, max_length: int, bins: list[list[int]] | None = None) -> pa.Table:
    """Pack the examples of an Arrow table (`input_ids`, `labels` list columns) into rows of ≤ `max_length` tokens.

    Args:
        table: one example per row; `input_ids` and `labels` of equal length per row; an optional `source` (string)
            column; other columns are dropped.
        max_length: tokens per packed row.
        bins: the plan, `plan_bins(lengths, max_length)` computed beforehand (None: computed here); checked to hold
            every example exactly once within `max_length`.

    Returns:
        A table with `input_ids`, `labels`, `position_ids` (`list<int32>`, restarting at 0 at each example) and
        `num_examples` (`int32`), one row per bin of `plan_bins`, in bin order; with a `source` column in `table`,
        also `sources` (`list<string>`: each example's source, in the row's order) for per-source token counts.

    Raises:
        ValueError: `input_ids` and `labels` differ in length somewhere, an example exceeds `max_length`, or `bins`
            is not a plan of these examples.
    """
    import pyarrow as pa

    ids_col, labels_col = (_ListRows(table.column(c)) for c in ("input_ids", "labels"))
    lengths = ids_col.lengths
    if not np.array_equal(lengths, labels_col.lengths):
        raise ValueError("pack_table: input_ids and labels differ in length in some row")
    if bins is None:
        bins = plan_bins(lengths, max_length)
    flat = np.fromiter((i for b in bins for i in b), dtype=np.int64)
    per_bin = np.array([len(b) for b in bins], dtype=np.int64)
    if flat.size != lengths.size or not np.array_equal(np.sort(flat), np.arange(lengths.size)) or \
            (per_bin.size and per_bin.min() == 0):
        raise ValueError("pack_table: the bins do not hold every example exactly once (and no bin is empty)")
    # the examples in bin order, concatenated: one copy of the values
    packed_ids, packed_labels = ids_col.gather(flat), labels_col.gather(flat)
    lens = lengths[flat]
    # 0..len-1 per example: views of one short range, concatenated (one allocation of the output, no temporaries)
    steps = np.arange(int(lens.max()) if lens.size else 0, dtype=np.int32)
    positions = np.concatenate([steps[:n] for n in lens.tolist()]) if lens.size else np.zeros(0, np.int32)
    row_tokens = np.add.reduceat(lens, np.concatenate([[0], np.cumsum(per_bin)[:-1]]), dtype=np.int64) if bins \
        else np.array([], np.int64)
    if row_tokens.size and row_tokens.max() > max_length:
        raise ValueError(f"pack_table: a bin holds more than max_length={max_length} tokens")
    row_offsets = pa.array(np.concatenate([[0], np.cumsum(row_tokens)]).astype(np.int32))

    def ragged(values: pa.Array | np.ndarray) -> pa.Array:
        values = values if isinstance(values, pa.Array) else pa.array(values)
        return pa.ListArray.from_arrays(row_offsets, values.cast(pa.int32()))

    columns = {
        "input_ids": ragged(packed_ids),
        "labels": ragged(packed_labels),
        "position_ids": ragged(positions),
        "num_examples": pa.array(per_bin.astype(np.int32)),
    }
    if "source" in table.column_names:
        names = table.column("source").take(pa.array(flat)).combine_chunks()
        example_offsets = pa.array(np.concatenate([[0], np.cumsum(per_bin)]).astype(np.int32))
        columns["sources"] = pa.ListArray.from_arrays(example_offsets, names)
    return pa.table(columns)


class _ListRows:
    """A list column (chunked or not, e.g. memory-mapped from a datasets cache file) as numpy views: each chunk's
    values and each row's (chunk, start, end), so rows can be gathered in any order with one copy of the values.
    (Arrow's `take` on list arrays allocates through Arrow's pool, whose fresh pages cost a page fault each on
    first touch: 0.46 s against 0.08 s for numpy on 10 M tokens, measured in a fresh process.)"""

    def __init__(self, column: pa.ChunkedArray | pa.Array) -> None:
        chunks = column.chunks if hasattr(column, "chunks") else [column]
        self.values = [chunk.values.to_numpy() for chunk in chunks]
        offsets = [chunk.offsets.to_numpy() for chunk in chunks]
        self.chunk = np.repeat(np.arange(len(chunks)), [len(o) - 1 for o in offsets])
        self.starts = np.concatenate([o[:-1] for o in offsets]).astype(np.int64) if chunks else np.zeros(0, np.int64)
        self.ends = np.concatenate([o[1:] for o in offsets]).astype(np.int64) if chunks else np.zeros(0, np.int64)
        self.lengths = self.ends - self.starts

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The values of `rows`, in that order, concatenated (the values' dtype)."""
        if rows.size == 0:
            return np.zeros(0, self.values[0].dtype if self.values else np.int32)
        chunk, starts, ends = self.chunk[rows].tolist(), self.starts[rows].tolist(), self.ends[rows].tolist()
        return np.concatenate([self.values[c][a:b] for c, a, b in zip(chunk, starts, ends, strict=True)])


def pack_examples(examples: Sequence[dict[str, Sequence[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """`pack_table` for a list of `{"input_ids", "labels"}` dicts (tests, small data); when every example has a
    `source`, the packed rows get `sources`.

    Returns:
        Packed rows `{"input_ids", "labels", "position_ids", "num_examples"}` (+ `sources`).
    """
    import pyarrow as pa

    columns = {
        "input_ids": pa.array([list(e["input_ids"]) for e in examples], pa.list_(pa.int32())),
        "labels": pa.array([list(e["labels"]) for e in examples], pa.list_(pa.int32())),
    }
    if examples and all(e.get("source") is not None for e in examples):
        columns["source"] = pa.array([str(e["source"]) for e in examples], pa.string())
    return pack_table(pa.table(columns), max_length).to_pylist()
