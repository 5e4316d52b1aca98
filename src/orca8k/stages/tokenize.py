"""Stage `tokenize`: the validated mix → the OA fine-tuning tokenizer, tokenized train/val sets and token statistics.

Reads `layout.mix_train` / `layout.mix_val` (CONTRACTS §1), the validation result (it must be a success) and the
base tokenizer (`orca8k.model.base.resolve_base`). Writes:

- `layout.tokenizer`: `prepare_tokenizer(base)` (OA special tokens, pinned settings, chat template);
- `layout.tokenized_val`: one example per row (`datasets.save_to_disk`), columns `id` (`{row_id}#{part}`),
  `row_id`, `source`, `kind`, `part`, `parts`, `input_ids`, `labels`, `assistant_turns`, `cut_tokens`;
- `layout.tokenized_train`: the same columns, or with `tokenize.packing` packed rows `input_ids`, `labels`,
  `position_ids`, `num_examples`, `sources` (each example's source, for train's per-source token curves;
  `orca8k.data.packing`); with `tokenize.packing_strategy: bfd_text_fill` the texts' windows are first cut again
  to fill the rows (`_text_fill`);
- `layout.tokenize_dropped`: examples dropped for having no supervised token (JSON lines, with the reason);
- `layout.token_validation`: the token-level suite (`orca8k.validation.token_suite`: result JSON + Data Docs); a
  failing check stops the stage with `ValidationFailed`;
- `layout.tokenize_metrics` (DVC metrics): per split and per source rows, examples, tokens, supervised tokens, share,
  split/cut/drop counts and rates (`plan.py` reads `["train"]["rows" | "tokens" | "supervised_tokens"]`).

Encoding is `EncodeBatches` inside `datasets.map` (batched, Arrow in and out; up to `tokenize.num_proc` processes, one
per `MIN_CHARS_PER_PROCESS` chars of the split's text; progress bar): segments of a batch go through the Rust
tokenizer in one call, and in one process the next batch's call runs in a thread while this batch is assembled.
Packing plans bins per shard of examples so memory stays bounded by the shard, not the split; the plan is made first
(from the examples' lengths), then a thread materialises and saves the packed rows while the val split is encoded and
the token suite checks the examples. The suite's packed batches come last and wait for the packed rows' statistics,
which the thread hands over before it writes and saves the last shard (the run id hashes the plan for them:
`orca8k.validation.harness`, deferred batches). `phase_seconds` in the summary are per phase; the packing thread's
(`pack`, `save_packed`) overlap the others. The stage runs with the heap it found frozen (`_frozen_heap`) and a 1 ms
thread switch interval (`_switch_interval`), both put back when it ends.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from orca8k.config import Config
from orca8k.data.chat_format import ChatEncoder, RowError, SegmentedRows
from orca8k.data.packing import pack_table, plan_bins, text_fill_table
from orca8k.data.token_stats import (
    BOOL_STAT_COLUMNS,
    EXAMPLE_STAT_COLUMNS,
    SpecialIds,
    example_stats,
    packed_row_stats,
)
from orca8k.errors import DataError, StageInputMissing, ValidationFailed
from orca8k.layout import Layout
from orca8k.model.tokenizer import load_base_tokenizer, padded_vocab_size, prepare_tokenizer
from orca8k.stages import StageResult
from orca8k.validation.report import require_passed

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    from datasets import Dataset

SPLITS = ("train", "val")
MAP_BATCH_ROWS = 256  # mix rows per datasets.map batch (one Rust tokenizer call per batch)
PACK_SHARD_EXAMPLES = 65536  # examples planned together by the bin packer (bounds memory)
# characters of text a datasets.map worker process must get before one is started: a pool costs ≈ 0.3-0.4 s to start,
# feed and join (measured on the bench's val split: 0.13 s in-process, 0.39-0.55 s with 2 workers), and 8 M chars are
# ≈ 2.5 M tokens, 1.5-2 CPU-s of tokenizing, so a worker's start costs at most about a quarter of its work
MIN_CHARS_PER_PROCESS = 8_000_000
META_COLUMNS = ("id", "row_id", "source", "kind", "part", "parts", "assistant_turns", "cut_tokens")
SWITCH_INTERVAL = 0.001  # seconds between the interpreter's thread switches while the stage runs (`_switch_interval`)
STAT_PREFIX = "stat_"  # per-example statistics ride along in the encoded work file, dropped before anything is saved
STAT_COLUMNS = tuple(STAT_PREFIX + c for c in EXAMPLE_STAT_COLUMNS)


def run(cfg: Config) -> StageResult:
    """Tokenize the mix (see the module docstring).

    Returns:
        `StageResult` with the outputs and, per split, rows, examples, tokens and supervised tokens.

    Raises:
        StageInputMissing: the mix, the validation result or the base tokenizer is missing.
        ValidationFailed: the mix's validation result is not a success, or the token-level suite fails (its result,
            Data Docs and the metrics are still written).
        DataError: a mix row breaks the input contract (the message names the file, the row id and the field), or
            a split has no rows.

    On any failure or interrupt the train/val datasets are removed (the packing thread is stopped first): only
    tokens that passed the suite stay, and `orca8k train` refuses data without a passing result.
    """
    with _frozen_heap(), _switch_interval(SWITCH_INTERVAL):
        return _run(cfg)


def _run(cfg: Config) -> StageResult:
    layout = Layout.from_config(cfg)
    t = cfg.tokenize
    timer = _Timer()
    _check_inputs(layout)
    # the train split is read (pyarrow, off the GIL) while the tokenizer is built and saved
    with ThreadPoolExecutor(1, thread_name_prefix="orca8k-read") as reader, timer("tokenizer"):
        train_table = reader.submit(_read_mix, layout.mix_train, "train")
        tokenizer = prepare_tokenizer(load_base_tokenizer(_base_dir(cfg)))
        if layout.tokenized.exists():
            shutil.rmtree(layout.tokenized)
        layout.tokenized.mkdir(parents=True)
        layout.metrics.mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(layout.tokenizer)
        encoder = ChatEncoder(tokenizer, train_on_system=t.train_on_system)
    special = SpecialIds.of(encoder)
    stats: dict[str, pd.DataFrame] = {}
    counts: dict[str, dict[str, Any]] = {}
    dropped_lines: list[str] = []
    processes: dict[str, int] = {}  # datasets.map worker processes per split (1: in-process)
    # packing runs in this pool's one thread while the val split is encoded and the examples are validated (Arrow
    # and numpy release the GIL); the token suite's packed batches wait for its statistics
    pool = ThreadPoolExecutor(1, thread_name_prefix="orca8k-pack")
    packing: Future | None = None  # the packing thread's work; `packed_stats` its statistics, ready before it ends
    packed_stats: Future | None = None
    stop = threading.Event()
    try:
        for split, path in (("train", layout.mix_train), ("val", layout.mix_val)):
            with timer(f"read_{split}"):
                if split == "train":
                    table, train_table = train_table.result(), None  # no reference left once it is encoded
                else:
                    table = _read_mix(path, split)
                num_proc = processes_for(_text_chars(table), t.num_proc)
                mix_rows = _mix_rows(table)
            with timer(f"encode_{split}"), _rust_threads(num_proc == 1):
                examples, dropped = _encode_split(table, path, encoder, t.max_length, num_proc, layout.tokenize_work,
                                                  split)
            del table
            processes[split] = num_proc
            dropped_lines += dropped
            fill_plans = None
            if split == "train" and t.packing and t.packing_strategy == "bfd_text_fill":
                with timer("text_fill"):
                    examples, fill_plans = _text_fill(examples, t.max_length, special, t.train_on_system,
                                                      layout.tokenize_work)
            with timer("stats"):
                stats[split] = _example_frame(examples)
                examples = examples.remove_columns(list(STAT_COLUMNS))
            out = layout.tokenized_train if split == "train" else layout.tokenized_val
            if split == "train" and t.packing:
                with timer("plan"):
                    plans = fill_plans or _plan(stats[split]["num_tokens"].to_numpy(), t.max_length)
                if not plans:
                    raise DataError(f"{path}: no train example left to pack")
                counts[split] = {"rows": sum(map(len, plans)),
                                 "plan_fingerprint": _plan_fingerprint(plans, t.packing_strategy)}
                packed_stats = Future()
                packing = pool.submit(_pack, examples, plans, t.max_length, layout.tokenize_work, special, out, timer,
                                      counts[split]["plan_fingerprint"], stop, packed_stats)
            else:
                with timer("save"):
                    examples.save_to_disk(str(out))
                counts[split] = {"rows": len(examples)}
            counts[split]["mix_rows"] = mix_rows
            del examples
        layout.tokenize_dropped.write_text("".join(dropped_lines), encoding="utf-8")
        vocab = {"vocab_size": len(tokenizer),
                 "padded_vocab_size": padded_vocab_size(tokenizer, cfg.model.pad_vocab_size_multiple)}
        metrics = _metrics(cfg, stats, counts, dropped_lines, vocab)
        layout.tokenize_metrics.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        with timer("validate"):
            validation = _validate(cfg, layout, stats, counts, metrics, packed_stats)
        if packing is not None:
            with timer("wait_packing"):
                packing.result()  # the last shard's write and the save; its error, if any
    except BaseException as err:
        # nothing downstream may train on tokens that failed their contract or were never checked (an error, an
        # interrupt): train/val go; after a failed suite, its result, the Data Docs, the metrics and the dropped
        # examples stay to explain why; after another error, a passing result would vouch for nothing
        stop.set()
        pool.shutdown(wait=True)
        for out in (layout.tokenized_train, layout.tokenized_val):
            shutil.rmtree(out, ignore_errors=True)
        if not isinstance(err, ValidationFailed):
            layout.token_validation_result.unlink(missing_ok=True)
        raise
    finally:
        pool.shutdown(wait=True)  # the packing thread reads the work folder
        shutil.rmtree(layout.tokenize_work, ignore_errors=True)
    return StageResult(
        stage="tokenize",
        outputs={"tokenizer": layout.tokenizer, "train": layout.tokenized_train, "val": layout.tokenized_val,
                 "dropped": layout.tokenize_dropped, "validation": layout.token_validation,
                 "metrics": layout.tokenize_metrics},
        summary={split: {k: metrics[split][k] for k in ("rows", "examples", "tokens", "supervised_tokens")}
                 for split in SPLITS} | {"token_validation": validation, "phase_seconds": timer.seconds,
                                      "phase_cpu_seconds": timer.cpu_seconds, "processes": processes},
    )


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """The objects alive before the stage in the garbage collector's permanent generation while it runs
    (`gc.freeze`), put back after (`gc.unfreeze`); nothing is done when the process has frozen objects already (its
    owner manages them).

    A full (generation 2) collection traverses every tracked object. The stage's process holds the imported
    transformers, torch, datasets and Great Expectations (≈ 0.5 M objects), so each one that the stage's own
    allocations triggered took ≈ 0.1-0.2 s (measured with `gc.callbacks` on `benchmarks/bench_tokenize.py`'s text:
    1.14 s in 9 full collections over 4 runs, 0.53 s frozen), and in `datasets.map`'s forked workers it would also
    write to, so copy, every inherited page. Garbage from before the stage is collected after it instead of during it.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def _switch_interval(seconds: float) -> Iterator[None]:
    """The interpreter's thread switch interval (`sys.setswitchinterval`) at `seconds` while the stage runs, then as it
    was. The stage's threads wait on each other: `datasets.map`'s pool threads and its polling main thread pass the
    workers' messages along, and the packing thread's Arrow writes give the GIL up and take it back at every batch
    while the main thread runs the token suite's Python. At the default 5 ms each hand-over can wait a full interval;
    at 1 ms the stage took 0.06-0.1 s less on `benchmarks/bench_tokenize.py`'s text (median of 6 runs, twice each way:
    `encode_train` and the packing thread's `save_packed` shrink)."""
    import sys

    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@contextlib.contextmanager
def _rust_threads(in_process: bool) -> Iterator[None]:
    """`TOKENIZERS_PARALLELISM` while a split is encoded, and as it was afterwards.

    In-process (`processes_for` gave 1): orca8k's default `false` (forked workers elsewhere would otherwise warn or
    deadlock) is lifted to `true`, so the Rust tokenizer uses its threads; no process is forked meanwhile. A value
    the user set always wins.

    With workers: `datasets.Dataset.map(num_proc>1)` sets the variable to `false` for them, then rebinds
    `os.environ` to a copy taken before, so the C-level environment (which the Rust tokenizer reads) and the original
    mapping (held by anything that imported it, pytest's monkeypatch for one) keep `false`: with a user's `true`, the
    rest of the process would tokenize on one thread.

    On exit the original mapping is put back, and the variable set (or unset) through it, which calls
    `putenv`/`unsetenv`.
    """
    import orca8k

    key = "TOKENIZERS_PARALLELISM"
    mapping = os.environ
    previous = mapping.get(key)
    if in_process and key in orca8k.ENV_DEFAULTS_APPLIED:
        mapping[key] = "true"
    try:
        yield
    finally:
        os.environ = mapping  # noqa: B003 -- the original mapping object back (datasets rebinds the name)
        if previous is None:
            mapping.pop(key, None)
            os.unsetenv(key)  # the mapping may lack the key while the process environment holds it
        else:
            mapping[key] = previous


class _Timer:
    """Wall-clock and CPU seconds (this process, all its threads) per named phase, summed over repeats."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)
            self.cpu_seconds[name] = round(self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu, 3)


# --------------------------------------------------------------------------------------------------- inputs
def _check_inputs(layout: Layout) -> None:
    for path in (layout.mix_train, layout.mix_val):
        if not path.is_file():
            raise StageInputMissing(f"{path}: no mix (run `orca8k mix` first)")
    require_passed(layout.validation_result, "no validation result (run `orca8k validate` first)",
                   "the mix failed validation; fix the data before tokenize")


def _base_dir(cfg: Config) -> Path:
    """The base tokenizer's folder (`orca8k.model.base.resolve_base`: `paths.base` for the demo, the recorded
    snapshot for a hub base)."""
    from orca8k.model.base import resolve_base

    return Path(resolve_base(cfg))


def _mix_rows(table: pa.Table) -> dict[str, int]:
    """Rows per source of a mix split (`_read_mix`'s table)."""
    import pyarrow.compute as pc

    counts = pc.value_counts(table.column("source").combine_chunks())
    return {str(c["values"]): int(c["counts"]) for c in counts.to_pylist()}


# --------------------------------------------------------------------------------------------------- encoding
def _features() -> Any:
    from datasets import Features, List, Value

    int32 = Value("int32")
    return Features({
        "id": Value("string"), "row_id": Value("string"), "source": Value("string"), "kind": Value("string"),
        "part": int32, "parts": int32, "input_ids": List(int32), "labels": List(int32), "assistant_turns": int32,
        "cut_tokens": int32, "dropped": Value("bool"),
    } | {STAT_PREFIX + c: Value("bool" if c in BOOL_STAT_COLUMNS else "int64") for c in EXAMPLE_STAT_COLUMNS})


class EncodeBatches:
    """The `datasets.map` function (Arrow format, `with_indices=True`): a batch of mix rows → one output row per
    example (dropped ones flagged, `_features()` columns), built as Arrow arrays straight from the encoder's lists.

    With `prefetch` (the split's table, read in `batch_rows` batches in order: one process), the next batch's
    segments go through the Rust tokenizer (`ChatEncoder.segment_rows`, which releases the GIL) in a background
    thread while this batch is assembled, so the tokenizer's threads and the Python work share the cores; a batch
    that was not prefetched is segmented on the spot. Without `prefetch` (picklable: `num_proc > 1`) each batch is
    encoded in turn.

    Args:
        encoder: the chat encoder.
        max_length: tokens per example.
        source_file: named in errors.
        prefetch: the table `datasets.map` runs over (no indices mapping), or None.
        batch_rows: `datasets.map`'s `batch_size`.

    Raises:
        DataError: (on call) naming `source_file`, the row id and the field.
    """

    def __init__(self, encoder: ChatEncoder, max_length: int, source_file: str, prefetch: pa.Table | None = None,
                 batch_rows: int = MAP_BATCH_ROWS) -> None:
        self.encoder, self.max_length, self.source_file = encoder, max_length, source_file
        self.special = SpecialIds.of(encoder)
        self.table, self.batch_rows = prefetch, batch_rows
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future] | None = None

    def __call__(self, batch: pa.Table, indices: list[int]) -> pa.Table:
        start = indices[0] if indices else 0
        pending, self._pending = self._pending, None
        current = pending[1] if pending is not None and pending[0] == start else None
        following = start + len(indices)
        if self.table is not None and following < len(self.table):  # the next batch, while this one is assembled
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="orca8k-tokenize")
            self._pending = (following, self._pool.submit(self._segment, self.table.slice(following, self.batch_rows)))
        try:
            segmented = current.result() if current is not None else self._segment(batch)
            rows = _assemble(self.encoder, segmented, self.max_length)
        except RowError as err:
            kind = batch.column("kind")[err.row].as_py()
            field = "messages" if kind == "chat" else "kind/text"
            raise DataError(f"{self.source_file}: row id={batch.column('id')[err.row].as_py()!r}: {field}: "
                            f"{err.message}") from None
        return _examples_table(batch, rows, self.special, self.encoder.train_on_system)

    def close(self) -> None:
        """Stop the prefetch thread (a pending batch is dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool, self._pending = None, None

    def _segment(self, batch: pa.Table) -> SegmentedRows:
        return self.encoder.segment_rows(batch.column("kind").to_pylist(), batch.column("messages").to_pylist(),
                                         batch.column("text").to_pylist())

    def __getstate__(self) -> dict[str, Any]:
        """What `datasets.map` pickles for each worker: no table, threads or pending batch, and the encoder without its
        `transformers` tokenizer, which encoding never touches (the segment tokenizers hold the vocabulary). The pool
        pickles one task at a time in the main process, so that tokenizer's pickling (0.032 s for the bench's 4k
        vocabulary, of 0.036 s in all) delayed each next worker's start."""
        encoder = copy.copy(self.encoder)
        encoder.tokenizer = None
        return {**self.__dict__, "encoder": encoder, "table": None, "_pool": None, "_pending": None}


@dataclass
class _FlatRow:
    """The examples one mix row became (kept, then dropped), flattened: `input_ids`/`labels` int32 `[tokens]`,
    and per example its length and meta."""

    input_ids: np.ndarray
    labels: np.ndarray
    lengths: list[int]
    part: list[int]
    parts: list[int]
    assistant_turns: list[int]
    cut_tokens: list[int]
    dropped: list[bool]


def _assemble(encoder: ChatEncoder, rows: SegmentedRows, max_length: int) -> list[_FlatRow]:
    """`ChatEncoder.assemble_rows` for the batch's chat rows, `ChatEncoder.text_example_arrays` (the same examples,
    built with numpy) for its text rows: one `_FlatRow` per mix row, in order."""
    chat = [i for i, kind in enumerate(rows.kinds) if kind == "chat"]
    assembled = encoder.assemble_rows(SegmentedRows(["chat"] * len(chat), [rows.messages[i] for i in chat],
                                                    [rows.segment_ids[i] for i in chat]), max_length)
    out: list[_FlatRow | None] = [None] * len(rows.kinds)
    for i, row in zip(chat, assembled, strict=True):
        examples = row.examples + row.dropped_examples
        out[i] = _FlatRow(
            _int32_values([e.input_ids for e in examples]), _int32_values([e.labels for e in examples]),
            [len(e) for e in examples], [e.meta["part"] for e in row.examples] + [-1 - k for k in range(row.dropped)],
            [len(row.examples)] * len(examples), [e.meta["assistant_turns"] for e in examples],
            [e.meta["cut_tokens"] for e in examples], [False] * len(row.examples) + [True] * row.dropped)
    for i, kind in enumerate(rows.kinds):
        if kind == "text":
            ids, labels, lengths = encoder.text_example_arrays(rows.segment_ids[i], max_length)
            n = len(lengths)
            out[i] = _FlatRow(ids, labels, lengths, list(range(n)), [n] * n, [0] * n, [0] * n, [False] * n)
    return out  # type: ignore[return-value]


def _examples_table(batch: pa.Table, rows: list[_FlatRow], special: SpecialIds, train_on_system: bool) -> pa.Table:
    """One output row per example of `rows` (the encoded mix rows of `batch`), kept and dropped, with its
    `example_stats` (computed from the Arrow arrays written) in `stat_*` columns."""
    import pyarrow as pa
    import pyarrow.compute as pc

    owner = np.repeat(np.arange(len(rows)), [len(r.lengths) for r in rows])  # the mix row of each output row
    lengths = np.fromiter((n for r in rows for n in r.lengths), np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def column(name: str) -> list:
        return [v for r in rows for v in getattr(r, name)]

    take = pa.array(owner, pa.int64())
    row_id = batch.column("id").take(take)
    parts = pa.array(column("part"), pa.int32())
    ids_array = pa.ListArray.from_arrays(offsets, pa.array(_concat([r.input_ids for r in rows])))
    labels_array = pa.ListArray.from_arrays(offsets, pa.array(_concat([r.labels for r in rows])))
    stats = example_stats(ids_array, labels_array, special, train_on_system)
    return pa.table({
        "id": pc.binary_join_element_wise(row_id, parts.cast(pa.string()), "#"),
        "row_id": row_id,
        "source": batch.column("source").take(take),
        "kind": batch.column("kind").take(take),
        "part": parts,
        "parts": pa.array(column("parts"), pa.int32()),
        "input_ids": ids_array,
        "labels": labels_array,
        "assistant_turns": pa.array(column("assistant_turns"), pa.int32()),
        "cut_tokens": pa.array(column("cut_tokens"), pa.int32()),
        "dropped": pa.array(column("dropped"), pa.bool_()),
    } | {STAT_PREFIX + c: pa.array(stats[c]) for c in EXAMPLE_STAT_COLUMNS})


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int32)


def _int32_values(lists: list[list[int]]) -> np.ndarray:
    """The values of Python int lists, concatenated, as one int32 array."""
    import itertools

    return np.fromiter(itertools.chain.from_iterable(lists), np.int32, sum(map(len, lists)))


def processes_for(text_chars: int, num_proc: int) -> int:
    """`datasets.map` worker processes for a split of `text_chars` characters: at most `num_proc`, and one per
    `MIN_CHARS_PER_PROCESS` characters, so a small split (the demo's, a small val split) is encoded in-process, where
    the Rust tokenizer's threads use the cores, instead of paying a pool's start for less work than it costs.

    Returns:
        1 (encode in-process) up to `num_proc`.
    """
    return max(1, min(num_proc, text_chars // MIN_CHARS_PER_PROCESS))


def _text_chars(table: pa.Table) -> int:
    """Characters of text in a mix table: the `text` of text rows and every message's `content`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    if not pa.types.is_null(table.column("text").type):  # a text column written without the mix schema, all null
        columns.append(table.column("text"))
    if not pa.types.is_null(table.column("messages").type):
        columns.append(pc.struct_field(pc.list_flatten(table.column("messages")), "content"))
    return sum(int(pc.sum(pc.utf8_length(column)).as_py() or 0) for column in columns)


def _read_mix(path: Path, split: str) -> pa.Table:
    """The columns of a mix split that the stage encodes.

    Raises:
        DataError: the split has no rows.
    """
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["id", "source", "kind", "messages", "text"])
    if table.num_rows == 0:
        raise DataError(f"{path}: the {split} split of the mix has no rows")
    return table


def _arrow_file(table: pa.Table, path: Path) -> Path:
    """Write `table` as an Arrow IPC stream (the format of datasets' cache files) at `path`; returns `path`."""
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def _encode_split(table: pa.Table, path: Path, encoder: ChatEncoder, max_length: int, num_proc: int, work: Path,
                  split: str) -> tuple[Dataset, list[str]]:
    """Encode one split of the mix (`table`, read from `path`, which errors name) with `num_proc` processes; returns
    (kept examples, dropped examples as JSON lines)."""
    from datasets import Dataset

    work.mkdir(parents=True, exist_ok=True)
    function = EncodeBatches(encoder, max_length, str(path), prefetch=table if num_proc <= 1 else None)
    # workers get the rows as a memory-mapped Arrow file (a path to pickle, not the table's bytes: their start went
    # from 0.27-0.47 to 0.19-0.35 s on the bench's 31 M chars); in-process, the table with a given fingerprint:
    # hashing it would pickle it through dill, whose code inspection prints a disassembly that Prefect's print
    # capture turns into task log lines
    arrow_copy = work / f"{split}-mix.arrow" if num_proc > 1 else None
    try:
        source = (Dataset.from_file(str(_arrow_file(table, arrow_copy))) if arrow_copy
                  else Dataset(table, fingerprint=f"orca8k-mix-{split}"))
        encoded = source.with_format("arrow").map(
            function, batched=True, batch_size=MAP_BATCH_ROWS, with_indices=True,
            num_proc=num_proc if num_proc > 1 else None, remove_columns=table.column_names, features=_features(),
            cache_file_name=str(work / f"{split}-encoded.arrow"), desc=f"tokenize {split}",
            # a fixed fingerprint: datasets would otherwise pickle the encoder (tokenizer included) to hash it; the
            # work folder is fresh on every run, so no stale cache can be picked up
            new_fingerprint=f"orca8k-tokenize-{split}", load_from_cache_file=False,
        )
    finally:
        function.close()
        if arrow_copy:
            arrow_copy.unlink(missing_ok=True)  # an uncompressed copy of the split (a map survives the unlink on POSIX)
    encoded = encoded.with_format(None)
    flags = encoded.data.column("dropped").to_numpy(zero_copy_only=False)
    dropped_rows = encoded.select(np.flatnonzero(flags)).to_list() if flags.any() else []
    lines = [json.dumps({"split": split, "id": r["id"], "row_id": r["row_id"], "source": r["source"],
                         "reason": "no supervised token", "input_ids": r["input_ids"]}) + "\n" for r in dropped_rows]
    kept = encoded.select(np.flatnonzero(~flags)) if flags.any() else encoded
    return kept.remove_columns("dropped"), lines


# --------------------------------------------------------------------------------------------------- packing
def _plan(lengths: np.ndarray, max_length: int) -> list[list[list[int]]]:
    """The bins of each shard of `PACK_SHARD_EXAMPLES` examples (`plan_bins`; indices within the shard), from the
    examples' lengths in dataset order."""
    return [plan_bins(lengths[k:k + PACK_SHARD_EXAMPLES], max_length)
            for k in range(0, len(lengths), PACK_SHARD_EXAMPLES)]


def _text_fill(examples: Dataset, max_length: int, special: SpecialIds, train_on_system: bool, work: Path
               ) -> tuple[Dataset, list[list[list[int]]]]:
    """`tokenize.packing_strategy: bfd_text_fill` on the encoded train examples: the texts' windows are cut again to
    fill the packed rows (`orca8k.data.packing.plan_text_fill`), and the plan is made on the way.

    Shard by shard (about `PACK_SHARD_EXAMPLES` examples, ending where a text ends, so a text is never split across
    shards): the chat examples are kept as they are; each text's windows, without their `<s>`, are its token stream
    (its ids and its labels as encoded); the streams are cut where the plan says, and each piece gets `<s>` (label
    -100) in front. A piece is an example like a window: `id` `{row_id}#{part}`, `part`/`parts` counted over the
    text's pieces, `stat_*` computed on its arrays. The shard's examples are its chat examples, then its pieces.

    Args:
        examples: the encoded train examples (`_features()` columns without `dropped`), a text's windows
            consecutive and in order (as `EncodeBatches` writes them).
        max_length, special, train_on_system: as for the stage.
        work: the stage's work folder (the re-cut examples are written there).

    Returns:
        (the examples, memory-mapped from `work`; one plan per shard, over its examples in that order).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset
    from datasets.table import MemoryMappedTable

    table = examples.with_format("arrow")[:]
    row_ids = table.column("row_id")
    new_row = np.ones(table.num_rows, dtype=bool)  # an example whose row differs from the previous example's
    if table.num_rows > 1:
        new_row[1:] = pc.not_equal(row_ids.slice(1), row_ids.slice(0, table.num_rows - 1)).to_numpy(
            zero_copy_only=False)
    row_starts = np.flatnonzero(new_row)
    path = work / "train-text-fill.arrow"
    plans: list[list[list[int]]] = []
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        start = 0
        while start < table.num_rows:
            k = int(np.searchsorted(row_starts, start + PACK_SHARD_EXAMPLES))
            end = int(row_starts[k]) if k < row_starts.size else table.num_rows
            shard, bins = _text_fill_shard(table.slice(start, end - start), max_length, special, train_on_system)
            writer.write_table(shard)
            plans.append(bins)
            start = end
    refilled = Dataset(MemoryMappedTable.from_file(str(path)), fingerprint="orca8k-text-fill")
    return refilled, plans


def _text_fill_shard(shard: pa.Table, max_length: int, special: SpecialIds, train_on_system: bool
                     ) -> tuple[pa.Table, list[list[int]]]:
    """One shard of `_text_fill` (`text_fill_table`): (its chat examples then its text pieces, in `shard`'s schema;
    the plan)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    fill = text_fill_table(shard, max_length, special.bos)
    whole = shard.take(pa.array(fill.whole, pa.int64()))
    if not len(fill.owner):
        return whole, fill.bins
    owner = pa.array(fill.owner, pa.int64())
    row_id, parts = shard.column("row_id").take(owner), pa.array(fill.part)
    stats = example_stats(fill.input_ids, fill.labels, special, train_on_system)
    zeros = pa.array(np.zeros(len(fill.owner), np.int32))
    columns = {
        "id": pc.binary_join_element_wise(row_id, parts.cast(pa.string()), "#"), "row_id": row_id,
        "source": shard.column("source").take(owner), "kind": shard.column("kind").take(owner),
        "part": parts, "parts": pa.array(fill.parts), "input_ids": fill.input_ids, "labels": fill.labels,
        "assistant_turns": zeros, "cut_tokens": zeros,
    } | {STAT_PREFIX + c: pa.array(stats[c]) for c in EXAMPLE_STAT_COLUMNS}
    text = pa.table(columns).select(shard.schema.names).cast(shard.schema)
    out = pa.concat_tables([whole, text]).combine_chunks()
    # the token statistics of the examples before and after (each computed from its own arrays) must agree: the
    # same supervised tokens, and one `<s>` per piece instead of one per window
    windows = len(shard) - len(whole)

    def total(table: pa.Table, name: str) -> int:
        return int(pc.sum(table.column(STAT_PREFIX + name)).as_py() or 0)

    if (total(out, "supervised_tokens"), total(out, "num_tokens")) != (
            total(shard, "supervised_tokens"), total(shard, "num_tokens") - windows + len(fill.owner)):
        raise DataError("tokenize: the text fill changed the supervised tokens or lost tokens (a bug: please report)")
    return out, fill.bins


def _plan_fingerprint(plans: list[list[list[int]]], strategy: str = "bfd") -> str:
    """sha256 of the plan (every bin's example indices, in order, per shard): the packed batches' key in the token
    suite's content-addressed run id (the packed rows are these bins of the examples, whose frames the run id
    hashes)."""
    import hashlib

    h = hashlib.sha256((f"shard={PACK_SHARD_EXAMPLES}" + (f";strategy={strategy}" if strategy != "bfd" else ""))
                       .encode())  # bfd's plans hash as before the strategies existed
    for bins in plans:
        h.update(np.array([len(b) for b in bins], np.int64).tobytes())
        h.update(np.fromiter((i for b in bins for i in b), np.int64).tobytes())
    return h.hexdigest()


def _pack(examples: Dataset, plans: list[list[list[int]]], max_length: int, work: Path, special: SpecialIds,
          out: Path, timer: _Timer, plan_fingerprint: str, stop: threading.Event, stats: Future) -> None:
    """Pack the examples shard by shard with `plans` (one per shard, non-empty) into an Arrow stream file under
    `work` and save the packed dataset to `out` (its datasets fingerprint from the plan's, so the saved bytes are
    the same on every run). `stats` gets `packed_row_stats` per row + `num_examples`, taken from each shard as it is
    packed, as soon as the last shard's are taken: the token suite checks them while the last shard is written and
    saved. Runs in the packing thread: its phases (`pack`, `save_packed`) overlap the main thread's; `stop` (the
    main thread failed or was interrupted) ends it before the next shard, without saving.

    Raises:
        _PackingStopped: `stop` was set (also set on `stats`, like any error before the statistics were ready).
    """
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import MemoryMappedTable

    path = work / "train-packed.arrow"
    writer = None
    parts = []
    try:
        with timer("pack"):
            source = examples.select_columns(["input_ids", "labels", "source"]).with_format("arrow")  # curves
            start = 0
            for k, bins in enumerate(plans):  # a plan per shard of consecutive examples, in order
                if stop.is_set():
                    raise _PackingStopped
                size = sum(map(len, bins))
                packed = pack_table(source[start:start + size], max_length, bins)
                start += size
                parts.append(packed_row_stats(packed.column("input_ids"), packed.column("labels"),
                                              packed.column("position_ids"), special)
                             | {"num_examples": packed.column("num_examples").to_numpy()})
                if k == len(plans) - 1:
                    stats.set_result({key: np.concatenate([p[key] for p in parts]) for key in parts[0]})
                if writer is None:
                    writer = pa.ipc.new_stream(str(path), packed.schema)
                writer.write_table(packed)
            writer.close()
        if stop.is_set():
            raise _PackingStopped
        with timer("save_packed"):
            dataset = Dataset(MemoryMappedTable.from_file(str(path)),
                              fingerprint=f"orca8k-packed-{plan_fingerprint[:16]}")
            dataset.save_to_disk(str(out))
    except BaseException as err:
        if not stats.done():
            stats.set_exception(err)
        raise


class _PackingStopped(Exception):
    """The packing thread stopped early because the stage failed or was interrupted."""


# --------------------------------------------------------------------------------------------------- statistics
def _example_frame(examples: Dataset) -> pd.DataFrame:
    """One row per example: the meta columns and the `stat_*` columns (`orca8k.data.token_stats.example_stats`,
    computed per batch as the examples were written), named without the prefix."""
    table = examples.select_columns(list(META_COLUMNS + STAT_COLUMNS)).with_format("arrow")[:]
    frame = table.to_pandas()
    return frame.rename(columns={s: s.removeprefix(STAT_PREFIX) for s in STAT_COLUMNS})


def _rates(df: pd.DataFrame, mix_rows: int, dropped: int) -> dict[str, Any]:
    tokens, supervised = int(df["num_tokens"].sum()), int(df["supervised_tokens"].sum())
    split_rows = int(df.loc[df["parts"] > 1, "row_id"].nunique())
    cut = int((df["cut_tokens"] > 0).sum())
    return {
        "mix_rows": mix_rows,
        "examples": len(df),
        "tokens": tokens,
        "supervised_tokens": supervised,
        "supervised_share": round(supervised / tokens, 6) if tokens else 0.0,
        "split_rows": split_rows,
        "split_rate": round(split_rows / mix_rows, 6) if mix_rows else 0.0,
        "extra_examples": int(len(df) - df["row_id"].nunique()),
        "cut_examples": cut,
        "cut_tokens": int(df["cut_tokens"].sum()),
        "cut_rate": round(cut / len(df), 6) if len(df) else 0.0,
        "dropped_examples": dropped,
        "drop_rate": round(dropped / (len(df) + dropped), 6) if len(df) + dropped else 0.0,
        "max_tokens": int(df["num_tokens"].max()) if len(df) else 0,
    }


def _metrics(cfg: Config, stats: dict[str, pd.DataFrame], counts: dict[str, dict[str, Any]], dropped_lines: list[str],
             vocab: dict[str, int]) -> dict[str, Any]:
    t = cfg.tokenize
    dropped = [json.loads(line) for line in dropped_lines]
    out: dict[str, Any] = {"max_length": t.max_length, "packing": t.packing,
                           "packing_strategy": t.packed_by, "tokenizer": vocab}
    for split in SPLITS:
        # the columns `_rates` reads (filtering the Arrow-backed frame copies every column it keeps)
        df = stats[split][["source", "row_id", "parts", "num_tokens", "supervised_tokens", "cut_tokens"]]
        mix_rows = counts[split]["mix_rows"]
        drops = [d for d in dropped if d["split"] == split]
        entry = _rates(df, sum(mix_rows.values()), len(drops))
        entry["rows"] = counts[split]["rows"]
        if split == "train" and t.packing:  # the plan's rows (the token suite checks that they hold every token)
            entry["fill"] = round(entry["tokens"] / (counts[split]["rows"] * t.max_length), 6)
        entry["sources"] = {
            source: _rates(df[df["source"] == source], mix_rows.get(source, 0),
                           sum(1 for d in drops if d["source"] == source))
            for source in sorted(set(mix_rows) | set(df["source"].unique()))
        }
        out[split] = entry
    return out


def _validate(cfg: Config, layout: Layout, stats: dict[str, pd.DataFrame], counts: dict[str, dict[str, Any]],
              metrics: dict[str, Any], packed_stats: Future | None) -> dict[str, Any]:
    """The token-level suite through the shared GX harness (`orca8k.validation.token_suite`); raises on failure.
    The packed batches come last and wait for `packed_stats` (the packed rows' statistics)."""
    from orca8k.validation.token_suite import PackedRows, validate_tokens

    packed = None if packed_stats is None else PackedRows(packed_stats.result, counts["train"]["plan_fingerprint"])
    return validate_tokens(cfg, layout, stats, packed, metrics)
