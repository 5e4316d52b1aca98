"""Per-example token statistics computed from the final `input_ids`/`labels` arrays — independently of the encoder's
own bookkeeping — for the token-level validation suite and the tokenize metrics.

Everything is vectorised over flattened Arrow list columns (numpy), so a pass over a split costs about as much as
reading it. The counts are defined on the arrays alone:

- `supervised_tokens`: targets, `labels != -100` (position 0 is never one: it is -100 in every example);
- `supervised_eos`: targets equal to `</s>`; `eos_tokens`: every `</s>` in the input;
- `bos_tokens`, `bos_first`: how many `<s>` and whether one is at position 0;
- `system_tokens`, `prompter_tokens`, `assistant_tokens`: role tokens in the input;
- `complete_replies`: assistant blocks closed by a `</s>` (a cut reply ends the example without one);
- `supervised_outside_reply`: targets that are not inside an assistant reply (or the system block with
  `train_on_system`), i.e. on a role token, a prompter turn, or the system block;
- `label_mismatch`: targets whose label differs from the input id at the same position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from orca8k.data.chat_format import IGNORE_INDEX

if TYPE_CHECKING:
    import pyarrow as pa

NONE, SYSTEM_BLOCK, PROMPTER_BLOCK, ASSISTANT_BLOCK = 0, 1, 2, 3


@dataclass(frozen=True)
class SpecialIds:
    """The ids the statistics look for (from `orca8k.data.chat_format.ChatEncoder`)."""

    bos: int
    eos: int
    system: int
    prompter: int
    assistant: int

    @classmethod
    def of(cls, encoder) -> SpecialIds:
        return cls(encoder.bos_id, encoder.eos_id, encoder.system_id, encoder.prompter_id, encoder.assistant_id)


def list_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets starting at 0 as int64) of a list column; the values stay in their Arrow type (no copy
    for a single chunk without nulls: `combine_chunks` copies even one chunk, 0.13 s per 10 M int32 values here)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        arr = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    else:
        arr = column
    offsets = arr.offsets.to_numpy().astype(np.int64)
    return arr.flatten().to_numpy(zero_copy_only=False), offsets - offsets[0]


def _count_dense(mask: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per-row count of a dense boolean mask (rows begin at `starts`; none is empty)."""
    return np.add.reduceat(mask, starts, dtype=np.int64)


def _count_at(positions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-row count of sorted flat `positions` (rows delimited by `offsets`): for sparse masks, without a pass over
    every token."""
    return np.diff(np.searchsorted(positions, offsets))


def example_stats(input_ids: pa.ChunkedArray | pa.Array, labels: pa.ChunkedArray | pa.Array, special: SpecialIds,
                  train_on_system: bool = False) -> dict[str, np.ndarray]:
    """Per-example counts (see the module docstring) of one batch of examples.

    Dense masks are counted per example with `np.add.reduceat`; special tokens (a few per example) by their positions.
    Blocks come from the role tokens' positions: a block runs from a role token (or the example's start, block
    `NONE`) to the next one, and its targets are counted in one `reduceat` over the block starts.

    Args:
        input_ids: list column, one example per row, `[seq_len]` each.
        labels: list column aligned with `input_ids`.
        special: the special ids.
        train_on_system: whether targets in the system block are allowed.

    Returns:
        Column name → array with one value per example (int64, or bool for `bos_first`/`ends_with_eos`).

    Raises:
        ValueError: `input_ids` and `labels` differ in length in some example, or an example is empty.
    """
    ids, off = list_values(input_ids)
    lab, lab_off = list_values(labels)
    lengths = np.diff(off)
    if not np.array_equal(lengths, np.diff(lab_off)):
        raise ValueError("token stats: input_ids and labels differ in length in some example")
    if lengths.size == 0:
        return {k: np.zeros(0, dtype=bool if k in BOOL_STAT_COLUMNS else np.int64) for k in EXAMPLE_STAT_COLUMNS}
    if lengths.min() <= 0:
        raise ValueError(f"token stats: example {int(np.argmin(lengths))} is empty")
    starts, ends = off[:-1], off[1:] - 1

    target = lab != IGNORE_INDEX
    at = {name: np.flatnonzero(ids == getattr(special, name)) for name in ("bos", "eos", "system", "prompter",
                                                                             "assistant")}
    # blocks: each example's start (NONE) and each role token open one; no per-token block array is built
    role_pos = np.concatenate([at["system"], at["prompter"], at["assistant"]])
    role_code = np.concatenate([np.full(at["system"].size, SYSTEM_BLOCK, np.int8),
                                np.full(at["prompter"].size, PROMPTER_BLOCK, np.int8),
                                np.full(at["assistant"].size, ASSISTANT_BLOCK, np.int8)])
    block_start = np.concatenate([starts, role_pos])
    block_code = np.concatenate([np.full(starts.size, NONE, np.int8), role_code])
    order = np.argsort(block_start, kind="stable")
    block_start, block_code = block_start[order], block_code[order]
    # a role token at an example's very start replaces that example's empty NONE block (starts must be distinct)
    keep = np.append(block_start[1:] != block_start[:-1], True)
    block_start, block_code = block_start[keep], block_code[keep]
    allowed = (block_code == ASSISTANT_BLOCK) | ((block_code == SYSTEM_BLOCK) & train_on_system)
    # targets outside a reply: every target in a block that is not allowed, plus a target on a role token itself
    outside = _count_dense(target, block_start)
    outside[allowed] = 0
    outside[allowed] += target[block_start[allowed]] & (block_code[allowed] != NONE)
    block_example = np.searchsorted(off, block_start, side="right") - 1
    supervised_outside_reply = np.bincount(block_example, weights=outside, minlength=lengths.size).astype(np.int64)

    ends_with_eos = ids[ends] == special.eos
    # a reply is complete when its block is closed by </s>: every assistant token except one whose block runs to the
    # end of the example without a final </s>
    last_block = np.searchsorted(block_start, ends, side="right") - 1
    last_block_is_reply = block_code[last_block] == ASSISTANT_BLOCK
    assistant_tokens = _count_at(at["assistant"], off)
    mismatch = np.flatnonzero(lab != ids)
    mismatch = mismatch[target[mismatch]]
    return {
        "num_tokens": lengths,
        "supervised_tokens": _count_dense(target, starts),
        "supervised_eos": _count_at(np.flatnonzero(lab == special.eos), off),
        "eos_tokens": _count_at(at["eos"], off),
        "bos_tokens": _count_at(at["bos"], off),
        "bos_first": ids[starts] == special.bos,
        "ends_with_eos": ends_with_eos,
        "system_tokens": _count_at(at["system"], off),
        "prompter_tokens": _count_at(at["prompter"], off),
        "assistant_tokens": assistant_tokens,
        "complete_replies": assistant_tokens - (last_block_is_reply & ~ends_with_eos).astype(np.int64),
        "supervised_outside_reply": supervised_outside_reply,
        "label_mismatch": _count_at(mismatch, off),
    }


# what `example_stats` returns, in order; the two flags are bool, the counts int64
BOOL_STAT_COLUMNS = ("bos_first", "ends_with_eos")
EXAMPLE_STAT_COLUMNS = ("num_tokens", "supervised_tokens", "supervised_eos", "eos_tokens", "bos_tokens", "bos_first",
                        "ends_with_eos", "system_tokens", "prompter_tokens", "assistant_tokens", "complete_replies",
                        "supervised_outside_reply", "label_mismatch")


def packed_row_stats(input_ids: pa.ChunkedArray | pa.Array, labels: pa.ChunkedArray | pa.Array,
                     position_ids: pa.ChunkedArray | pa.Array, special: SpecialIds) -> dict[str, np.ndarray]:
    """Per packed row: `num_tokens`, `supervised_tokens`, `segments` (position restarts), `bos_tokens`,
    `bos_at_restart` (`<s>` exactly where positions restart), `broken_positions` (positions that neither step by 1
    nor restart at 0, a row's first position counting as broken unless it is 0), `label_at_restart` (targets on a
    segment's first token: must be 0)."""
    ids, off = list_values(input_ids)
    lab, _ = list_values(labels)
    pos, _ = list_values(position_ids)
    starts = off[:-1]
    if starts.size == 0:
        return {}
    restart = np.flatnonzero(pos == 0)
    bos = np.flatnonzero(ids == special.bos)
    broken = np.flatnonzero((np.diff(pos) != 1) & (pos[1:] != 0)) + 1  # inside or across rows
    broken = broken[~np.isin(broken, starts)]  # a row's first position is judged on its own, below
    broken = np.union1d(broken, starts[pos[starts] != 0])
    return {
        "num_tokens": np.diff(off),
        # by the (few) unsupervised positions: no dense per-token reduction over the split
        "supervised_tokens": np.diff(off) - _count_at(np.flatnonzero(lab == IGNORE_INDEX), off),
        "segments": _count_at(restart, off),
        "bos_tokens": _count_at(bos, off),
        "bos_at_restart": _count_at(np.intersect1d(restart, bos, assume_unique=True), off),
        "broken_positions": _count_at(broken, off),
        "label_at_restart": _count_at(restart[lab[restart] != IGNORE_INDEX], off),
    }
