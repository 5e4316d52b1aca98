"""Writing the mix: the parquet schema of `{train,val}.parquet`, streaming sinks, the quarantine file, and pass 2
(re-reading only the chosen documents and emitting their chosen chunks).

Outputs are byte-identical for the same params and data: rows in a fixed order (source order in params, then
input order, then chunk index), row groups cut by a fixed rule, zstd at a fixed level, no timestamps, paths
relative to `paths.data`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from orca8k.data.readers import iter_rows
from orca8k.data.sources import RowRejected, adapter_for, doc_id, row_id
from orca8k.errors import DataError

if TYPE_CHECKING:
    from orca8k.data.mixing import SourcePlan

# The mix contract (CONTRACTS.md §1): one row per example.
MIX_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # chat | text
        pa.field("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),  # null for text
        pa.field("text", pa.string()),  # null for chat
        pa.field("chunk_index", pa.int32(), nullable=False),  # 0 for chat
    ]
)
_FLUSH_ROWS = 4096
_FLUSH_CHARS = 8 * 1024 * 1024  # bounds the writer's buffer (peak memory) whatever the row sizes


class ParquetSink:
    """Streams rows into one parquet file with `MIX_SCHEMA`, flushing a row group every 4,096 rows or 8 M chars.

    Also keeps per-sink counts and the sha256 of the ids written (in order), for the manifest.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = pq.ParquetWriter(
            path, MIX_SCHEMA, compression="zstd", compression_level=1, use_dictionary=["source", "kind"],
            write_statistics=["chunk_index"],
        )
        self._cols: dict[str, list[Any]] = {name: [] for name in MIX_SCHEMA.names}
        self._chars = 0
        self.rows = 0
        self._ids = hashlib.sha256()

    def add(self, row: dict[str, Any], chars: int) -> None:
        for name, col in self._cols.items():
            col.append(row[name])
        self._ids.update(row["id"].encode() + b"\n")
        self.rows += 1
        self._chars += chars
        if len(self._cols["id"]) >= _FLUSH_ROWS or self._chars >= _FLUSH_CHARS:
            self.flush()

    def ids_sha256(self) -> str:
        """sha256 of the ids written so far, one per line in row order (resets with `reset_ids`)."""
        return self._ids.hexdigest()

    def reset_ids(self) -> None:
        self._ids = hashlib.sha256()

    def flush(self) -> None:
        if not self._cols["id"]:
            return
        table = pa.Table.from_pydict(self._cols, schema=MIX_SCHEMA)
        self._writer.write_table(table, row_group_size=len(self._cols["id"]))
        self._cols = {name: [] for name in MIX_SCHEMA.names}
        self._chars = 0

    def close(self) -> None:
        self.flush()
        self._writer.close()


class QuarantineWriter:
    """Appends one JSON object per rejected row (sorted keys, UTF-8) to the quarantine file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[str] = open(path, "w", encoding="utf-8")
        self.rows = 0

    def __call__(self, entry: dict[str, Any]) -> None:
        self._f.write(json.dumps(entry, ensure_ascii=False, sort_keys=True) + "\n")
        self.rows += 1

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def emit_source(plan: SourcePlan, max_chunk_size: int | None, train: ParquetSink, val: ParquetSink) -> dict[str, str]:
    """Pass 2: re-read the documents that have drawn rows and write those rows, in input order.

    Args:
        plan: the source's plan (from `orca8k.data.mixing.plan_source`).
        max_chunk_size: characters per chunk for text sources (None: chat, one row per document).
        train, val: the sinks of the two splits.

    Returns:
        `{"train": ids_sha256, "val": ids_sha256}` of this source's rows, in output order.

    Raises:
        DataError: a chosen row no longer parses or has other content than in pass 1 (the file changed while the
            mix ran); the message names the file and position.
    """
    index = plan.index
    adapter = adapter_for(index.format)
    doc = np.concatenate([plan.train.doc, plan.val.doc])
    chunk = np.concatenate([plan.train.chunk_index, plan.val.chunk_index])
    order = np.lexsort((chunk, doc))
    doc, chunk = doc[order], chunk[order]
    starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]]) if len(doc) else np.zeros(0, dtype=np.int64)
    ends = np.r_[starts[1:], len(doc)].astype(np.int64)
    chosen = doc[starts]  # documents with at least one drawn row, in input order
    train.reset_ids()
    val.reset_ids()
    for fi, path in enumerate(index.paths):
        in_file = np.flatnonzero(index.file_index[chosen] == fi)
        if not len(in_file):
            continue
        positions = index.position[chosen[in_file]].tolist()
        info = index.files[fi]
        it = iter(in_file.tolist())
        for raw in iter_rows(path, adapter.columns, wanted=positions):
            j = next(it)
            d = int(chosen[j])
            where = f"{path} {info.position_key} {raw.position}"
            if raw.reject is not None:
                raise DataError(f"{where}: {raw.reject.field}: {raw.reject.reason} — the file changed while the mix ran")
            try:
                document = adapter.normalise(raw.value)
            except RowRejected as err:
                raise DataError(f"{where}: {err} — the file changed while the mix ran") from None
            if document.digest != index.digests[d].tobytes():
                raise DataError(f"{where}: content differs from the first pass — the file changed while the mix ran")
            sink = val if plan.val_docs[d] else train
            did = doc_id(index.name, document.digest)
            for c in chunk[starts[j] : ends[j]].tolist():
                if document.kind == "chat":
                    sink.add({"id": row_id(index.name, document.digest, 0), "source": index.name, "doc_id": did,
                              "kind": "chat", "messages": document.messages, "text": None, "chunk_index": 0}, document.chars)
                else:
                    piece = document.text if max_chunk_size is None else document.text[c * max_chunk_size : (c + 1) * max_chunk_size]
                    sink.add({"id": row_id(index.name, document.digest, c), "source": index.name, "doc_id": did,
                              "kind": "text", "messages": None, "text": piece, "chunk_index": c}, len(piece))
        remaining = sum(1 for _ in it)
        if remaining:
            raise DataError(f"{path}: {remaining} chosen rows not found in the second pass — the file changed while the mix ran")
    return {"train": train.ids_sha256(), "val": val.ids_sha256()}
