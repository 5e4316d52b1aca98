"""The `tokenize` stage: outputs equal a direct encoding of the mix, packing keeps every token, exact metrics,
input contracts, and the independent token statistics the validation suite relies on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from orca8k.data.chat_format import IGNORE_INDEX, ChatEncoder
from orca8k.data.collate import CausalLMCollator
from orca8k.data.packing import plan_bins, plan_text_fill
from orca8k.data.token_stats import SpecialIds, example_stats, packed_row_stats
from orca8k.errors import DataError, StageInputMissing, ValidationFailed
from orca8k.layout import Layout
from orca8k.model.tokenizer import load_tokenizer
from tests.fixtures.common import REPO, run_cli
from tests.fixtures.tokenize import TWO_TURNS, mix_rows, prepare_run

MAX_LENGTH = 64


def direct(rows: list[dict], tokenizer, max_length: int = MAX_LENGTH):
    """The examples of `rows` encoded one row at a time, outside datasets.map (the reference)."""
    enc = ChatEncoder(tokenizer)
    out = []
    for r in rows:
        res = (enc.encode_chat_examples(r["messages"], max_length) if r["kind"] == "chat"
               else enc.encode_text_examples(r["text"], max_length))
        out.append((r, res))
    return out


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, base_tokenizer_dir):
    from orca8k.stages import run_stage

    root = tmp_path_factory.mktemp("tokenize_packed")
    cfg = prepare_run(root, base_tokenizer_dir, [f"tokenize.max_length={MAX_LENGTH}", "tokenize.packing=true"])
    return cfg, run_stage("tokenize", cfg)


def test_val_is_one_example_per_row_equal_to_a_direct_encoding(packed_run):
    from datasets import load_from_disk

    cfg, result = packed_run
    layout = Layout.from_config(cfg)
    tokenizer = load_tokenizer(layout.tokenizer)
    val = load_from_disk(str(layout.tokenized_val))
    assert val.column_names == ["id", "row_id", "source", "kind", "part", "parts", "input_ids", "labels",
                                "assistant_turns", "cut_tokens"]
    expected = [(r, e) for r, res in direct(mix_rows(6, 4, seed=2), tokenizer) for e in res.examples]
    assert len(val) == len(expected) == result.summary["val"]["examples"] == result.summary["val"]["rows"]
    for got, (row, e) in zip(val, expected, strict=True):
        assert got["input_ids"] == e.input_ids and got["labels"] == e.labels
        assert (got["row_id"], got["source"], got["kind"]) == (row["id"], row["source"], row["kind"])
        assert got["id"] == f"{row['id']}#{e.meta['part']}" and got["parts"] == e.meta["parts"]
        assert len(got["input_ids"]) <= MAX_LENGTH


def test_packed_train_keeps_every_token_and_restarts_positions(packed_run):
    from datasets import load_from_disk

    cfg, result = packed_run
    layout = Layout.from_config(cfg)
    tokenizer = load_tokenizer(layout.tokenizer)
    train = load_from_disk(str(layout.tokenized_train))
    assert train.column_names == ["input_ids", "labels", "position_ids", "num_examples", "sources"]
    examples = [e for _, res in direct(mix_rows(24, 12, seed=1), tokenizer) for e in res.examples]
    lengths = [len(e) for e in examples]
    assert len(train) == len(plan_bins(lengths, MAX_LENGTH)) == result.summary["train"]["rows"]
    assert sum(train["num_examples"]) == len(examples) == result.summary["train"]["examples"]
    flat = [t for row in train["input_ids"] for t in row]
    assert sorted(flat) == sorted(t for e in examples for t in e.input_ids)
    assert sum(len(r) for r in train["input_ids"]) == sum(lengths) == result.summary["train"]["tokens"]
    supervised = sum(sum(1 for x in row if x != IGNORE_INDEX) for row in train["labels"])
    assert supervised == sum(e.num_supervised for e in examples) == result.summary["train"]["supervised_tokens"]
    for row in train:
        assert len(row["input_ids"]) <= MAX_LENGTH
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) == row["num_examples"] and starts[0] == 0
        assert all(row["input_ids"][i] == tokenizer.bos_token_id for i in starts)
        assert row["input_ids"].count(tokenizer.bos_token_id) == row["num_examples"] == len(row["sources"])
    # each packed example keeps its source: supervised tokens per source add up to the examples'
    by_source: dict[str, int] = {}
    for row in train:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["labels"])]
        for name, a, b in zip(row["sources"], starts, starts[1:], strict=False):
            by_source[name] = by_source.get(name, 0) + sum(1 for x in row["labels"][a:b] if x != IGNORE_INDEX)
    expected: dict[str, int] = {}
    for row, res in direct(mix_rows(24, 12, seed=1), tokenizer):
        for e in res.examples:
            expected[row["source"]] = expected.get(row["source"], 0) + e.num_supervised
    assert by_source == expected and len(expected) > 1
    # what the train engineer gets from the collator
    batch = CausalLMCollator(pad_token_id=tokenizer.pad_token_id)([train[0], train[1]])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape


@pytest.mark.parametrize("shard_examples", [None, 7])
def test_text_fill_keeps_chats_whole_and_cuts_the_texts_to_fill_the_rows(tmp_path, base_tokenizer_dir, packed_run,
                                                                         monkeypatch, shard_examples):
    from datasets import load_from_disk

    import orca8k.stages.tokenize as stage
    from orca8k.stages import run_stage

    if shard_examples:  # several shards, each ending where a text ends
        monkeypatch.setattr(stage, "PACK_SHARD_EXAMPLES", shard_examples)
    cfg = prepare_run(tmp_path, base_tokenizer_dir, [f"tokenize.max_length={MAX_LENGTH}", "tokenize.packing=true",
                                                     "tokenize.packing_strategy=bfd_text_fill"])
    result = run_stage("tokenize", cfg)  # the token suite passed on the re-cut examples and their rows
    layout = Layout.from_config(cfg)
    tokenizer = load_tokenizer(layout.tokenizer)
    bos = tokenizer.bos_token_id
    train = load_from_disk(str(layout.tokenized_train))
    # the reference, shard by shard of the direct encoding's examples: the chat examples whole, each text's windows
    # without <s> as one stream, cut by plan_text_fill
    encoded = direct(mix_rows(24, 12, seed=1), tokenizer)
    owners = [k for k, (_, res) in enumerate(encoded) for _ in res.examples]
    bounds, start = [], 0
    while start < len(owners):
        end = min(start + (shard_examples or len(owners)), len(owners))
        while end < len(owners) and owners[end] == owners[end - 1]:
            end += 1
        bounds.append((owners[start], owners[end - 1] + 1))  # mix rows [a, b)
        start = end
    expected_rows, all_pieces = [], 0
    for a, b in bounds:
        shard = encoded[a:b]
        whole = [(r["source"], e) for r, res in shard if r["kind"] == "chat" for e in res.examples]
        streams = [(r["source"], [t for e in res.examples for t in e.input_ids[1:]],
                    [t for e in res.examples for t in e.labels[1:]]) for r, res in shard if r["kind"] == "text"]
        pieces, bins = plan_text_fill([len(e) for _, e in whole], [len(ids) for _, ids, _ in streams], MAX_LENGTH)
        examples = [(src, e.input_ids, e.labels) for src, e in whole] + [
            (streams[t][0], [bos, *streams[t][1][i:j]], [IGNORE_INDEX, *streams[t][2][i:j]])
            for t, i, j in pieces.tolist()]
        expected_rows += [[examples[i] for i in row] for row in bins]
        all_pieces += len(pieces)
        # every text token once, in order
        assert [[t for k2, i, j in pieces.tolist() if k2 == k for t in streams[k][1][i:j]]
                for k in range(len(streams))] == [ids for _, ids, _ in streams]
    assert len(bounds) > 2 if shard_examples else len(bounds) == 1
    assert len(train) == len(expected_rows) == result.summary["train"]["rows"]
    for row, exp in zip(train, expected_rows, strict=True):
        assert row["input_ids"] == [t for e in exp for t in e[1]]
        assert row["labels"] == [t for e in exp for t in e[2]]
        assert row["position_ids"] == [p for e in exp for p in range(len(e[1]))]
        assert row["sources"] == [e[0] for e in exp] and row["num_examples"] == len(exp)
    assert json.loads(layout.tokenize_metrics.read_text())["packing_strategy"] == "bfd_text_fill"
    metrics = json.loads(layout.tokenize_metrics.read_text())["train"]
    bfd = json.loads(Layout.from_config(packed_run[0]).tokenize_metrics.read_text())["train"]
    assert metrics["supervised_tokens"] == bfd["supervised_tokens"]  # nothing lost, nothing supervised twice
    windows = sum(len(res.examples) for r, res in encoded if r["kind"] == "text")
    assert metrics["tokens"] - bfd["tokens"] == all_pieces - windows  # one <s> per piece instead of per window
    assert metrics["sources"]["fanfics"]["split_rows"] > 0
    if not shard_examples:  # one shard: fewer, fuller rows than whole-example packing
        assert metrics["rows"] < bfd["rows"] and metrics["fill"] > bfd["fill"]


def test_a_text_fill_that_loses_supervision_stops_the_stage(tmp_path, base_tokenizer_dir, monkeypatch):
    import dataclasses

    import pyarrow as pa

    import orca8k.stages.tokenize as stage
    from orca8k.stages import run_stage

    real = stage.text_fill_table

    def broken(*args, **kwargs):  # one supervised label of the first piece lost
        fill = real(*args, **kwargs)
        labels = fill.labels.to_pylist()
        labels[0][1] = IGNORE_INDEX
        return dataclasses.replace(fill, labels=pa.array(labels, fill.labels.type))

    monkeypatch.setattr(stage, "text_fill_table", broken)
    cfg = prepare_run(tmp_path, base_tokenizer_dir, [f"tokenize.max_length={MAX_LENGTH}", "tokenize.packing=true",
                                                     "tokenize.packing_strategy=bfd_text_fill"])
    with pytest.raises(DataError, match="the text fill changed the supervised tokens or lost tokens"):
        run_stage("tokenize", cfg)
    assert not Layout.from_config(cfg).tokenized_train.exists()


def test_metrics_are_exact_per_split_and_source(packed_run):
    cfg, _ = packed_run
    layout = Layout.from_config(cfg)
    tokenizer = load_tokenizer(layout.tokenizer)
    metrics = json.loads(layout.tokenize_metrics.read_text())
    assert (metrics["max_length"], metrics["packing"], metrics["packing_strategy"]) == (MAX_LENGTH, True, "bfd")
    assert metrics["tokenizer"] == {"vocab_size": 605, "padded_vocab_size": 608}
    for split, rows in (("train", mix_rows(24, 12, seed=1)), ("val", mix_rows(6, 4, seed=2))):
        encoded = direct(rows, tokenizer)
        for source in ("orca-chat", "fanfics"):
            mine = [(r, res) for r, res in encoded if r["source"] == source]
            ex = [e for _, res in mine for e in res.examples]
            m = metrics[split]["sources"][source]
            assert m["mix_rows"] == len(mine)
            assert m["examples"] == len(ex)
            assert m["tokens"] == sum(len(e) for e in ex)
            assert m["supervised_tokens"] == sum(e.num_supervised for e in ex)
            assert m["split_rows"] == sum(1 for _, res in mine if len(res.examples) > 1)
            assert m["extra_examples"] == len(ex) - len(mine)
            assert m["cut_examples"] == sum(res.cut_exchanges for _, res in mine)
            assert m["cut_tokens"] == sum(res.cut_tokens for _, res in mine)
            assert m["dropped_examples"] == 0 and m["max_tokens"] <= MAX_LENGTH
        assert metrics[split]["tokens"] == sum(metrics[split]["sources"][s]["tokens"] for s in ("orca-chat", "fanfics"))
    assert metrics["train"]["sources"]["fanfics"]["split_rows"] > 0  # the long texts were windowed
    assert metrics["train"]["sources"]["fanfics"]["supervised_share"] > 0.97
    assert 0 < metrics["train"]["fill"] <= 1
    assert layout.tokenize_dropped.read_text() == ""


def test_unpacked_train_is_one_example_per_row_and_the_same_with_two_processes(tmp_path, base_tokenizer_dir,
                                                                              monkeypatch):
    from datasets import load_from_disk

    from orca8k.stages import run_stage
    from orca8k.stages import tokenize as stage

    # text that spells special tokens: plain text in every process (a pickled `tokenizers.Tokenizer` forgets
    # `encode_special_tokens`, so the workers used to parse these as special tokens)
    rows = mix_rows(24, 12, seed=1)
    rows[1]["messages"][0]["content"] = "Say <|assistant|> then </s> and <s>, please."
    rows[-1]["text"] = "Plain </s> text with <|prompter|> inside. " + rows[-1]["text"]
    tables = []
    for name, num_proc, min_chars, processes in (("a", 1, 1, {"train": 1, "val": 1}),
                                                 ("b", 2, 1, {"train": 2, "val": 2}),
                                                 # the default floor: this small mix stays in-process
                                                 ("c", 2, stage.MIN_CHARS_PER_PROCESS, {"train": 1, "val": 1})):
        monkeypatch.setattr(stage, "MIN_CHARS_PER_PROCESS", min_chars)
        cfg = prepare_run(tmp_path / name, base_tokenizer_dir, [f"tokenize.max_length={MAX_LENGTH}",
                                                                "tokenize.packing=false", f"tokenize.num_proc={num_proc}"],
                          train_rows=rows)
        result = run_stage("tokenize", cfg)
        assert result.summary["processes"] == processes
        train = load_from_disk(str(Layout.from_config(cfg).tokenized_train))
        assert len(train) == result.summary["train"]["rows"] == result.summary["train"]["examples"]
        assert "source" in train.column_names
        tables.append(train.data.table)
    assert tables[0].equals(tables[1]) and tables[0].equals(tables[2])


@pytest.mark.parametrize("before", [None, "false", "true"])
def test_worker_processes_leave_the_environment_as_it_was(tmp_path, base_tokenizer_dir, monkeypatch, before):
    """datasets.map(num_proc>1) sets TOKENIZERS_PARALLELISM=false and rebinds os.environ to a copy; the stage puts
    the original mapping and the process environment (what the Rust tokenizer reads) back."""
    import os

    from orca8k.stages import run_stage
    from orca8k.stages import tokenize as stage

    key = "TOKENIZERS_PARALLELISM"
    monkeypatch.setattr(stage, "MIN_CHARS_PER_PROCESS", 1)
    if before is None:
        monkeypatch.delenv(key, raising=False)
        os.unsetenv(key)
    else:
        monkeypatch.setenv(key, before)
    original = os.environ
    cfg = prepare_run(tmp_path, base_tokenizer_dir, [f"tokenize.max_length={MAX_LENGTH}", "tokenize.num_proc=2"],
                      train_rows=mix_rows(4, 2), val_rows=mix_rows(2, 1))
    assert run_stage("tokenize", cfg).summary["processes"] == {"train": 2, "val": 2}
    assert os.environ is original
    assert os.environ.get(key) == process_getenv(key) == before


def test_a_bad_row_in_a_worker_names_file_row_and_field(tmp_path, base_tokenizer_dir, monkeypatch):
    from orca8k.stages import run_stage
    from orca8k.stages import tokenize as stage

    monkeypatch.setattr(stage, "MIN_CHARS_PER_PROCESS", 1)
    bad = mix_rows(3, 0) + [{"id": "orca-chat-bad", "source": "orca-chat", "doc_id": "x", "kind": "chat",
                             "messages": [{"role": "user", "content": "q"}], "text": None, "chunk_index": 0}]
    cfg = prepare_run(tmp_path, base_tokenizer_dir, ["tokenize.num_proc=2"], train_rows=bad)
    with pytest.raises(DataError, match=r"train.parquet: row id='orca-chat-bad': messages: messages\[0\].role: "
                                        r"a conversation must end with an assistant reply"):
        run_stage("tokenize", cfg)
    layout = Layout.from_config(cfg)
    assert not layout.tokenize_work.exists() and not layout.tokenized_train.exists()


def process_getenv(key: str) -> str | None:
    """`key` in the C-level process environment (what native code reads), not Python's `os.environ` mapping."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_char_p
    value = libc.getenv(key.encode())
    return None if value is None else value.decode()


def test_processes_follow_the_text_size():
    from orca8k.stages.tokenize import MIN_CHARS_PER_PROCESS, _text_chars, processes_for

    assert [processes_for(n * MIN_CHARS_PER_PROCESS, 4) for n in (0, 1, 2, 3, 7)] == [1, 1, 2, 3, 4]
    assert processes_for(MIN_CHARS_PER_PROCESS - 1, 16) == 1 and processes_for(10**12, 1) == 1
    import pyarrow as pa

    from orca8k.data.mix_output import MIX_SCHEMA

    rows = mix_rows(2, 1)
    table = pa.Table.from_pylist(rows, schema=MIX_SCHEMA)
    expected = sum(len(m["content"]) for r in rows if r["messages"] for m in r["messages"])
    expected += sum(len(r["text"]) for r in rows if r["text"])
    assert _text_chars(table) == expected > 0
    assert _text_chars(table.slice(0, 0)) == 0
    # a split written without the mix schema: a column of nulls has Arrow type null
    chats_only = pa.table({"messages": [[{"role": "user", "content": "añb"}, {"role": "assistant", "content": "cd"}]],
                           "text": pa.nulls(1)})
    texts_only = pa.table({"messages": pa.nulls(1), "text": ["héllo"]})
    assert (_text_chars(chats_only), _text_chars(texts_only)) == (5, 5)


def test_the_stage_runs_with_the_heap_frozen_and_a_short_switch_interval_and_puts_both_back(monkeypatch):
    import gc
    import sys

    import orca8k.stages.tokenize as tk

    seen = []

    def body(cfg):
        seen.append((gc.get_freeze_count(), sys.getswitchinterval()))
        if cfg == "fail":
            raise DataError("boom")
        return cfg

    monkeypatch.setattr(tk, "_run", body)
    interval = sys.getswitchinterval()
    assert gc.get_freeze_count() == 0 and interval != tk.SWITCH_INTERVAL
    assert tk.run("ok") == "ok"
    assert seen[-1][0] > 0 and seen[-1][1] == tk.SWITCH_INTERVAL
    assert (gc.get_freeze_count(), sys.getswitchinterval()) == (0, interval)
    with pytest.raises(DataError, match="boom"):
        tk.run("fail")
    assert seen[-1][0] > 0 and (gc.get_freeze_count(), sys.getswitchinterval()) == (0, interval)
    gc.freeze()  # a process that froze its own heap: left as it is
    try:
        frozen = gc.get_freeze_count()
        tk.run("ok")
        assert seen[-1][0] == frozen == gc.get_freeze_count()
    finally:
        gc.unfreeze()


def test_the_map_function_pickles_without_the_transformers_tokenizer(tokenizer):
    import pickle

    from orca8k.stages.tokenize import EncodeBatches

    encoder = ChatEncoder(tokenizer)
    function = EncodeBatches(encoder, 64, "mix.parquet")
    copy = pickle.loads(pickle.dumps(function))
    assert copy.encoder.tokenizer is None and function.encoder.tokenizer is tokenizer  # the original is untouched
    texts = ["Hello world, once more.\nA second line.", "<|assistant|> stays text </s>"]
    assert copy.encoder.segment_ids_batch(texts) == encoder.segment_ids_batch(texts)
    assert copy.encoder.segment_ids_batch(texts, first=True) == encoder.segment_ids_batch(texts, first=True)


def test_stage_refuses_missing_or_failed_inputs(tmp_path, base_tokenizer_dir):
    from orca8k.stages import run_stage

    cfg = prepare_run(tmp_path / "failed", base_tokenizer_dir, success=False)
    with pytest.raises(ValidationFailed, match="the mix failed validation"):
        run_stage("tokenize", cfg)
    cfg = prepare_run(tmp_path / "nomix", base_tokenizer_dir)
    Layout.from_config(cfg).mix_val.unlink()
    with pytest.raises(StageInputMissing, match="val.parquet: no mix"):
        run_stage("tokenize", cfg)
    bad = mix_rows(3, 0) + [{"id": "orca-chat-bad", "source": "orca-chat", "doc_id": "x", "kind": "chat",
                             "messages": [{"role": "user", "content": "q"}], "text": None, "chunk_index": 0}]
    cfg = prepare_run(tmp_path / "bad", base_tokenizer_dir, train_rows=bad)
    with pytest.raises(DataError, match=r"train.parquet: row id='orca-chat-bad': messages: messages\[0\].role: "
                                        r"a conversation must end with an assistant reply"):
        run_stage("tokenize", cfg)


def test_cli_runs_the_stage(tmp_path, base_tokenizer_dir):
    prepare_run(tmp_path, base_tokenizer_dir, [f"tokenize.max_length={MAX_LENGTH}"],
                train_rows=mix_rows(4, 2), val_rows=mix_rows(2, 1))
    proc = run_cli("tokenize", "--params", str(REPO / "params.yaml"), "--set", f"paths.root={tmp_path}",
                   "--set", f"tokenize.max_length={MAX_LENGTH}", cwd=tmp_path)
    assert f"[tokenize] wrote metrics: {tmp_path / 'metrics' / 'tokenize.json'}" in proc.stdout


# ------------------------------------------------------------------------------ independent statistics
def stats_of(examples, special, train_on_system=False):
    import pyarrow as pa

    ids = pa.array([e[0] for e in examples], pa.list_(pa.int32()))
    labels = pa.array([e[1] for e in examples], pa.list_(pa.int32()))
    return {k: v.tolist() for k, v in example_stats(ids, labels, special, train_on_system).items()}


def test_example_stats_count_from_the_arrays_alone(tokenizer):
    enc = ChatEncoder(tokenizer)
    special = SpecialIds.of(enc)
    chat = enc.encode_chat(TWO_TURNS)
    text = enc.encode_text("The river.")
    stats = stats_of([(chat.input_ids, chat.labels), (text.input_ids, text.labels)], special)
    assert stats["num_tokens"] == [len(chat), len(text)]
    assert stats["supervised_tokens"] == [chat.num_supervised, len(text) - 1]
    assert stats["supervised_eos"] == [2, 1] and stats["eos_tokens"] == [5, 1]
    assert stats["bos_tokens"] == [1, 1] and stats["bos_first"] == [True, True]
    assert (stats["system_tokens"], stats["prompter_tokens"], stats["assistant_tokens"]) == ([1, 0], [2, 0], [2, 0])
    assert stats["complete_replies"] == [2, 0] and stats["ends_with_eos"] == [True, True]
    assert stats["label_mismatch"] == [0, 0]
    assert stats["supervised_outside_reply"][0] == 0
    # forged masks are seen: a supervised prompter turn, a supervised role token, a cut reply, a wrong label
    p = chat.input_ids.index(special.prompter)
    forged = list(chat.labels)
    forged[p + 1] = chat.input_ids[p + 1]
    a = chat.input_ids.index(special.assistant)
    forged[a] = special.assistant
    forged[a + 1] = 7 if chat.input_ids[a + 1] != 7 else 8
    cut_ids, cut_labels = chat.input_ids[:-1], chat.labels[:-1]
    s = stats_of([(chat.input_ids, forged), (cut_ids, cut_labels)], special)
    assert s["supervised_outside_reply"] == [2, 0] and s["label_mismatch"] == [1, 0]
    assert s["complete_replies"] == [2, 1] and s["supervised_eos"] == [2, 1]
    assert stats_of([(chat.input_ids, chat.labels)], special, train_on_system=True)["supervised_outside_reply"] == [0]


def test_example_stats_on_malformed_rows_by_hand():
    """Rows the encoder never makes, counted by hand: a role token at an example's first position (no BOS), two role
    tokens in a row, a supervised token before any role token, and a reply running to the end without `</s>`."""
    special = SpecialIds(bos=1, eos=2, system=3, prompter=4, assistant=5)
    rows = [
        # <|assistant|> x </s>   (starts with a role token; its own label supervised)
        ([5, 9, 2], [5, 9, 2]),
        # <s> 9 <|prompter|><|assistant|> 9 9     (supervised before any role; adjacent roles; reply without </s>)
        ([1, 9, 4, 5, 9, 9], [-100, 9, -100, -100, 9, 9]),
        # <s> <|system|> 7 </s> <|prompter|> 8 </s> <|assistant|> 6 </s>
        ([1, 3, 7, 2, 4, 8, 2, 5, 6, 2], [-100, -100, 7, -100, -100, -100, -100, -100, 6, 2]),
    ]
    s = stats_of(rows, special)
    assert s["num_tokens"] == [3, 6, 10] and s["supervised_tokens"] == [3, 3, 3]
    assert s["bos_first"] == [False, True, True] and s["bos_tokens"] == [0, 1, 1]
    assert s["assistant_tokens"] == [1, 1, 1] and s["prompter_tokens"] == [0, 1, 1] and s["system_tokens"] == [0, 0, 1]
    assert s["complete_replies"] == [1, 0, 1] and s["ends_with_eos"] == [True, False, True]
    assert s["supervised_eos"] == [1, 0, 1] and s["eos_tokens"] == [1, 0, 3]
    # row 0: the role token's own label; row 1: the token before any role; row 2: the system content
    assert s["supervised_outside_reply"] == [1, 1, 1]
    assert stats_of(rows, special, train_on_system=True)["supervised_outside_reply"] == [1, 1, 0]
    assert s["label_mismatch"] == [0, 0, 0]


def test_packed_row_stats_see_broken_positions():
    import pyarrow as pa

    special = SpecialIds(bos=1, eos=2, system=3, prompter=4, assistant=5)
    rows = {"input_ids": [[1, 9, 2, 1, 9], [1, 9, 9]], "labels": [[-100, 9, 2, -100, 9], [-100, 9, 9]],
            "position_ids": [[0, 1, 2, 0, 1], [0, 2, 3]]}
    cols = {k: pa.array(v, pa.list_(pa.int32())) for k, v in rows.items()}
    s = {k: v.tolist() for k, v in packed_row_stats(cols["input_ids"], cols["labels"], cols["position_ids"],
                                                    special).items()}
    assert s == {"num_tokens": [5, 3], "supervised_tokens": [3, 2], "segments": [2, 1], "bos_tokens": [2, 1],
                 "bos_at_restart": [2, 1], "broken_positions": [0, 1], "label_at_restart": [0, 0]}
    assert np.array_equal(np.asarray(s["segments"]), np.asarray(s["bos_at_restart"]))
    # the same counts from chunked columns: one chunk that is a slice of a longer array (read without a copy), and
    # two chunks (combined)
    extra = {"input_ids": [[1, 9]], "labels": [[-100, 9]], "position_ids": [[0, 1]]}
    sliced = {k: pa.chunked_array([pa.array(extra[k] + v, pa.list_(pa.int32())).slice(1)]) for k, v in rows.items()}
    split = {k: pa.chunked_array([pa.array(v[:1], pa.list_(pa.int32())), pa.array(v[1:], pa.list_(pa.int32()))])
             for k, v in rows.items()}
    for cols in (sliced, split):
        got = packed_row_stats(cols["input_ids"], cols["labels"], cols["position_ids"], special)
        assert {k: v.tolist() for k, v in got.items()} == s


# ------------------------------------------------------------------------------ the token-level suite
def test_the_token_suite_passes_and_writes_its_result(packed_run):
    cfg, result = packed_run
    layout = Layout.from_config(cfg)
    data = json.loads(layout.token_validation_result.read_text())
    assert data["success"] is True and result.summary["token_validation"]["success"] is True
    assert data["run_id"] == result.summary["token_validation"]["run_id"]
    batches = set(data["batches"])
    assert batches == {"orca-chat.train", "orca-chat.val", "fanfics.train", "fanfics.val", "sources", "packed",
                       "packing"}
    checks = {(c["batch"], c["check"]) for c in data["checks"]}
    for name in ("one_eos_per_reply", "eos_closes_blocks", "supervised_only_in_replies", "supervised_min",
                 "max_length", "one_bos", "bos_first", "labels_equal_inputs", "replies_match_encoder"):
        assert ("orca-chat.train", name) in checks
    for name in ("all_targets_supervised", "no_role_tokens", "eos_only_at_the_end"):
        assert ("fanfics.val", name) in checks
    assert ("sources", "supervised_share") in checks and ("packed", "positions_restart_and_step") in checks
    assert set(data["rates"]) == {"orca-chat.train", "orca-chat.val", "fanfics.train", "fanfics.val"}
    assert (layout.token_data_docs / "index.html").is_file()


def test_a_share_out_of_bounds_stops_the_stage_after_writing_results(tmp_path, base_tokenizer_dir, capsys):
    from orca8k.stages import run_stage

    cfg = prepare_run(tmp_path, base_tokenizer_dir, [f"tokenize.max_length={MAX_LENGTH}",
                                                     "tokenize.min_supervised_share=0.9"])
    with pytest.raises(ValidationFailed, match=r"supervised_share") as raised:
        run_stage("tokenize", cfg)
    # the failing checks are said once: in the error (the CLI prints it), not also on stdout before it
    assert "FAILED sources: supervised_share" in str(raised.value)
    assert "FAILED" not in capsys.readouterr().out
    layout = Layout.from_config(cfg)
    data = json.loads(layout.token_validation_result.read_text())
    failed = {(c["batch"], c["check"]) for c in data["checks"] if not c["success"]}
    assert failed == {("sources", "supervised_share")}
    (check,) = [c for c in data["checks"] if not c["success"]]
    assert {e["id"] for e in check["examples"]} == {"orca-chat.train", "orca-chat.val"}  # chat share < 0.9
    assert json.loads(layout.tokenize_metrics.read_text())["train"]["sources"]["orca-chat"]["supervised_share"] < 0.9
    assert not layout.tokenized_train.exists() and not layout.tokenized_val.exists()  # nothing to train on


def test_an_error_in_the_packing_thread_stops_the_stage_and_the_work_folder_goes(tmp_path, base_tokenizer_dir,
                                                                                 monkeypatch):
    import orca8k.stages.tokenize as stage
    from orca8k.stages import run_stage

    def broken_pack(*_args, **_kwargs):
        raise RuntimeError("disk full while packing")

    monkeypatch.setattr(stage, "pack_table", broken_pack)
    cfg = prepare_run(tmp_path, base_tokenizer_dir, [f"tokenize.max_length={MAX_LENGTH}", "tokenize.packing=true"])
    with pytest.raises(RuntimeError, match="disk full while packing"):
        run_stage("tokenize", cfg)
    layout = Layout.from_config(cfg)
    assert not layout.tokenize_work.exists()
    assert not layout.tokenized_train.exists() and not layout.tokenized_val.exists()  # nothing unchecked stays
    assert not layout.token_validation_result.exists()  # the suite stopped at the packed batch, before its result


def test_a_save_error_after_the_suite_passed_removes_the_data_and_its_result(tmp_path, base_tokenizer_dir,
                                                                             monkeypatch):
    """The packing thread hands its statistics to the suite before it saves the last shard: a failure there comes
    after a passing suite, and still leaves nothing for train (no data, no result vouching for it)."""
    from datasets import Dataset

    from orca8k.stages import run_stage

    save = Dataset.save_to_disk

    def failing_save(self, path, *args, **kwargs):
        if Path(path).name == "train":
            raise OSError("no space left on device")
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_to_disk", failing_save)
    cfg = prepare_run(tmp_path, base_tokenizer_dir, [f"tokenize.max_length={MAX_LENGTH}", "tokenize.packing=true"])
    with pytest.raises(OSError, match="no space left"):
        run_stage("tokenize", cfg)
    layout = Layout.from_config(cfg)
    assert (layout.token_data_docs / "index.html").is_file()  # the suite ran to the end
    assert not layout.token_validation_result.exists()
    assert not layout.tokenized_train.exists() and not layout.tokenized_val.exists()
    assert not layout.tokenize_work.exists()


def test_a_rerun_writes_the_same_bytes_except_the_data_docs(packed_run):
    """Downstream stages depend on train/, val/, tokenizer/ and the result: a rerun on the same inputs must not make
    them stale (the packed set's datasets fingerprint comes from the plan; Data Docs pages carry the run time)."""
    import hashlib

    from orca8k.stages import run_stage

    cfg, _ = packed_run
    tokenized = Layout.from_config(cfg).tokenized

    def digests() -> dict[str, str]:
        return {p.relative_to(tokenized).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(tokenized.rglob("*")) if p.is_file() and "data_docs" not in p.parts}

    first = digests()
    assert "train/state.json" in first and "validation/result.json" in first
    run_stage("tokenize", cfg)
    assert digests() == first


def test_an_empty_split_is_named(tmp_path, base_tokenizer_dir):
    import pyarrow.parquet as pq

    from orca8k.stages import run_stage

    cfg = prepare_run(tmp_path, base_tokenizer_dir, [f"tokenize.max_length={MAX_LENGTH}"])
    val = Layout.from_config(cfg).mix_val
    pq.write_table(pq.read_table(val).slice(0, 0), val)
    with pytest.raises(DataError, match=r"val.parquet: the val split of the mix has no rows"):
        run_stage("tokenize", cfg)


def test_the_token_suite_catches_broken_masks_positions_and_lost_tokens(tokenizer):
    import pandas as pd

    from orca8k.config import load_config
    from orca8k.validation.harness import run_validation
    from orca8k.validation.token_suite import build_token_batches

    cfg = load_config(REPO / "params.yaml", [f"tokenize.max_length={MAX_LENGTH}"])
    enc = ChatEncoder(tokenizer)
    special = SpecialIds.of(enc)
    chat = enc.encode_chat(TWO_TURNS)
    text = enc.encode_text_examples("The queen and the dragon. " * 3, MAX_LENGTH).examples[0]
    bad_labels = list(chat.labels)
    bad_labels[chat.input_ids.index(special.prompter) + 1] = chat.input_ids[chat.input_ids.index(special.prompter) + 1]
    rows = [("c0", "orca-chat", "chat", chat.input_ids, chat.labels, 2),
            ("c1", "orca-chat", "chat", chat.input_ids, bad_labels, 2),     # a prompter token supervised
            ("c2", "orca-chat", "chat", chat.input_ids[:-1], chat.labels[:-1], 2),  # encoder says 2 replies, arrays 1
            ("t0", "fanfics", "text", text.input_ids, text.labels, 0),
            ("t1", "fanfics", "text", text.input_ids, [IGNORE_INDEX] * 2 + text.labels[2:], 0)]  # a target unsupervised
    import pyarrow as pa

    s = example_stats(pa.array([r[3] for r in rows], pa.list_(pa.int32())),
                      pa.array([r[4] for r in rows], pa.list_(pa.int32())), special)
    frame = pd.DataFrame({"id": [r[0] for r in rows], "row_id": [r[0] for r in rows], "source": [r[1] for r in rows],
                          "kind": [r[2] for r in rows], "part": 0, "parts": 1, "assistant_turns": [r[5] for r in rows],
                          "cut_tokens": 0, **s})
    metrics = {split: {"sources": {src: {"examples": 1, "tokens": 10, "supervised_tokens": 5, "supervised_share": 0.5,
                                         "split_rate": 0, "cut_rate": 0, "drop_rate": 0}
                                   for src in ("orca-chat", "fanfics")}} for split in ("train", "val")}
    packed = {"num_tokens": np.array([10, 70]), "supervised_tokens": np.array([5, 5]), "segments": np.array([2, 1]),
              "bos_tokens": np.array([2, 1]), "bos_at_restart": np.array([2, 1]), "broken_positions": np.array([0, 1]),
              "label_at_restart": np.array([0, 0]), "num_examples": np.array([2, 1])}
    report = run_validation(build_token_batches(cfg, {"train": frame, "val": frame}, packed, metrics),
                            run_name="tokens-test", data_docs_dir=None)
    failed = {(c.batch, c.check): sorted(e.get("id", e.get("value")) for e in c.examples)
              for c in report.checks if not c.success}
    assert failed == {
        ("orca-chat.train", "supervised_only_in_replies"): ["c1"],
        ("orca-chat.val", "supervised_only_in_replies"): ["c1"],
        ("orca-chat.train", "replies_match_encoder"): ["c2"],
        ("orca-chat.val", "replies_match_encoder"): ["c2"],
        ("fanfics.train", "all_targets_supervised"): ["t1"],
        ("fanfics.val", "all_targets_supervised"): ["t1"],
        ("packed", "max_length"): ["row1"],
        ("packed", "positions_restart_and_step"): ["row1"],
        ("packing", "tokens_kept"): [int(frame["num_tokens"].sum()) - 80],
        ("packing", "supervised_kept"): [int(frame["supervised_tokens"].sum()) - 10],
    }
