"""Bad input never disappears: each malformed kind goes to the quarantine with file, line/row, field and reason;
counts reach the manifest; thresholds and source-level failures name the file and field; duplicates are dropped."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orca8k.errors import DataError
from orca8k.layout import Layout
from orca8k.stages.mix import run
from tests.fixtures.common import REPO, run_cli
from tests.fixtures.mix import orca_row, write_crafted_sources, write_jsonl

BIG = 5 * 1024 * 1024  # a 5 MB row, above the demo's data.max_row_bytes (4 MB)


def quarantine(cfg) -> list[dict]:
    path = Layout.from_config(cfg).mix_quarantine
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def bad_orca_rows() -> list:
    good = [orca_row(i) for i in range(20)]
    bad = [
        b'{"instruction": "x", "conversation": [{"input": "q", "output": "a"}',  # line 21: bad JSON (truncated)
        {"instruction": "x", "conversation": "not a list"},  # 22: wrong type
        {"instruction": "x", "conversation": []},  # 23: empty conversation
        {"instruction": "x"},  # 24: missing field
        b'{"instruction": "caf\xe9", "conversation": [{"input": "q", "output": "a"}]}',  # 25: not UTF-8 (latin-1)
        b'{"instruction": "x", "conversation": [{"input": "q\x00", "output": "a"}]}',  # 26: raw NUL byte
        {"instruction": "x", "conversation": [{"input": "q", "output": "a\u0000b"}]},  # 27: escaped NUL
        {"instruction": "x", "conversation": [{"input": "q", "output": "y" * BIG}]},  # 28: multi-megabyte row
        {"instruction": 7, "conversation": [{"input": "q", "output": "a"}]},  # 29: wrong type (system prompt)
        {"instruction": "x", "conversation": [{"input": "q", "output": "   "}]},  # 30: empty reply
        {"instruction": "x", "conversation": [{"input": "q"}]},  # 31: missing output
        ["not", "an", "object"],  # 32
    ]
    return good + bad


def test_each_bad_kind_is_quarantined_with_file_line_field_reason(mix_config, tmp_path):
    data = tmp_path / "data"
    write_crafted_sources(data)
    write_jsonl(data / "orca-chat" / "chat.jsonl", bad_orca_rows())
    cfg = mix_config(data=data, overrides={"data.max_reject_fraction": 0.4})
    run(cfg)
    entries = quarantine(cfg)
    got = [(e["file"], e["line"], e["field"], e["reason"].split(":")[0].split(" at ")[0]) for e in entries]
    f = "orca-chat/chat.jsonl"
    assert got == [
        (f, 21, "(row)", "invalid JSON"),
        (f, 22, "conversation", "expected a list, got str"),
        (f, 23, "conversation", "empty conversation"),
        (f, 24, "conversation", "missing field"),
        (f, 25, "(row)", "not valid UTF-8"),
        (f, 26, "(row)", "NUL byte"),
        (f, 27, "conversation[0].output", "NUL character"),
        (f, 28, "(row)", f"row is {len(json.dumps(bad_orca_rows()[27]))} bytes, more than data.max_row_bytes=4000000"),
        (f, 29, "instruction", "expected a string, got int"),
        (f, 30, "conversation[0].output", "empty"),
        (f, 31, "conversation[0].output", "missing field"),
        (f, 32, "(row)", "expected a JSON object, got list"),
    ]
    assert all(e["category"] == "malformed" and e["source"] == "orca-chat" for e in entries)
    manifest = json.loads(Layout.from_config(cfg).mix_manifest.read_text())
    read = manifest["sources"]["orca-chat"]["read"]
    assert (read["rows"], read["quarantined"], read["documents"]) == (32, 12, 20)
    assert read["reject_fraction"] == round(12 / 32, 6)
    assert read["quarantine_reasons"]["empty conversation"] == 1
    assert manifest["quarantine"] == {"file": "quarantine.jsonl", "rows": 12, "malformed": 12, "duplicates": 0}
    # the good rows all made it: ceil(0.2 × 20) = 4 val, 16 train
    assert (manifest["sources"]["orca-chat"]["train"]["rows"], manifest["sources"]["orca-chat"]["val"]["rows"]) == (16, 4)


def test_too_many_rejects_fail_and_keep_the_quarantine(mix_config, tmp_path):
    data = tmp_path / "data"
    write_crafted_sources(data)
    write_jsonl(data / "orca-chat" / "chat.jsonl", bad_orca_rows())
    cfg = mix_config(data=data)  # demo threshold: 1 %
    with pytest.raises(DataError, match=r"source 'orca-chat'.*12 of 32 rows quarantined \(37\.50%\), more than data\.max_reject_fraction=0\.01"):
        run(cfg)
    layout = Layout.from_config(cfg)
    assert len(quarantine(cfg)) == 12
    assert not layout.mix_train.exists() and not layout.mix_manifest.exists()
    # through the CLI: exit status 1, the message names the source and the quarantine file
    proc = run_cli("mix", "--params", str(REPO / "params.yaml"), "--set", f"paths.root={cfg.paths.root}", "--set", f"paths.data={data}",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "DataError" in proc.stderr and "quarantine.jsonl" in proc.stderr


def test_empty_source_fails_naming_the_file(mix_config, tmp_path):
    data = tmp_path / "data"
    write_crafted_sources(data)
    (data / "red_pajama" / "docs.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"source 'red_pajama' .*empty — no rows in red_pajama/docs\.jsonl"):
        run(mix_config(data=data))
    (data / "red_pajama" / "docs.jsonl").unlink()
    with pytest.raises(DataError, match=r"source 'red_pajama' .*no \.json/\.jsonl/\.parquet files"):
        run(mix_config(data=data))


def test_required_field_missing_everywhere_fails_naming_file_and_field(mix_config, tmp_path):
    data = tmp_path / "data"
    write_crafted_sources(data)
    pq.write_table(pa.table({"TITLE": ["a", "b"], "BODY": ["x" * 20, "y" * 20]}), data / "fanfics" / "stories.parquet")
    with pytest.raises(DataError, match=r"source 'fanfics' .*field 'TEXT' is missing in every row of fanfics/stories\.parquet"):
        run(mix_config(data=data, overrides={"data.max_reject_fraction": 1.0}))
    entries = quarantine(mix_config(data=data))
    assert [(e["file"], e["row"], e["field"], e["reason"]) for e in entries] == [
        ("fanfics/stories.parquet", 0, "TEXT", "missing field"),
        ("fanfics/stories.parquet", 1, "TEXT", "missing field"),
    ]


def test_wrong_type_in_parquet_and_json_array_sources(mix_config, tmp_path):
    data = tmp_path / "data"
    write_crafted_sources(data)
    # a second fanfics file with a bad row (TEXT null) and a JSON-array red_pajama file with a wrong type
    pq.write_table(pa.table({"TEXT": ["a long enough story", None]}), data / "fanfics" / "more.parquet")
    (data / "red_pajama" / "extra.json").write_text(json.dumps([{"text": "fine text"}, {"text": 42}, {"meta": "{}"}]))
    cfg = mix_config(data=data, overrides={"data.max_reject_fraction": 0.2})
    run(cfg)
    got = [(e["file"], e.get("row", e.get("line")), e["field"], e["reason"]) for e in quarantine(cfg)]
    assert got == [
        ("fanfics/more.parquet", 1, "TEXT", "missing field"),
        ("red_pajama/extra.json", 1, "text", "expected a string, got int"),
        ("red_pajama/extra.json", 2, "text", "missing field"),
    ]


def test_broken_json_array_fails_naming_the_element(mix_config, tmp_path):
    data = tmp_path / "data"
    write_crafted_sources(data)
    (data / "red_pajama" / "extra.json").write_text('[{"text": "ok"}, {"text": "broken}, {"text": "x"}]')
    with pytest.raises(DataError, match=r"extra\.json: element 1: invalid JSON"):
        run(mix_config(data=data))


def test_exact_duplicates_are_dropped_and_counted(mix_config, tmp_path):
    data = tmp_path / "data"
    write_crafted_sources(data)
    chat = [orca_row(i) for i in range(10)] + [orca_row(3), orca_row(3), orca_row(7)]
    write_jsonl(data / "orca-chat" / "chat.jsonl", chat)
    # a duplicate across files of one source counts too
    write_jsonl(data / "red_pajama" / "zz.jsonl", [json.loads((data / "red_pajama" / "docs.jsonl").read_text().splitlines()[0])])
    cfg = mix_config(data=data)
    run(cfg)
    dups = [e for e in quarantine(cfg) if e["category"] == "duplicate"]
    assert [(e["file"], e["line"], e["reason"]) for e in dups] == [
        ("orca-chat/chat.jsonl", 11, "exact duplicate of orca-chat/chat.jsonl line 4"),
        ("orca-chat/chat.jsonl", 12, "exact duplicate of orca-chat/chat.jsonl line 4"),
        ("orca-chat/chat.jsonl", 13, "exact duplicate of orca-chat/chat.jsonl line 8"),
        ("red_pajama/zz.jsonl", 1, "exact duplicate of red_pajama/docs.jsonl line 1"),
    ]
    manifest = json.loads(Layout.from_config(cfg).mix_manifest.read_text())
    assert manifest["sources"]["orca-chat"]["read"]["duplicates"] == 3
    assert manifest["sources"]["orca-chat"]["read"]["documents"] == 10
    assert manifest["sources"]["orca-chat"]["read"]["quarantined"] == 0  # duplicates are not rejects
    assert manifest["quarantine"]["duplicates"] == 4
    # same documents, same split as without the duplicates
    train = pq.read_table(Layout.from_config(cfg).mix_train).to_pylist()
    assert len([r for r in train if r["source"] == "orca-chat"]) == 8


def test_row_size_threshold_is_a_param(mix_config, tmp_path):
    data = tmp_path / "data"
    write_crafted_sources(data)
    cfg = mix_config(data=data, overrides={"data.max_row_bytes": 100, "data.max_reject_fraction": 0.7})
    run(cfg)
    over = [e for e in quarantine(cfg) if e["source"] == "orca-chat"]
    # the one-turn conversations (i % 3 == 0) are 90 bytes; the others, 159 and 212 bytes, are quarantined
    lines = (data / "orca-chat" / "chat.jsonl").read_bytes().splitlines()
    assert [len(line) for line in lines] == [90, 159, 212] * 3 + [90]
    assert [e["line"] for e in over] == [2, 3, 5, 6, 8, 9]
    assert all(e["reason"] == f"row is {len(lines[e['line'] - 1])} bytes, more than data.max_row_bytes=100" for e in over)
    manifest = json.loads(Layout.from_config(cfg).mix_manifest.read_text())
    assert manifest["sources"]["orca-chat"]["read"]["documents"] == 4
