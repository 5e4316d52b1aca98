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


def _flat(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(flat values as int64, offsets starting at 0) of a list column."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy().astype(np.int64)
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64), offsets - offsets[0]


def example_stats(input_ids: pa.ChunkedArray | pa.Array, labels: pa.ChunkedArray | pa.Array, special: SpecialIds,
                  train_on_system: bool = False) -> dict[str, np.ndarray]:
    """Per-example counts (see the module docstring) of one batch of examples.

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
    ids, off = _flat(input_ids)
    lab, lab_off = _flat(labels)
    lengths = np.diff(off)
    if not np.array_equal(lengths, np.diff(lab_off)):
        raise ValueError("token stats: input_ids and labels differ in length in some example")
    if lengths.size == 0:
        return {k: np.zeros(0, dtype=np.int64) for k in _COLUMNS}
    if lengths.min() <= 0:
        raise ValueError(f"token stats: example {int(np.argmin(lengths))} is empty")
    starts = off[:-1]

    def per_example(mask: np.ndarray) -> np.ndarray:
        return np.add.reduceat(mask.astype(np.int64), starts)

    target = lab != IGNORE_INDEX
    is_system, is_prompter, is_assistant = ids == special.system, ids == special.prompter, ids == special.assistant
    is_role = is_system | is_prompter | is_assistant
    # the block each position is in: forward-fill the code of the last role token, restarting at each example
    code = np.zeros(ids.size, dtype=np.int8)
    code[is_system], code[is_prompter], code[is_assistant] = SYSTEM_BLOCK, PROMPTER_BLOCK, ASSISTANT_BLOCK
    marker = is_role.copy()
    marker[starts] = True
    last = np.maximum.accumulate(np.where(marker, np.arange(ids.size), 0))
    block = code[last]
    allowed = (block == ASSISTANT_BLOCK) | ((block == SYSTEM_BLOCK) & train_on_system)
    ends = off[1:] - 1
    ends_with_eos = ids[ends] == special.eos
    # a reply is complete when its block is closed by </s>: every assistant token except one whose block runs to the
    # end of the example without a final </s>
    last_block_is_reply = block[ends] == ASSISTANT_BLOCK
    assistant_tokens = per_example(is_assistant)
    return {
        "num_tokens": lengths,
        "supervised_tokens": per_example(target),
        "supervised_eos": per_example(target & (lab == special.eos)),
        "eos_tokens": per_example(ids == special.eos),
        "bos_tokens": per_example(ids == special.bos),
        "bos_first": ids[starts] == special.bos,
        "ends_with_eos": ends_with_eos,
        "system_tokens": per_example(is_system),
        "prompter_tokens": per_example(is_prompter),
        "assistant_tokens": assistant_tokens,
        "complete_replies": assistant_tokens - (last_block_is_reply & ~ends_with_eos).astype(np.int64),
        "supervised_outside_reply": per_example(target & (~allowed | is_role)),
        "label_mismatch": per_example(target & (lab != ids)),
    }


_COLUMNS = ("num_tokens", "supervised_tokens", "supervised_eos", "eos_tokens", "bos_tokens", "bos_first",
            "ends_with_eos", "system_tokens", "prompter_tokens", "assistant_tokens", "complete_replies",
            "supervised_outside_reply", "label_mismatch")


def packed_row_stats(input_ids: pa.ChunkedArray | pa.Array, labels: pa.ChunkedArray | pa.Array,
                     position_ids: pa.ChunkedArray | pa.Array, special: SpecialIds) -> dict[str, np.ndarray]:
    """Per packed row: `num_tokens`, `supervised_tokens`, `segments` (position restarts), `bos_tokens`,
    `bos_at_restart` (`<s>` exactly where positions restart), `positions_consecutive` (positions step by 1 inside
    each segment), `label_at_restart` (targets on a segment's first token: must be 0)."""
    ids, off = _flat(input_ids)
    lab, _ = _flat(labels)
    pos, _ = _flat(position_ids)
    starts = off[:-1]
    if starts.size == 0:
        return {}

    def per_row(mask: np.ndarray) -> np.ndarray:
        return np.add.reduceat(mask.astype(np.int64), starts)

    restart = pos == 0
    step_ok = np.ones(ids.size, dtype=bool)
    step_ok[1:] = (pos[1:] == pos[:-1] + 1) | restart[1:]
    step_ok[starts] = restart[starts]
    return {
        "num_tokens": np.diff(off),
        "supervised_tokens": per_row(lab != IGNORE_INDEX),
        "segments": per_row(restart),
        "bos_tokens": per_row(ids == special.bos),
        "bos_at_restart": per_row(restart & (ids == special.bos)),
        "broken_positions": per_row(~step_ok),
        "label_at_restart": per_row(restart & (lab != IGNORE_INDEX)),
    }
