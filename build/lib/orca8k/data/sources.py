"""Schema adapters for the three sources, and where their rows come from (a local snapshot or a hub id).

One adapter per source format turns a raw row into one record, in HF's terms:

- chat (`orca_chat`: `instruction` = system prompt, `conversation` = `[{input, output}, ...]`):
  `{id, source, doc_id, messages: [{role, content}]}` with roles `system` (at most one, first, omitted when the
  instruction is empty or absent), then `user` / `assistant` alternating, ending with `assistant`;
- text (`fanfics`: `TEXT`; `red_pajama`: `text`, `meta` ignored): `{id, source, doc_id, text}`.

A row that breaks the schema raises `RowRejected(field, reason)` (the mix quarantines it): wrong type, missing
field, empty conversation / text / turn, NUL characters, text not encodable as UTF-8. Content is kept verbatim.

Identity: `doc_id = "<source>/<blake2b-128 of the normalised content>"` (content-addressed: stable across
re-sharding and re-ordering, equal for exact duplicates); a row of the mix is `id = "<doc_id>/<chunk_index>"`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca8k.data.readers import Reject, iter_rows, list_data_files, position_key

if TYPE_CHECKING:
    from orca8k.config import HubSource, SourceConfig


class RowRejected(Exception):
    """A row breaks its source's schema: `field` (dotted path in the raw row) and `reason`."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


MISSING = "missing field"


@dataclass(frozen=True)
class Document:
    """A normalised document: `messages` (chat) or `text` (text), its content digest and size in characters."""

    kind: str
    digest: bytes  # blake2b-128 of the canonical content
    chars: int  # characters of the text, or of all message contents
    messages: list[dict[str, str]] | None = None
    text: str | None = None


def _string(value: Any, field: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowRejected(field, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowRejected(field, "empty")
    if "\x00" in value:
        raise RowRejected(field, f"NUL character at char {value.index(chr(0))}")
    return value


def _digest(kind: str, payload: str, field: str) -> bytes:
    try:
        data = payload.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowRejected(field, f"not encodable as UTF-8 (lone surrogate at char {err.start})") from None
    return hashlib.blake2b(data, digest_size=16, person=kind.encode()).digest()


def _chat_digest(messages: list[dict[str, str]]) -> bytes:
    """blake2b-128 over `role NUL content NUL ...` — unambiguous, since contents with NUL are rejected."""
    h = hashlib.blake2b(digest_size=16, person=b"chat")
    try:
        for m in messages:
            h.update(m["role"].encode())
            h.update(b"\0")
            h.update(m["content"].encode("utf-8"))
            h.update(b"\0")
    except UnicodeEncodeError as err:
        raise RowRejected("conversation", f"not encodable as UTF-8 (lone surrogate at char {err.start})") from None
    return h.digest()


def _require_object(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise RowRejected("(row)", f"expected a JSON object, got {type(row).__name__}")
    return row


def normalise_orca_chat(row: Any) -> Document:
    """orca-chat row → chat `Document` (see module docstring).

    Raises:
        RowRejected: not an object; `conversation` missing, not a list, or empty; a turn not an object or with a
            missing / non-string / empty `input` or `output`; `instruction` not a string; NUL characters.
    """
    row = _require_object(row)
    if "conversation" not in row or row["conversation"] is None:
        raise RowRejected("conversation", MISSING)
    turns = row["conversation"]
    if not isinstance(turns, list):
        raise RowRejected("conversation", f"expected a list, got {type(turns).__name__}")
    if not turns:
        raise RowRejected("conversation", "empty conversation")
    messages: list[dict[str, str]] = []
    system = row.get("instruction")
    if system is not None:
        system = _string(system, "instruction", allow_empty=True)
        if system.strip():
            messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowRejected(f"conversation[{i}]", f"expected an object, got {type(turn).__name__}")
        for key, role in (("input", "user"), ("output", "assistant")):
            if turn.get(key) is None:
                raise RowRejected(f"conversation[{i}].{key}", MISSING)
            messages.append({"role": role, "content": _string(turn[key], f"conversation[{i}].{key}")})
    return Document(
        kind="chat",
        digest=_chat_digest(messages),
        chars=sum(len(m["content"]) for m in messages),
        messages=messages,
    )


def _text_adapter(field: str) -> Callable[[Any], Document]:
    def normalise(row: Any) -> Document:
        row = _require_object(row)
        if row.get(field) is None:
            raise RowRejected(field, MISSING)
        text = _string(row[field], field)
        return Document(kind="text", digest=_digest("text", text, field), chars=len(text), text=text)

    normalise.__doc__ = f"""Row → text `Document` from field `{field}`.

    Raises:
        RowRejected: not an object; `{field}` missing, not a string, empty or whitespace-only, holding NUL
            characters or lone surrogates.
    """
    return normalise


@dataclass(frozen=True)
class Adapter:
    """How to read one source format: record kind, required field, parquet columns, the normaliser."""

    format: str
    kind: str
    required_field: str
    columns: tuple[str, ...]
    normalise: Callable[[Any], Document]


ADAPTERS: dict[str, Adapter] = {
    "orca_chat": Adapter("orca_chat", "chat", "conversation", ("instruction", "conversation"), normalise_orca_chat),
    "fanfics": Adapter("fanfics", "text", "TEXT", ("TEXT",), _text_adapter("TEXT")),
    "red_pajama": Adapter("red_pajama", "text", "text", ("text",), _text_adapter("text")),
}


def adapter_for(fmt: str) -> Adapter:
    """The adapter of a source format (`orca_chat`, `fanfics`, `red_pajama`).

    Raises:
        KeyError: unknown format (the config already restricts it).
    """
    return ADAPTERS[fmt]


def doc_id(source: str, digest: bytes) -> str:
    """`<source>/<32 hex digits of the content digest>`."""
    return f"{source}/{digest.hex()}"


def row_id(source: str, digest: bytes, chunk_index: int) -> str:
    """`<doc_id>/<chunk_index>`: unique and stable across runs."""
    return f"{source}/{digest.hex()}/{chunk_index}"


def to_record(source: str, doc: Document) -> dict[str, Any]:
    """The record of a whole document: chat `{id, source, doc_id, messages}` or text `{id, source, doc_id, text}`
    (`id` is the row id of chunk 0)."""
    base = {"id": row_id(source, doc.digest, 0), "source": source, "doc_id": doc_id(source, doc.digest)}
    if doc.kind == "chat":
        return {**base, "messages": doc.messages}
    return {**base, "text": doc.text}


def source_path(src: SourceConfig, data_root: Path) -> Path:
    """Absolute path of a source's local snapshot (`path` is relative to `paths.data`)."""
    p = Path(src.path).expanduser()
    return p if p.is_absolute() else data_root / p


def iter_records(name: str, src: SourceConfig, data_root: Path, max_row_bytes: int | None = None) -> Iterator[tuple[dict[str, Any] | None, dict[str, Any] | None]]:
    """Read a local source through its adapter, streaming.

    Args:
        name: the source's name in params (`orca-chat`, `fanfics`, `red_pajama`).
        src: its config (`format`, `path`).
        data_root: `paths.data`.
        max_row_bytes: rows larger than this are rejected unparsed.

    Yields:
        `(record, None)` for a good row, `(None, reject)` for a bad one, where `reject` is
        `{"source", "file", "line"|"row", "field", "reason"}` with `file` relative to `data_root`.

    Raises:
        DataError: the path does not exist or a file is unreadable (see `orca8k.data.readers.iter_rows`).
    """
    adapter = adapter_for(src.format)
    for path in list_data_files(source_path(src, data_root)):
        rel = relative_to(path, data_root)
        pos_key = position_key(path)
        for raw in iter_rows(path, adapter.columns, max_row_bytes):
            reject: Reject | None = raw.reject
            if reject is None:
                try:
                    yield to_record(name, adapter.normalise(raw.value)), None
                    continue
                except RowRejected as err:
                    reject = Reject(err.field, err.reason)
            yield None, {"source": name, "file": rel, pos_key: raw.position, "field": reject.field, "reason": reject.reason}


def relative_to(path: Path, root: Path) -> str:
    """`path` relative to `root` in POSIX form (outputs must not depend on where a run lives); as is if outside."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


# --------------------------------------------------------------------------------------------------- the hub
def hf_token() -> str | None:
    """`HF_TOKEN` from the environment (for gated datasets and models). Never logged."""
    return os.environ.get("HF_TOKEN") or None


def iter_hub_rows(hub: HubSource, revision: str | None = None, limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Stream the raw rows of a hub dataset through `datasets` (streaming: nothing is downloaded in full).

    Args:
        hub: repo id, data files and split (a local dataset folder works too, for tests and mirrors).
        revision: the commit sha to read (default: `hub.revision`).
        limit: stop after this many rows.

    Yields:
        Raw rows in the source's own schema (feed them to the adapter).

    Raises:
        OfflineError: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set and `hub.repo_id` is not a local folder.
    """
    from orca8k.errors import OfflineError

    local = Path(hub.repo_id).expanduser().is_dir()
    if not local and offline_switch() is not None:
        raise OfflineError(f"{hub.repo_id}: {offline_switch()}=1 is set (offline mode); unset it to stream from the hub")
    import datasets

    ds = datasets.load_dataset(
        hub.repo_id,
        data_files=hub.data_files,
        split=hub.split,
        revision=None if local else (revision or hub.revision),
        streaming=True,
        token=hf_token(),
    )
    if limit is not None:
        ds = ds.take(limit)
    yield from ds


def offline_switch() -> str | None:
    """The name of the offline switch that is on (`HF_HUB_OFFLINE` or `HF_DATASETS_OFFLINE`), else None."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(key, "").strip().lower() in ("1", "true", "yes", "on"):
            return key
    return None
