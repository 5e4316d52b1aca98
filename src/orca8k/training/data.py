"""Training inputs from the tokenize stage's outputs: the train rows and one eval set per source.

Nothing is written next to the inputs (they are another stage's DVC outputs): eval sets are index selections held
in memory, not `filter` results cached to disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from orca8k.errors import DataError, StageInputMissing

if TYPE_CHECKING:
    from datasets import Dataset

REQUIRED_COLUMNS = ("input_ids", "labels")


def load_tokenized(path: Path, split: str) -> Dataset:
    """Load a `save_to_disk` dataset written by `orca8k tokenize`.

    Raises:
        StageInputMissing: no dataset at `path`.
        DataError: a required column (`input_ids`, `labels`; `source` for val) is missing, or the split is empty.
    """
    from datasets import load_from_disk

    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        raise StageInputMissing(f"{path}: no tokenized {split} split (run `orca8k tokenize` first)")
    dataset = load_from_disk(str(path))
    required = REQUIRED_COLUMNS + (("source",) if split == "val" else ())
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise DataError(f"{path}: column(s) {missing} missing (has {dataset.column_names})")
    if len(dataset) == 0:
        raise DataError(f"{path}: the {split} split has no rows")
    return dataset


def eval_sets_by_source(val: Dataset) -> dict[str, Dataset]:
    """One eval set per value of the `source` column, in order of first appearance (the mix's source order).

    Returns:
        `{source: Dataset}` (in-memory index selections of `val`).
    """
    sources = val["source"]
    order: dict[str, list[int]] = {}
    for i, name in enumerate(sources):
        order.setdefault(name, []).append(i)
    return {name: val.select(indices) for name, indices in order.items()}
