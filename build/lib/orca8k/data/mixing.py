"""The mix's semantics, in two steps per source: index the documents (one streaming pass), then plan the rows.

Per source, in this order (the seed's semantics, minus its faults):

1. **Index** every row through the source's adapter. Malformed rows go to the quarantine (file, line/row, field,
   reason); exact duplicate documents (same normalised content) are dropped after their first occurrence.
2. **Hold out** `val_split` of the *documents* for validation: `ceil(val_split × documents)` (sklearn's
   `train_test_split` rounding, as the seed), at least 1 and at most documents − 1. No chunk of a document can
   reach both splits.
3. **Chunk** text documents into contiguous, non-overlapping pieces of `max_chunk_size` characters (the last one
   shorter); a chat document is one row (chunk 0).
4. **Draw rows**, without replacement: val keeps `min(rows, max_val_set)`, train keeps
   `max(1, floor(fraction × rows))` (0 < fraction ≤ 1: never oversampled).

Every choice ranks candidates by a keyed hash of their content digest: `splitmix64` of the document's
blake2b-128 digest (and chunk index) salted with blake2b(`seed`, source, purpose), lowest first, ties by input
order. The result depends only on the params and the data's content — not on the process, the global RNG state,
or where the source's files live — and the manifest's seed + this rule reproduce every drawn id exactly
(`plan_source` on the same index). Reference for splitmix64: Steele, Lea, Flood, "Fast splittable pseudorandom
number generators", OOPSLA 2014.
"""

from __future__ import annotations

import hashlib
import math
import re
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orca8k.data.readers import Reject, iter_rows, list_data_files, position_key
from orca8k.data.sources import MISSING, RowRejected, adapter_for, relative_to, source_path

if TYPE_CHECKING:
    from orca8k.config import SourceConfig

DRAW_METHOD = "keyed-hash ranking: splitmix64(blake2b-128 content digest [, chunk_index]) salted with blake2b(seed/source/purpose), lowest first"


@dataclass
class InputFile:
    """One input file of a source: path relative to `paths.data`, its position key, size, sha256, rows read."""

    file: str
    position_key: str
    bytes: int
    sha256: str = ""
    rows: int = 0


@dataclass
class SourceIndex:
    """What pass 1 learned about a source: one entry per *kept* document, in input order.

    Arrays (length = documents): `digests` `[documents, 2]` uint64 (the blake2b-128 content digest), `chars`
    (int64, characters), `file_index` (int32, into `files`), `position` (int64, line or row in that file).
    """

    name: str
    format: str
    kind: str
    required_field: str
    files: list[InputFile]
    paths: list[Path]
    digests: np.ndarray
    chars: np.ndarray
    file_index: np.ndarray
    position: np.ndarray
    rows_read: int
    quarantined: int
    missing_required: int
    duplicates: int
    reasons: dict[str, int]

    @property
    def documents(self) -> int:
        return len(self.chars)


def reason_class(reason: str) -> str:
    """A reason with its numbers replaced by N, for counting rejects by kind."""
    return re.sub(r"\d+", "N", reason)


def index_source(
    name: str,
    src: SourceConfig,
    data_root: Path,
    max_row_bytes: int,
    quarantine: Callable[[dict[str, Any]], None],
) -> SourceIndex:
    """Pass 1: read every row of a source, quarantine the bad ones, drop exact duplicates, index the rest.

    Args:
        name: the source's params name.
        src: its config.
        data_root: `paths.data` (files are reported relative to it).
        max_row_bytes: rows above this size are quarantined unparsed.
        quarantine: called with one `{"source", "file", "line"|"row", "field", "reason", "category"}` per rejected
            row (`category`: `malformed` or `duplicate`), in input order.

    Returns:
        The `SourceIndex` (memory: ~40 bytes per document).

    Raises:
        DataError: no data files, an unreadable file (see `orca8k.data.readers.iter_rows`).
    """
    adapter = adapter_for(src.format)
    paths = list_data_files(source_path(src, data_root))
    files: list[InputFile] = []
    digests, chars, file_index, position = bytearray(), array("q"), array("i"), array("q")
    rows_read = quarantined = missing = 0
    reasons: Counter[str] = Counter()
    normalise = adapter.normalise
    for fi, path in enumerate(paths):
        info = InputFile(relative_to(path, data_root), position_key(path), path.stat().st_size)
        files.append(info)
        hasher = hashlib.sha256()
        for raw in iter_rows(path, adapter.columns, max_row_bytes, hasher=hasher):
            info.rows += 1
            reject: Reject | None = raw.reject
            if reject is None:
                try:
                    doc = normalise(raw.value)
                    digests += doc.digest
                    chars.append(doc.chars)
                    file_index.append(fi)
                    position.append(raw.position)
                    continue
                except RowRejected as err:
                    reject = Reject(err.field, err.reason)
            quarantined += 1
            if reject.reason == MISSING and reject.field == adapter.required_field:
                missing += 1
            reasons[reason_class(reject.reason)] += 1
            quarantine(
                {"source": name, "file": info.file, info.position_key: raw.position, "field": reject.field,
                 "reason": reject.reason, "category": "malformed"}
            )
        info.sha256 = hasher.hexdigest()
        rows_read += info.rows
    index = SourceIndex(
        name=name, format=src.format, kind=adapter.kind, required_field=adapter.required_field, files=files,
        paths=paths, digests=np.frombuffer(bytes(digests), dtype="<u8").reshape(-1, 2),
        chars=np.frombuffer(chars, dtype=np.int64).copy(), file_index=np.frombuffer(file_index, dtype=np.int32).copy(),
        position=np.frombuffer(position, dtype=np.int64).copy(), rows_read=rows_read, quarantined=quarantined,
        missing_required=missing, duplicates=0, reasons=dict(sorted(reasons.items())),
    )
    _drop_duplicates(index, quarantine)
    return index


def _drop_duplicates(index: SourceIndex, quarantine: Callable[[dict[str, Any]], None]) -> None:
    """Keep the first occurrence of each digest; report the others (in input order) to the quarantine."""
    n = index.documents
    if n < 2:
        return
    hi, lo = index.digests[:, 0], index.digests[:, 1]
    order = np.lexsort((lo, hi))  # stable: equal digests stay in input order
    same = np.zeros(n, dtype=bool)
    same[1:] = (hi[order][1:] == hi[order][:-1]) & (lo[order][1:] == lo[order][:-1])
    if not same.any():
        return
    # the first occurrence of each run of equal digests
    run_start = np.maximum.accumulate(np.where(~same, np.arange(n), 0))
    leader = order[run_start]
    dup = np.zeros(n, dtype=bool)
    first_of = np.full(n, -1, dtype=np.int64)
    dup[order[same]] = True
    first_of[order[same]] = leader[same]
    for d in np.flatnonzero(dup):
        f = int(first_of[d])
        info, first = index.files[int(index.file_index[d])], index.files[int(index.file_index[f])]
        quarantine(
            {"source": index.name, "file": info.file, info.position_key: int(index.position[d]), "field": "(document)",
             "reason": f"exact duplicate of {first.file} {first.position_key} {int(index.position[f])}",
             "category": "duplicate"}
        )
    keep = ~dup
    index.duplicates = int(dup.sum())
    index.digests = index.digests[keep]
    index.chars = index.chars[keep]
    index.file_index = index.file_index[keep]
    index.position = index.position[keep]


# --------------------------------------------------------------------------------------------------- keyed hashing
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps modulo 2**64)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def salt(seed: int, source: str, purpose: str) -> int:
    """64-bit salt of one choice: blake2b of `orca8k-mix/<seed>/<source>/<purpose>`."""
    h = hashlib.blake2b(f"orca8k-mix/{seed}/{source}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


def keyed_hash(salt_value: int, digests: np.ndarray) -> np.ndarray:
    """Ranking keys `[n]` uint64 of documents (`digests` `[n, 2]`)."""
    with np.errstate(over="ignore"):
        return _splitmix64(_splitmix64(digests[:, 0] ^ np.uint64(salt_value)) ^ digests[:, 1])


def chunk_keys(doc_keys: np.ndarray, chunk_index: np.ndarray) -> np.ndarray:
    """Ranking keys `[rows]` of chunks from their document's key (`doc_keys[row_doc]`) and `chunk_index`."""
    with np.errstate(over="ignore"):
        return _splitmix64(doc_keys + chunk_index.astype(np.uint64))


def lowest(keys: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the `k` lowest keys (ties: earlier index first)."""
    mask = np.zeros(len(keys), dtype=bool)
    if k >= len(keys):
        mask[:] = True
    elif k > 0:
        mask[np.argsort(keys, kind="stable")[:k]] = True
    return mask


# --------------------------------------------------------------------------------------------------- planning
def val_document_count(documents: int, val_split: float) -> int:
    """Documents held out: `ceil(val_split × documents)`, clamped to [1, documents − 1]."""
    return min(max(1, math.ceil(val_split * documents - 1e-9)), documents - 1)


def train_row_count(rows: int, fraction: float) -> int:
    """Train rows drawn: `floor(fraction × rows)` (at least 1 when rows > 0; fraction ≤ 1 never oversamples)."""
    if rows == 0:
        return 0
    return min(rows, max(1, math.floor(fraction * rows + 1e-9)))


def val_row_count(rows: int, max_val_set: int | None) -> int:
    """Val rows kept: `min(rows, max_val_set)`."""
    return rows if max_val_set is None else min(rows, max_val_set)


@dataclass
class SplitPlan:
    """The rows of one split, in output order (document input order, then chunk index).

    `doc` `[rows]` (index into the `SourceIndex` documents), `chunk_index` `[rows]`, `chars` `[rows]`.
    """

    documents_held: int
    chunks: int
    doc: np.ndarray
    chunk_index: np.ndarray
    chars: np.ndarray
    draw: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.doc)


@dataclass
class SourcePlan:
    """The split and the draws of one source; `val_docs` is a boolean mask over the index's documents."""

    index: SourceIndex
    val_docs: np.ndarray
    chunk_counts: np.ndarray
    train: SplitPlan
    val: SplitPlan
    split: dict[str, Any]


def chunk_counts(chars: np.ndarray, max_chunk_size: int | None) -> np.ndarray:
    """Chunks per document: `ceil(chars / max_chunk_size)` (1 when not chunked)."""
    if max_chunk_size is None:
        return np.ones(len(chars), dtype=np.int64)
    return np.maximum(1, -(-chars // max_chunk_size))


def plan_source(index: SourceIndex, src: SourceConfig, seed: int, val_split: float) -> SourcePlan:
    """Steps 2-4 of the module docstring for one indexed source.

    Raises:
        ValueError: fewer than 2 documents (nothing to hold out); the caller names the source.
    """
    n = index.documents
    if n < 2:
        raise ValueError(f"{n} usable document(s); at least 2 are needed to hold out a validation split")
    n_val = val_document_count(n, val_split)
    split_salt = salt(seed, index.name, "val-documents")
    val_docs = lowest(keyed_hash(split_salt, index.digests), n_val)
    counts = chunk_counts(index.chars, src.max_chunk_size)
    split = {
        "method": DRAW_METHOD, "purpose": "val-documents", "salt": f"{split_salt:016x}",
        "rule": "ceil(val_split x documents), clamped to [1, documents - 1]", "val_split": val_split,
        "documents": n, "val_documents": n_val, "train_documents": n - n_val,
    }
    val = _draw_rows(index, counts, val_docs, seed, "val-rows", val_row_count(int(counts[val_docs].sum()), src.max_val_set), src.max_chunk_size)
    val.draw["rule"] = "min(rows, max_val_set)"
    val.draw["max_val_set"] = src.max_val_set
    train_docs = ~val_docs
    train = _draw_rows(index, counts, train_docs, seed, "train-rows", train_row_count(int(counts[train_docs].sum()), src.fraction), src.max_chunk_size)
    train.draw["rule"] = "max(1, floor(fraction x rows))"
    train.draw["fraction"] = src.fraction
    return SourcePlan(index=index, val_docs=val_docs, chunk_counts=counts, train=train, val=val, split=split)


def _draw_rows(index: SourceIndex, counts: np.ndarray, docs_mask: np.ndarray, seed: int, purpose: str, k: int, max_chunk_size: int | None) -> SplitPlan:
    docs = np.flatnonzero(docs_mask)
    per_doc = counts[docs]
    row_doc = np.repeat(docs, per_doc)  # [rows]
    row_chunk = np.arange(len(row_doc), dtype=np.int64)
    row_chunk -= np.repeat(np.cumsum(per_doc) - per_doc, per_doc)  # [rows] chunk index within its document
    s = salt(seed, index.name, purpose)
    if k < len(row_doc):
        keep = lowest(chunk_keys(np.repeat(keyed_hash(s, index.digests[docs]), per_doc), row_chunk), k)
    else:
        keep = np.ones(len(row_doc), dtype=bool)
    row_doc, row_chunk = row_doc[keep], row_chunk[keep]
    doc_chars = index.chars[row_doc]
    if max_chunk_size is None:
        row_chars = doc_chars
    else:
        row_chars = np.minimum(max_chunk_size, doc_chars - row_chunk * max_chunk_size)
    draw = {"method": DRAW_METHOD, "purpose": purpose, "salt": f"{s:016x}", "candidates": int(len(keep)), "drawn": int(keep.sum())}
    return SplitPlan(documents_held=len(docs), chunks=int(per_doc.sum()), doc=row_doc, chunk_index=row_chunk, chars=row_chars, draw=draw)
