"""The mix stage: exact counts for a fixed seed, split by document, chunk boundaries, fraction / max_val_set,
determinism across processes, reproducing the draws from the manifest, the output contract."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from orca8k.data.mix_output import MIX_SCHEMA
from orca8k.data.mixing import index_source, plan_source, train_row_count, val_document_count
from orca8k.data.sources import doc_id
from orca8k.layout import Layout
from orca8k.plan import make_plan
from orca8k.stages.mix import run
from tests.fixtures.common import cli_env
from tests.fixtures.mix import CHUNK, FANFIC_LENGTHS, ORCA_CONVERSATIONS, PAJAMA_LENGTHS, orca_row, text_of, write_jsonl


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def by_source(table: list[dict], source: str) -> list[dict]:
    return [r for r in table if r["source"] == source]


def test_exact_counts_for_the_seed(mix_config):
    cfg = mix_config()
    assert cfg.seed == 0xE1291F1A
    result = run(cfg)
    layout = Layout.from_config(cfg)
    manifest = json.loads(layout.mix_manifest.read_text())
    s = manifest["sources"]
    # orca-chat: 10 conversations, ceil(0.2 × 10) = 2 held out, fraction 1, one row each
    assert (s["orca-chat"]["split"]["val_documents"], s["orca-chat"]["split"]["train_documents"]) == (2, 8)
    assert (s["orca-chat"]["train"]["rows"], s["orca-chat"]["val"]["rows"]) == (8, 2)
    # fanfics: 5 stories, 1 held out (the 7-char one for this seed), chunks 3+1+3+2 = 9 train, max_val_set 2
    assert s["fanfics"]["read"]["chunks"] == 3 + 1 + 1 + 3 + 2
    assert (s["fanfics"]["train"]["chunks"], s["fanfics"]["train"]["rows"]) == (9, 9)
    assert (s["fanfics"]["val"]["chunks"], s["fanfics"]["val"]["rows"]) == (1, 1)
    # red_pajama: 20 docs → 4 held out; 29 train chunks, floor(0.25 × 29) = 7 drawn; 9 val chunks capped at 3
    assert (s["red_pajama"]["train"]["chunks"], s["red_pajama"]["train"]["rows"]) == (29, 7)
    assert (s["red_pajama"]["val"]["chunks"], s["red_pajama"]["val"]["rows"]) == (9, 3)
    assert s["red_pajama"]["read"]["chunks"] == 6 * 1 + 10 * 2 + 4 * 3
    assert manifest["totals"]["train"]["rows"] == 8 + 9 + 7 == result.summary["train_rows"]
    assert manifest["totals"]["val"]["rows"] == 2 + 1 + 3 == result.summary["val_rows"]

    train, val = rows(layout.mix_train), rows(layout.mix_val)
    assert len(train) == 24 and len(val) == 6
    # which documents and chunks, pinned for this seed (a change here changes every mix: bump the manifest version)
    orca_val_lines = sorted(int(r["messages"][-1]["content"].split()[1].split(".")[0]) + 1 for r in by_source(val, "orca-chat"))
    assert orca_val_lines == [1, 6]
    assert [(r["text"][:3], r["chunk_index"]) for r in by_source(val, "fanfics")] == [("s2|", 0)]
    assert [(r["doc_id"], r["chunk_index"]) for r in by_source(train, "red_pajama")] == [
        (doc_id("red_pajama", _digest_text(text_of(f"d{i}", PAJAMA_LENGTHS[i]))), c)
        for i, c in [(3, 0), (12, 0), (15, 0), (16, 0), (16, 2), (19, 0), (19, 1)]
    ]
    # characters per split = the characters of the rows drawn
    for name in s:
        for split, table in (("train", train), ("val", val)):
            chars = sum(len(r["text"]) if r["kind"] == "text" else sum(len(m["content"]) for m in r["messages"])
                        for r in by_source(table, name))
            assert s[name][split]["characters"] == chars
            assert s[name][split]["documents"] == len({r["doc_id"] for r in by_source(table, name)})
    # plan.py reads the realised counts from the manifest
    assert make_plan(cfg)["train_rows"] == 24
    metrics = json.loads(layout.mix_metrics.read_text())
    assert (metrics["train_rows"], metrics["val_rows"], metrics["quarantined_rows"]) == (24, 6, 0)
    assert metrics["sources"]["red_pajama"]["train_rows"] == 7


def _digest_text(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16, person=b"text").digest()


def test_contract_columns_and_record_shapes(mix_config):
    cfg = mix_config()
    run(cfg)
    layout = Layout.from_config(cfg)
    for path in (layout.mix_train, layout.mix_val):
        table = pq.read_table(path)
        assert table.schema.names == ["id", "source", "doc_id", "kind", "messages", "text", "chunk_index"]
        assert table.schema.field("chunk_index").type == MIX_SCHEMA.field("chunk_index").type
        records = table.to_pylist()
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            assert r["id"] == f"{r['doc_id']}/{r['chunk_index']}"
            if r["kind"] == "chat":
                assert r["text"] is None and r["chunk_index"] == 0 and r["source"] == "orca-chat"
                roles = [m["role"] for m in r["messages"]]
                i = int(r["messages"][-1]["content"].split()[1].split(".")[0])
                expected = ([] if i % 3 == 0 else ["system"]) + ["user", "assistant"] * ((i % 3) + 1)
                assert roles == expected  # system omitted when the instruction is empty
                assert r["messages"][-1]["content"] == orca_row(i)["conversation"][-1]["output"]
            else:
                assert r["messages"] is None and 0 < len(r["text"]) <= CHUNK


def test_no_document_in_both_splits_and_chunks_rebuild_the_text(mix_config):
    cfg = mix_config(overrides={"data.sources.red_pajama.fraction": 1.0, "data.sources.red_pajama.max_val_set": None,
                                "data.sources.fanfics.max_val_set": None})
    run(cfg)
    layout = Layout.from_config(cfg)
    train, val = rows(layout.mix_train), rows(layout.mix_val)
    assert not {r["doc_id"] for r in train} & {r["doc_id"] for r in val}
    # with nothing dropped, every document's chunks are contiguous, non-overlapping and rebuild it exactly
    texts = {}
    for r in train + val:
        if r["kind"] == "text":
            texts.setdefault(r["doc_id"], []).append((r["chunk_index"], r["text"]))
    originals = {doc_id("fanfics", _digest_text(text_of(f"s{i}", n))): text_of(f"s{i}", n) for i, n in enumerate(FANFIC_LENGTHS)}
    originals |= {doc_id("red_pajama", _digest_text(text_of(f"d{i}", n))): text_of(f"d{i}", n) for i, n in enumerate(PAJAMA_LENGTHS)}
    assert set(texts) == set(originals)
    for d, pieces in texts.items():
        pieces.sort()
        assert [c for c, _ in pieces] == list(range(math.ceil(len(originals[d]) / CHUNK)))
        assert all(len(t) == CHUNK for _, t in pieces[:-1]) and 0 < len(pieces[-1][1]) <= CHUNK
        assert "".join(t for _, t in pieces) == originals[d]
    assert len(train) + len(val) == 10 + 38 + ORCA_CONVERSATIONS


@pytest.mark.parametrize("fraction", [0.1, 0.5, 1.0])
def test_fraction_draws_without_replacement_and_nests(mix_config, tmp_path, fraction):
    cfg = mix_config(overrides={"data.sources.red_pajama.fraction": fraction})
    src = cfg.data.sources["red_pajama"]
    index = index_source("red_pajama", src, Path(cfg.paths.data), 10**6, lambda e: None)
    plan = plan_source(index, src, cfg.seed, cfg.data.val_split)
    assert plan.train.chunks == 29
    assert plan.train.rows == train_row_count(29, fraction) == max(1, math.floor(fraction * 29))
    pairs = list(zip(plan.train.doc.tolist(), plan.train.chunk_index.tolist(), strict=False))
    assert len(set(pairs)) == len(pairs)  # without replacement
    half = plan_source(index, src.model_copy(update={"fraction": 0.5}), cfg.seed, cfg.data.val_split)
    half_pairs = set(zip(half.train.doc.tolist(), half.train.chunk_index.tolist(), strict=False))
    # the ranking is fixed by the seed, so a smaller fraction draws a subset of a larger one
    assert set(pairs) <= half_pairs if fraction <= 0.5 else half_pairs <= set(pairs)
    # the held-out documents do not depend on the fraction
    assert (plan.val_docs == half.val_docs).all()


def test_max_val_set_caps_val_rows(mix_config):
    for cap, expected in ((1, 1), (5, 5), (9, 9), (100, 9), (None, 9)):
        cfg = mix_config(overrides={"data.sources.red_pajama.max_val_set": cap})
        src = cfg.data.sources["red_pajama"]
        index = index_source("red_pajama", src, Path(cfg.paths.data), 10**6, lambda e: None)
        plan = plan_source(index, src, cfg.seed, cfg.data.val_split)
        assert plan.val.rows == expected
        assert len(set(zip(plan.val.doc.tolist(), plan.val.chunk_index.tolist(), strict=False))) == expected
        assert set(plan.val.doc.tolist()) <= set(plan.val_docs.nonzero()[0].tolist())


def test_val_document_rounding_follows_the_seed():
    # sklearn's train_test_split rounding (ceil), as the seed: 236,053 conversations → 188,842 train (the card)
    assert 236_053 - val_document_count(236_053, 0.2) == 188_842
    assert val_document_count(10, 0.2) == 2 and val_document_count(11, 0.2) == 3
    assert val_document_count(2, 0.9) == 1  # at most documents - 1: train is never empty
    assert val_document_count(3, 0.01) == 1  # at least 1
    assert train_row_count(753_048, 0.25) == 188_262  # the card's RedPajama count


def test_split_depends_on_content_not_order(mix_config, tmp_path):
    cfg = mix_config()
    data2 = tmp_path / "reversed"
    lines = (Path(cfg.paths.data) / "red_pajama" / "docs.jsonl").read_bytes().splitlines()
    write_jsonl(data2 / "red_pajama" / "part-b.jsonl", lines[:7][::-1])
    write_jsonl(data2 / "red_pajama" / "part-a.jsonl", lines[7:][::-1])
    src = cfg.data.sources["red_pajama"]
    a = index_source("red_pajama", src, Path(cfg.paths.data), 10**6, lambda e: None)
    b = index_source("red_pajama", src, data2, 10**6, lambda e: None)
    pa_, pb = plan_source(a, src, cfg.seed, 0.2), plan_source(b, src, cfg.seed, 0.2)

    def ids(index, split):
        return {(index.digests[d].tobytes(), c) for d, c in zip(split.doc.tolist(), split.chunk_index.tolist(), strict=False)}

    assert ids(a, pa_.train) == ids(b, pb.train) and ids(a, pa_.val) == ids(b, pb.val)
    other = plan_source(a, src, cfg.seed + 1, 0.2)
    assert ids(a, other.val) != ids(a, pa_.val)  # the seed matters


_RUN_WITH_RNG = """
import random, sys
import numpy as np
random.seed(int(sys.argv[1])); np.random.seed(int(sys.argv[1]))
random.random(); np.random.rand(int(sys.argv[1]) % 7 + 1)
from orca8k.config import load_config
from orca8k.stages.mix import run
run(load_config(sys.argv[2], {"paths.root": sys.argv[3], "paths.data": sys.argv[4],
    "data.sources.fanfics.max_chunk_size": 10, "data.sources.red_pajama.max_chunk_size": 10}))
"""


def test_byte_identical_across_processes_and_rng_states(mix_config, tmp_path, repo_root):
    cfg = mix_config()  # writes the crafted sources
    outs = []
    for seed, hashseed in ((1, "0"), (987654, "12345")):
        root = tmp_path / f"run-{seed}"
        subprocess.run(
            [sys.executable, "-c", _RUN_WITH_RNG, str(seed), str(repo_root / "params.yaml"), str(root), cfg.paths.data],
            check=True, capture_output=True, env=cli_env({"PYTHONHASHSEED": hashseed}),
        )
        outs.append(root)
    names = ["artifacts/mix/train.parquet", "artifacts/mix/val.parquet", "artifacts/mix/manifest.json",
             "artifacts/mix/quarantine.jsonl", "metrics/mix.json"]
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_manifest_reproduces_the_drawn_ids(mix_config):
    cfg = mix_config()
    run(cfg)
    layout = Layout.from_config(cfg)
    manifest = json.loads(layout.mix_manifest.read_text())
    train, val = rows(layout.mix_train), rows(layout.mix_val)
    for name, s in manifest["sources"].items():
        for split, table in (("train", train), ("val", val)):
            ids = [r["id"] for r in by_source(table, name)]
            assert s[split]["ids_sha256"] == hashlib.sha256("".join(i + "\n" for i in ids).encode()).hexdigest()
            assert s[split]["draw"]["drawn"] == len(ids)
        # the params recorded in the manifest + the same data give the same ids
        from orca8k.config import SourceConfig

        src = SourceConfig.model_validate(s["params"])
        index = index_source(name, src, layout.data, manifest["params"]["data"]["max_row_bytes"], lambda e: None)
        plan = plan_source(index, src, manifest["params"]["seed"], manifest["params"]["data"]["val_split"])
        again = [f"{doc_id(name, index.digests[d].tobytes())}/{c}" for d, c in zip(plan.train.doc.tolist(), plan.train.chunk_index.tolist(), strict=False)]
        assert again == [r["id"] for r in by_source(train, name)]
        assert [f["sha256"] for f in s["inputs"]["files"]] == [
            hashlib.sha256((layout.data / f["file"]).read_bytes()).hexdigest() for f in s["inputs"]["files"]
        ]
    assert manifest["outputs"]["train"]["sha256"] == hashlib.sha256(layout.mix_train.read_bytes()).hexdigest()
    assert manifest["params"]["seed"] == cfg.seed and manifest["params"]["data"]["val_split"] == 0.2


def test_missing_data_folder_names_the_command(mix_config, tmp_path):
    from orca8k.errors import StageInputMissing

    cfg = mix_config(data=tmp_path / "nowhere")
    with pytest.raises(StageInputMissing, match="orca8k demo-data"):
        run(cfg)


def test_mix_of_the_real_data(realdata, tmp_path, repo_root):
    from orca8k.config import load_config

    cfg = load_config(repo_root / "params.yaml", {"paths.root": str(tmp_path), "paths.data": str(realdata)})
    run(cfg)
    layout = Layout.from_config(cfg)
    manifest = json.loads(layout.mix_manifest.read_text())
    s = manifest["sources"]
    assert {n: s[n]["read"]["documents"] for n in s} == {"orca-chat": 225, "fanfics": 6, "red_pajama": 240}
    assert {n: s[n]["read"]["quarantined"] for n in s} == {"orca-chat": 0, "fanfics": 0, "red_pajama": 0}
    # realdata README: 4 RedPajama documents exceed 65,535 characters (2 chunks each, none reaches 131,071)
    assert s["red_pajama"]["read"]["chunks"] == 240 + 4
    assert [s[n]["split"]["val_documents"] for n in s] == [45, 2, 48]  # ceil(0.2 × documents)
    assert s["orca-chat"]["train"]["rows"] == 180 and s["orca-chat"]["val"]["rows"] == 45
    assert s["red_pajama"]["train"]["rows"] == s["red_pajama"]["train"]["chunks"] // 4
    assert s["red_pajama"]["val"]["rows"] == min(100, s["red_pajama"]["val"]["chunks"])
    train, val = rows(layout.mix_train), rows(layout.mix_val)
    assert not {r["doc_id"] for r in train} & {r["doc_id"] for r in val}
    assert max(len(r["text"]) for r in train + val if r["kind"] == "text") == 65535
    fan = sorted((r["doc_id"], r["chunk_index"]) for r in train if r["source"] == "fanfics")
    assert len(fan) == s["fanfics"]["train"]["chunks"]  # fraction 1.0: every chunk of the 4 train stories
