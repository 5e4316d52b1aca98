"""`orca8k demo-data`: write the deterministic demo sources into `paths.data`, in the three real schemas.

The same config gives the same bytes on every run and machine (so `data.dvc` stays valid): JSON lines written with
a fixed key order, `ensure_ascii=True`, `\\n` line ends, no floats, and every row drawn from its own
`random.Random` seeded from (config seed, source, row index) through sha256 — no global RNG, no iteration over sets
or hashes. Row `i` is therefore the same whatever the row counts. No two rows of a source are the same document: a
row that repeats an earlier one (by the mix's content digest, `orca8k.data.sources`) is drawn again from a stream of
its own, so the mix drops no duplicates.

- `orca-chat/orca-chat-gpt4.jsonl`: `{"instruction": ORCA system prompt, "conversation": [{"input", "output"}, ...]}`,
  1-6 turns of checkable tasks (`orca8k.data.demo_chat`).
- `fanfics/train.jsonl`: `{"TITLE", "TEXT"}`, stories of tens of thousands of characters whose later parts recall
  their opening (`orca8k.data.demo_text`).
- `red_pajama/sample.jsonl`: `{"text", "meta"}` with `meta` a JSON string, as in RedPajama: registries, songs and
  passkey documents.

Why the content looks like this (and what it lets the demo show) is in the README, "The demo and the real recipe".
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orca8k.config import Config
from orca8k.data.demo_chat import make_conversation
from orca8k.data.demo_text import make_story, make_web_document
from orca8k.data.sources import adapter_for
from orca8k.errors import ConfigError
from orca8k.layout import DEMO_FILE_NAMES, Layout


def row_rng(seed: int, stream: str, index: int) -> random.Random:
    """The private generator of one row: `random.Random` seeded with sha256(`seed/stream/index`) as an integer."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}".encode("ascii")).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def jsonl_line(row: dict[str, Any]) -> str:
    """One JSON line with the row's own key order, ASCII only; floats are refused (their text may vary)."""

    def check(value: Any) -> None:
        if isinstance(value, float):
            raise TypeError("demo rows must not contain floats")
        if isinstance(value, dict):
            for v in value.values():
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)

    check(row)
    return json.dumps(row, ensure_ascii=True, sort_keys=False, separators=(", ", ": ")) + "\n"


def write_jsonl(path: Path, rows: Iterator[dict[str, Any]]) -> int:
    """Write rows as JSON lines (bytes, `\\n` line ends); returns the row count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("wb") as fh:
        for row in rows:
            fh.write(jsonl_line(row).encode("ascii"))
            n += 1
    return n


def source_rows(cfg: Config, fmt: str) -> Iterator[dict[str, Any]]:
    """The demo rows of one source format (`orca_chat`, `fanfics`, `red_pajama`), each from its own generator.

    Raises:
        ConfigError: `demo_data` is null (a real recipe has no demo data).
    """
    demo = cfg.demo_data
    if demo is None:
        raise ConfigError("demo_data: null in this params file (a real recipe); use `orca8k fetch-data`")
    makers: dict[str, tuple[int, Callable[[random.Random, int], dict[str, Any]]]] = {
        "orca_chat": (demo.orca_chat_conversations, lambda rng, i: make_conversation(rng)),
        "fanfics": (demo.fanfics_stories, lambda rng, i: make_story(rng, demo.fanfics_story_chars)),
        "red_pajama": (demo.red_pajama_documents,
                       lambda rng, i: make_web_document(rng, i, demo.red_pajama_document_chars)),
    }
    count, make = makers[fmt]
    normalise = adapter_for(fmt).normalise
    seen: set[bytes] = set()
    for i in range(count):
        row = make(row_rng(cfg.seed, fmt, i), i)
        redraw = 0
        while (digest := normalise(row).digest) in seen:
            # the same document as an earlier row, as the mix sees it (short single-turn tasks can collide): draw
            # row i again from a stream of its own, so the mix drops nothing and row i depends on rows < i only
            redraw += 1
            row = make(row_rng(cfg.seed, f"{fmt}/redraw{redraw}", i), i)
        seen.add(digest)
        yield row


def write_demo_data(cfg: Config) -> dict[str, Path]:
    """Write every configured source's demo rows under `paths.data` (existing files are replaced).

    A source whose `path` ends in `.jsonl` is written to that file; otherwise `path` is a folder and the file gets
    the source format's name from `orca8k.layout.DEMO_FILE_NAMES`.

    Args:
        cfg: the config; reads `seed`, `demo_data`, `paths.data`, `data.sources.*.{format, path}`.

    Returns:
        `{source name: written file}` in the order of `data.sources`.

    Raises:
        ConfigError: `demo_data` is null, or a source path is not a folder or a `.jsonl` file.
    """
    layout = Layout.from_config(cfg)
    written: dict[str, Path] = {}
    for name, src in cfg.data.sources.items():
        target = layout.data / src.path
        if target.suffix == ".jsonl":
            path = target
        elif target.suffix:
            raise ConfigError(f"data.sources.{name}.path: {src.path!r} must be a folder or a .jsonl file for demo data")
        else:
            path = target / DEMO_FILE_NAMES[src.format]
        write_jsonl(path, source_rows(cfg, src.format))
        written[name] = path
    return written
