"""Streaming row readers for local source snapshots: `.jsonl`, `.json` (JSON lines or one JSON array) and `.parquet`.

Each reader yields one `RawRow` per row, in file order, with its position (1-based line for JSON lines, 0-based
element / row index for JSON arrays and parquet), its size in bytes, and either the parsed value or a `Reject`
(field + reason) — so a bad row is reported where it is, never skipped silently, and never stops the file. Memory
stays flat: JSON lines are read line by line, arrays element by element, parquet batch by batch.

Why not `datasets.load_dataset("json", ...)` here: it fails the whole file on one bad line and loses line numbers;
the hub loader (`orca8k.data.sources.iter_hub_rows`) uses `datasets`, these readers read what it materialised.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orca8k.errors import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
ROW_FIELD = "(row)"  # the `field` of a reject that concerns the whole row
_READ_CHUNK = 1 << 20  # bytes read at a time from a JSON array / for hashing
# strict=False: raw control characters inside strings are accepted as text (NUL is rejected on its own)
_DECODER = json.JSONDecoder(strict=False)


@dataclass(frozen=True)
class Reject:
    """Why a row cannot be used: the offending field (dotted, `(row)` for the whole row) and a reason."""

    field: str
    reason: str


@dataclass(frozen=True)
class RawRow:
    """One row as read: `position` (see `position_key`), its UTF-8 size, the parsed value or a `Reject`."""

    position: int
    nbytes: int
    value: Any = None
    reject: Reject | None = None


def position_key(path: Path) -> str:
    """`line` (1-based) for JSON-lines files, `row` (0-based) for JSON arrays and parquet."""
    return "row" if path.suffix == ".parquet" or _is_json_array(path) else "line"


def list_data_files(path: Path) -> list[Path]:
    """The data files of a source: `path` itself, or every `.json/.jsonl/.parquet` below it (sorted, recursive,
    hidden files and folders skipped).

    Raises:
        DataError: `path` does not exist, or is a file of another type.
    """
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise DataError(f"{path}: not a .json/.jsonl/.parquet file")
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder")
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.suffix in DATA_SUFFIXES and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def iter_rows(
    path: Path,
    columns: Sequence[str] | None = None,
    max_row_bytes: int | None = None,
    wanted: Sequence[int] | None = None,
    hasher: Any | None = None,
) -> Iterator[RawRow]:
    """Yield the rows of one data file.

    Args:
        path: a `.jsonl`, `.json` or `.parquet` file.
        columns: parquet columns to read (all when None); JSON rows are always whole.
        max_row_bytes: rows larger than this (UTF-8 bytes) are rejected without being parsed.
        wanted: sorted positions to yield (None = all). Other rows are skipped without parsing where the format
            allows it (JSON lines, parquet).
        hasher: a `hashlib` object updated with every byte of the file (the input content hash).

    Yields:
        `RawRow` in file order.

    Raises:
        DataError: an unreadable file, or a JSON array whose structure is broken (the rest of the file cannot be
            located); the message names the file and position.
    """
    if path.suffix == ".parquet":
        if hasher is not None:
            _hash_file(path, hasher)
        yield from _iter_parquet(path, columns, max_row_bytes, wanted)
    elif _is_json_array(path):
        yield from _iter_json_array(path, max_row_bytes, wanted, hasher)
    else:
        yield from _iter_json_lines(path, max_row_bytes, wanted, hasher)


def _hash_file(path: Path, hasher: Any) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(8 * _READ_CHUNK):
            hasher.update(chunk)


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    _hash_file(path, h)
    return h.hexdigest()


def _is_json_array(path: Path) -> bool:
    if path.suffix != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        while not head:
            more = f.read(4096)
            if not more:
                return False
            head = more.lstrip(b" \t\r\n")
    return head[:1] == b"["


def _oversize(nbytes: int, max_row_bytes: int) -> Reject:
    return Reject(ROW_FIELD, f"row is {nbytes} bytes, more than data.max_row_bytes={max_row_bytes}")


def _iter_json_lines(path: Path, max_row_bytes: int | None, wanted: Sequence[int] | None, hasher: Any) -> Iterator[RawRow]:
    want_i, n_wanted = 0, (len(wanted) if wanted is not None else 0)
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if hasher is not None:
                hasher.update(line)
            if wanted is not None:
                if want_i >= n_wanted:
                    if hasher is None:
                        return
                    continue
                if wanted[want_i] != lineno:
                    continue
                want_i += 1
            stripped = line.strip()
            if lineno == 1 and stripped.startswith(b"\xef\xbb\xbf"):
                stripped = stripped[3:].strip()  # a UTF-8 byte-order mark is not part of the row
            if not stripped:
                continue  # a blank line is not a row
            nbytes = len(stripped)
            if max_row_bytes is not None and nbytes > max_row_bytes:
                yield RawRow(lineno, nbytes, reject=_oversize(nbytes, max_row_bytes))
                continue
            yield _parse_json_bytes(lineno, stripped)


def _parse_json_bytes(position: int, raw: bytes) -> RawRow:
    nbytes = len(raw)
    nul = raw.find(b"\x00")
    if nul >= 0:
        return RawRow(position, nbytes, reject=Reject(ROW_FIELD, f"NUL byte at byte {nul}"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return RawRow(position, nbytes, reject=Reject(ROW_FIELD, f"not valid UTF-8: byte {err.start} ({err.reason})"))
    try:
        value = _DECODER.decode(text)
    except json.JSONDecodeError as err:
        return RawRow(position, nbytes, reject=Reject(ROW_FIELD, f"invalid JSON: {err.msg} (char {err.pos})"))
    except RecursionError:
        return RawRow(position, nbytes, reject=Reject(ROW_FIELD, "invalid JSON: nested too deeply"))
    return RawRow(position, nbytes, value=value)


def _iter_json_array(path: Path, max_row_bytes: int | None, wanted: Sequence[int] | None, hasher: Any) -> Iterator[RawRow]:
    """Elements of a top-level JSON array, decoded incrementally (`raw_decode` over a sliding buffer)."""
    import codecs

    decoder = _DECODER
    limit = 4 * max_row_bytes + _READ_CHUNK if max_row_bytes is not None else None
    # surrogateescape keeps undecodable bytes as lone surrogates, caught per element below
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    want_i, n_wanted = 0, (len(wanted) if wanted is not None else 0)
    with open(path, "rb") as f:
        buf, pos, eof, index = "", 0, False, 0

        def fill(n: int) -> bool:
            nonlocal buf, pos, eof
            data = f.read(n)
            if hasher is not None and data:
                hasher.update(data)
            if not data:
                eof = True
                buf = buf[pos:] + utf8.decode(b"", final=True)
            else:
                buf = buf[pos:] + utf8.decode(data)
            pos = 0
            return bool(data)

        def skip(chars: str) -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf) or eof or not fill(_READ_CHUNK):
                    return

        fill(_READ_CHUNK)
        if buf.startswith("\ufeff"):
            pos = 1
        skip(" \t\r\n")
        if pos >= len(buf) or buf[pos] != "[":
            raise DataError(f"{path}: expected a JSON array")
        pos += 1
        expect_comma = False
        while True:
            skip(" \t\r\n")
            if pos >= len(buf):
                raise DataError(f"{path}: element {index}: the JSON array is not closed (file truncated?)")
            if buf[pos] == "]":
                if hasher is not None:
                    while fill(8 * _READ_CHUNK):
                        pass
                return
            if expect_comma:
                if buf[pos] != ",":
                    raise DataError(f"{path}: element {index}: expected ',' or ']' at char {pos}; the rest of the array cannot be read")
                pos += 1
                skip(" \t\r\n")
            read_size = _READ_CHUNK
            while True:
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    break
                except json.JSONDecodeError as err:
                    if eof or (limit is not None and len(buf) - pos > limit):
                        raise DataError(
                            f"{path}: element {index}: invalid JSON ({err.msg}) or an element far larger than "
                            f"data.max_row_bytes; the rest of the array cannot be read"
                        ) from None
                    fill(read_size)
                    read_size = max(read_size, len(buf))  # grow geometrically for a very long element
            span = buf[pos:end]
            pos = end
            expect_comma = True
            position = index
            index += 1
            if wanted is not None:
                if want_i >= n_wanted or wanted[want_i] != position:
                    continue
                want_i += 1
            try:
                nbytes = len(span.encode("utf-8"))
            except UnicodeEncodeError as err:
                yield RawRow(position, len(span), reject=Reject(ROW_FIELD, f"not valid UTF-8 near char {err.start}"))
                continue
            if max_row_bytes is not None and nbytes > max_row_bytes:
                yield RawRow(position, nbytes, reject=_oversize(nbytes, max_row_bytes))
                continue
            if "\x00" in span:
                yield RawRow(position, nbytes, reject=Reject(ROW_FIELD, f"NUL byte at char {span.index(chr(0))}"))
                continue
            yield RawRow(position, nbytes, value=value)


def _row_bytes(value: Any) -> int:
    """UTF-8 size of the strings in a parquet row (an approximation of its JSON size, without building it)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(len(k) + _row_bytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_row_bytes(v) for v in value)
    return 8


def _iter_parquet(path: Path, columns: Sequence[str] | None, max_row_bytes: int | None, wanted: Sequence[int] | None) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, buffer_size=1 << 22, pre_buffer=False)  # stream column chunks: flat memory
    except Exception as err:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: unreadable parquet file: {err}") from None
    present = [c for c in (columns or pf.schema_arrow.names) if c in pf.schema_arrow.names]
    offset, want_i, n_wanted = 0, 0, (len(wanted) if wanted is not None else 0)
    for batch in pf.iter_batches(batch_size=32, columns=present, use_threads=False):
        n = batch.num_rows
        if wanted is not None:
            idx = []
            while want_i < n_wanted and wanted[want_i] < offset + n:
                idx.append(wanted[want_i] - offset)
                want_i += 1
            if not idx:
                offset += n
                if want_i >= n_wanted:
                    return
                continue
        else:
            idx = range(n)
        try:
            rows: list[Any] = batch.to_pylist()
        except UnicodeDecodeError:
            rows = []
            for i in range(n):
                try:
                    rows.append(batch.slice(i, 1).to_pylist()[0])
                except UnicodeDecodeError as err:
                    rows.append(Reject(ROW_FIELD, f"not valid UTF-8: byte {err.start} ({err.reason})"))
        for i in idx:
            row = rows[i]
            if isinstance(row, Reject):
                yield RawRow(offset + i, 0, reject=row)
                continue
            nbytes = _row_bytes(row)
            if max_row_bytes is not None and nbytes > max_row_bytes:
                yield RawRow(offset + i, nbytes, reject=_oversize(nbytes, max_row_bytes))
                continue
            yield RawRow(offset + i, nbytes, value=row)
        offset += n
