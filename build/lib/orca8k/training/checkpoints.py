"""Checkpoints that are safe to resume from: completion markers, stale-run detection and a rotation that keeps the
best and the last checkpoint.

- **Completion marker.** The Trainer writes `checkpoint-N/` file by file; a process killed half-way leaves a folder
  that looks like a checkpoint. `CheckpointCallback` (orca8k.training.callbacks) writes `checkpoint-N/COMPLETE_MARKER`
  (write-then-rename) after every rank has finished writing; a folder without it is never resumed from and is
  removed before training starts.
- **Fingerprint.** `layout.checkpoints` is persisted across `dvc repro` runs (persist: true). Checkpoints belong to
  one configuration: `fingerprint.json` records the hash of everything that changes the trained weights (the params
  train reads, minus bookkeeping keys, and the identity of the inputs). A rerun with the same fingerprint resumes; a
  different one starts fresh and says so.
- **Rotation.** At most `train.save_total_limit` complete checkpoints, never deleting the most recent one nor the
  best one by `eval_loss` (so the limit may be exceeded by one).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orca8k.config import Config
    from orca8k.layout import Layout

COMPLETE_MARKER = "orca8k_complete.json"
FINGERPRINT_FILE = "fingerprint.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# train.* keys that do not change the trained weights: changing them resumes instead of restarting
BOOKKEEPING_KEYS = (
    "max_seconds", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "per_device_eval_batch_size",
    "dataloader_num_workers", "launcher", "hostfile",
)


def checkpoint_step(path: Path) -> int | None:
    """Step number of a `checkpoint-N` folder name, else None."""
    m = _CHECKPOINT_RE.match(path.name)
    return int(m.group(1)) if m else None


def is_complete(path: Path) -> bool:
    """True when `path` carries the completion marker written after the whole checkpoint was saved."""
    return (path / COMPLETE_MARKER).is_file()


def list_checkpoints(folder: Path) -> list[Path]:
    """`checkpoint-N` folders under `folder`, sorted by step (complete or not)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The highest-step checkpoint that has its completion marker, or None."""
    complete = [p for p in list_checkpoints(folder) if is_complete(p)]
    return complete[-1] if complete else None


def write_marker(checkpoint: Path, info: dict[str, Any]) -> Path:
    """Mark `checkpoint` complete (JSON with `info`), atomically: write a temp file, then rename it into place."""
    tmp = checkpoint / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps({"step": checkpoint_step(checkpoint), "time": time.time(), **info}, indent=2) + "\n")
    os.replace(tmp, checkpoint / COMPLETE_MARKER)
    return checkpoint / COMPLETE_MARKER


def remove_incomplete(folder: Path) -> list[Path]:
    """Delete `checkpoint-N` folders without a completion marker (interrupted while being written).

    Returns:
        The folders removed.
    """
    removed = []
    for path in list_checkpoints(folder):
        if not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def rotate(folder: Path, limit: int, best: Path | None) -> list[Path]:
    """Keep at most `limit` complete checkpoints, oldest deleted first, never the newest nor `best`.

    Incomplete folders are not counted and not touched here (the checkpoint being written may be one of them).

    Returns:
        The folders deleted.
    """
    complete = [p for p in list_checkpoints(folder) if is_complete(p)]
    if len(complete) <= limit:
        return []
    protected = {complete[-1].resolve()}
    if best is not None:
        protected.add(Path(best).resolve())
    deleted = []
    remaining = len(complete)
    for path in complete:
        if remaining <= max(limit, len(protected)):
            break
        if path.resolve() not in protected:
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
            remaining -= 1
    return deleted


def _dir_identity(path: Path) -> list[Any]:
    """Cheap identity of an input folder: each file's relative name and size, plus the content of small JSON files
    (configs, dataset `state.json` with its fingerprint). Hashing weights or Arrow data byte by byte would take
    minutes on a 13B model; a rewritten input changes its state/config files or sizes."""
    if not path.exists():
        return [str(path), "missing"]
    items: list[Any] = []
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if f.suffix == ".json" and f.stat().st_size < 1_000_000:
            items.append([rel, hashlib.sha256(f.read_bytes()).hexdigest()])
        else:
            items.append([rel, f.stat().st_size])
    return items


def training_fingerprint(cfg: Config, layout: Layout, base_dir: Path) -> str:
    """sha256 of what determines the trained weights: seed, model, tokenize.max_length, train (minus
    `BOOKKEEPING_KEYS`), and the identity of the base, the tokenizer and the tokenized data."""
    data = cfg.to_dict()
    train = {k: v for k, v in data["train"].items() if k not in BOOKKEEPING_KEYS}
    blob = {
        "seed": data["seed"],
        "model": data["model"],
        "tokenize": {"max_length": data["tokenize"]["max_length"]},
        "train": train,
        "base": _dir_identity(base_dir),
        "tokenizer": _dir_identity(layout.tokenizer),
        "train_data": _dir_identity(layout.tokenized_train),
        "val_data": _dir_identity(layout.tokenized_val),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def prepare_checkpoints(folder: Path, fingerprint: str, run_file: Path) -> tuple[Path | None, list[str]]:
    """Make `folder` ready for this run (main process only) and find where to resume.

    Removes interrupted checkpoints; if the recorded fingerprint differs from `fingerprint` (or is missing while
    checkpoints exist), removes every checkpoint and `run_file` (the MLflow run of the old configuration) so the run
    starts fresh; then records `fingerprint`.

    Args:
        folder: `layout.checkpoints`.
        fingerprint: `training_fingerprint(...)` of this run.
        run_file: `layout.checkpoint_run`.

    Returns:
        (the checkpoint to resume from or None, human-readable notes on what was done).
    """
    notes: list[str] = []
    folder.mkdir(parents=True, exist_ok=True)
    for path in remove_incomplete(folder):
        notes.append(f"removed {path.name}: interrupted while being written (no {COMPLETE_MARKER})")
    fp_file = folder / FINGERPRINT_FILE
    recorded = json.loads(fp_file.read_text()).get("fingerprint") if fp_file.is_file() else None
    existing = list_checkpoints(folder)
    if recorded != fingerprint and (existing or run_file.is_file()):
        for path in existing:
            shutil.rmtree(path, ignore_errors=True)
        run_file.unlink(missing_ok=True)
        notes.append(
            f"removed {len(existing)} checkpoint(s) of another configuration (fingerprint "
            f"{(recorded or 'none')[:12]} != {fingerprint[:12]}): starting fresh"
        )
    tmp = fp_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint}, indent=2) + "\n")
    os.replace(tmp, fp_file)
    resume = last_complete_checkpoint(folder)
    if resume is not None:
        notes.append(f"resuming from {resume.name}")
    return resume, notes
