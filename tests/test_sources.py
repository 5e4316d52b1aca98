"""Source adapters and readers: the three real schemas → one record shape; JSON lines / JSON arrays / parquet;
the real data in ../shared/realdata loads through the adapters; hub loading through `datasets` on a local stand-in."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orca8k.config import SourceConfig
from orca8k.data.chat_format import check_messages
from orca8k.data.readers import iter_rows, list_data_files
from orca8k.data.sources import RowRejected, adapter_for, iter_hub_rows, iter_records, normalise_orca_chat, to_record
from orca8k.errors import DataError
from tests.fixtures.mix import write_jsonl


def test_orca_chat_becomes_messages_with_one_leading_system():
    doc = normalise_orca_chat(
        {"instruction": "Be brief.", "conversation": [{"input": "Hi?", "output": "Hello."}, {"input": "2+2?", "output": "4"}]}
    )
    assert doc.kind == "chat" and doc.text is None
    assert doc.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    assert doc.chars == len("Be brief.Hi?Hello.2+2?4")
    check_messages(doc.messages)
    # empty or absent instruction: no system message; content is kept verbatim
    for row in ({"instruction": "  ", "conversation": [{"input": " q ", "output": "a\n"}]},
                {"conversation": [{"input": " q ", "output": "a\n"}]}):
        assert normalise_orca_chat(row).messages == [{"role": "user", "content": " q "}, {"role": "assistant", "content": "a\n"}]
    record = to_record("orca-chat", doc)
    assert set(record) == {"id", "source", "doc_id", "messages"}
    assert record["doc_id"] == f"orca-chat/{doc.digest.hex()}" and record["id"] == record["doc_id"] + "/0"


def test_text_adapters_read_their_field():
    fan = adapter_for("fanfics").normalise({"TEXT": "Once upon a time.", "TITLE": "t"})
    pajama = adapter_for("red_pajama").normalise({"text": "Once upon a time.", "meta": {"url": "u"}})
    assert fan.text == pajama.text == "Once upon a time." and fan.chars == 17
    assert fan.digest == pajama.digest  # content-addressed
    assert set(to_record("fanfics", fan)) == {"id", "source", "doc_id", "text"}
    assert adapter_for("red_pajama").normalise({"text": "x", "meta": "{\"a\": 1}"}).text == "x"  # meta as a string


@pytest.mark.parametrize(
    ("fmt", "row", "field", "reason"),
    [
        ("orca_chat", {"conversation": None}, "conversation", "missing field"),
        ("orca_chat", {"conversation": {"input": "q"}}, "conversation", "expected a list, got dict"),
        ("orca_chat", {"conversation": ["q"]}, "conversation[0]", "expected an object, got str"),
        ("orca_chat", {"conversation": [{"input": 3, "output": "a"}]}, "conversation[0].input", "expected a string, got int"),
        ("orca_chat", {"conversation": [{"input": "\ud800", "output": "a"}]}, "conversation", "not encodable as UTF-8 (lone surrogate at char"),
        ("fanfics", {"TITLE": "t"}, "TEXT", "missing field"),
        ("fanfics", {"TEXT": ""}, "TEXT", "empty"),
        ("red_pajama", {"text": ["a"]}, "text", "expected a string, got list"),
        ("red_pajama", "just a string", "(row)", "expected a JSON object, got str"),
    ],
)
def test_adapters_reject_with_field_and_reason(fmt, row, field, reason):
    with pytest.raises(RowRejected) as err:
        adapter_for(fmt).normalise(row)
    assert err.value.field == field and err.value.reason.startswith(reason)


def test_json_array_jsonl_and_parquet_read_the_same_rows(tmp_path):
    rows = [{"text": f"doc {i} " + "é" * i} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "b.json").write_text(" \n[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    (tmp_path / "c.json").write_text("\n".join(json.dumps(r) for r in rows))  # .json holding JSON lines
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "d.parquet")
    for name, key in (("a.jsonl", "line"), ("b.json", "row"), ("c.json", "line"), ("d.parquet", "row")):
        got = list(iter_rows(tmp_path / name))
        assert [r.value for r in got] == rows, name
        assert [r.position for r in got] == ([1, 2, 3, 4, 5] if key == "line" else [0, 1, 2, 3, 4])
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "a.jsonl").read_bytes())
    assert [r.value for r in iter_rows(tmp_path / "bom.jsonl")] == rows
    # `wanted` skips the other rows
    assert [r.position for r in iter_rows(tmp_path / "a.jsonl", wanted=[2, 5])] == [2, 5]
    assert [r.value for r in iter_rows(tmp_path / "b.json", wanted=[0, 3])] == [rows[0], rows[3]]
    assert [r.position for r in iter_rows(tmp_path / "d.parquet", wanted=[4])] == [4]


def test_json_array_long_elements_cross_read_chunks(tmp_path):
    rows = [{"text": "x" * (3 << 20)}, {"text": "short"}, {"text": "y" * (1 << 20) + "é"}]
    (tmp_path / "big.json").write_text(json.dumps(rows))
    got = list(iter_rows(tmp_path / "big.json", max_row_bytes=2 << 20))
    assert got[0].reject is not None and got[0].reject.reason.startswith("row is 3145740 bytes")
    assert [r.value for r in got[1:]] == rows[1:]


def test_a_folder_is_read_recursively_in_sorted_order_skipping_hidden_and_other_files(tmp_path):
    write_jsonl(tmp_path / "src" / "b" / "2.jsonl", [{"text": "b2"}])
    write_jsonl(tmp_path / "src" / "a.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "src" / ".cache" / "x.jsonl", [{"text": "hidden"}])
    (tmp_path / "src" / "README.md").write_text("not data")
    assert [p.relative_to(tmp_path / "src").as_posix() for p in list_data_files(tmp_path / "src")] == ["a.jsonl", "b/2.jsonl"]
    with pytest.raises(DataError, match="no such file or folder"):
        list_data_files(tmp_path / "missing")
    with pytest.raises(DataError, match="not a .json/.jsonl/.parquet file"):
        list_data_files(tmp_path / "src" / "README.md")


def test_real_data_loads_through_the_adapters(realdata):
    counts = {}
    for name, fmt, path in (("orca-chat", "orca_chat", "orca-chat"), ("fanfics", "fanfics", "fanfics"),
                            ("red_pajama", "red_pajama", "red_pajama")):
        src = SourceConfig(format=fmt, path=path, fraction=1.0)
        records, rejects = [], []
        for record, reject in iter_records(name, src, realdata, max_row_bytes=4_000_000):
            (records if record else rejects).append(record or reject)
        assert rejects == [], rejects[:3]
        counts[name] = len(records)
        for r in records:
            assert r["source"] == name and r["id"] == r["doc_id"] + "/0"
            if fmt == "orca_chat":
                check_messages(r["messages"])
                assert r["messages"][0]["role"] == "system"  # every real row carries an ORCA system prompt
            else:
                assert isinstance(r["text"], str) and r["text"].strip()
    # README of realdata: 700 pairs grouped 1-5 per conversation; 6 fanfics; 240 RedPajama documents
    assert counts["fanfics"] == 6 and counts["red_pajama"] == 240
    pairs = sum(
        (len(r["messages"]) - 1) // 2
        for r, _ in iter_records("orca-chat", SourceConfig(format="orca_chat", path="orca-chat", fraction=1.0), realdata)
    )
    assert pairs == 700
    texts = [r["text"] for r, _ in iter_records("fanfics", SourceConfig(format="fanfics", path="fanfics", fraction=1.0), realdata)]
    assert len(texts) == 6 and all(len(t) > 65535 for t in texts)  # long enough to be chunked


def test_hub_rows_stream_through_datasets_from_a_local_stand_in(tmp_path):
    from orca8k.config import HubSource

    repo = tmp_path / "hub-stand-in"
    write_jsonl(repo / "orca-chat-gpt4.jsonl", [{"instruction": "s", "conversation": [{"input": f"q{i}", "output": "a"}]} for i in range(7)])
    write_jsonl(repo / "other.jsonl", [{"unrelated": 1}])
    hub = HubSource(repo_id=str(repo), revision="main", data_files=["orca-chat-gpt4.jsonl"], split="train")
    rows = list(iter_hub_rows(hub, limit=3))
    assert [r["conversation"][0]["input"] for r in rows] == ["q0", "q1", "q2"]
    assert normalise_orca_chat(rows[0]).messages[0] == {"role": "system", "content": "s"}


def test_hub_rows_refuse_offline(monkeypatch):
    from orca8k.config import HubSource
    from orca8k.errors import OfflineError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = HubSource(repo_id="shahules786/orca-chat", revision="main", data_files=["orca-chat-gpt4.json"])
    with pytest.raises(OfflineError, match="shahules786/orca-chat: HF_HUB_OFFLINE=1 is set"):
        next(iter_hub_rows(hub))
