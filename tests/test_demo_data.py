"""`orca8k demo-data`: the real schemas, checkable content, long-range structure, determinism and `data.dvc`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orca8k.config import load_config
from orca8k.data.demo import jsonl_line, row_rng, write_demo_data
from orca8k.data.demo_chat import SYSTEM_PROMPTS
from orca8k.data.demo_text import PASSKEY_FILLER, make_passkey, make_story
from tests.fixtures.common import REPO, cli_env, run_cli

SMALL = ["demo_data.orca_chat_conversations=300", "demo_data.fanfics_stories=4", "demo_data.red_pajama_documents=40"]


def dvc_dir_md5(path: Path) -> tuple[str, int, int]:
    """(md5 `….dir`, size, nfiles) of a folder exactly as `dvc add` computes them (dvc-data's own build)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem
    from dvc_objects.fs.memory import MemoryFileSystem

    odb = HashFileDB(MemoryFileSystem(), "memory://odb")
    _, meta, obj = build(odb, str(path), LocalFileSystem(), "md5")
    return obj.hash_info.value, meta.size, meta.nfiles


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="ascii").splitlines()]


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory) -> dict[str, Path]:
    """The full default demo data (params.yaml), written into a temp root."""
    root = tmp_path_factory.mktemp("demo")
    cfg = load_config(REPO / "params.yaml", [f"paths.root={root}"])
    return write_demo_data(cfg)


def test_written_where_the_sources_point(demo_files, tmp_path):
    assert list(demo_files) == ["orca-chat", "fanfics", "red_pajama"]
    rel = {k: p.relative_to(p.parents[1]).as_posix() for k, p in demo_files.items()}
    assert rel == {"orca-chat": "orca-chat/orca-chat-gpt4.jsonl", "fanfics": "fanfics/train.jsonl",
                   "red_pajama": "red_pajama/sample.jsonl"}


def test_orca_chat_schema_and_system_prompts(demo_files):
    rows = read_jsonl(demo_files["orca-chat"])
    cfg = load_config(REPO / "params.yaml")
    assert len(rows) == cfg.demo_data.orca_chat_conversations
    prompts = {p for p, _ in SYSTEM_PROMPTS}
    assert len(prompts) == 16 and "" in prompts
    assert "You are an AI assistant that helps people find information." in prompts
    seen_prompts, turn_counts = set(), set()
    for i, row in enumerate(rows):
        assert list(row) == ["instruction", "conversation"], i
        assert row["instruction"] in prompts
        seen_prompts.add(row["instruction"])
        turn_counts.add(len(row["conversation"]))
        for turn in row["conversation"]:
            assert list(turn) == ["input", "output"] and turn["input"] and turn["output"]
    assert seen_prompts == prompts
    assert turn_counts == {1, 2, 3, 4, 5, 6}


ARITH = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?$")
FOLLOW = re.compile(r"^Now add (\d+) to that\.$")


def short_answer(output: str) -> str:
    """The answer of either style: detailed answers end with `The answer is: X.`"""
    m = re.search(r"The answer is: (.*)\.$", output)
    return m.group(1) if m else output


def test_chat_answers_are_correct(demo_files):
    """Every answer is recomputed from its question (the tasks are checkable, so the model can learn them)."""
    checked = 0
    for row in read_jsonl(demo_files["orca-chat"]):
        facts: dict[str, str] = {}
        last = None
        for turn in row["conversation"]:
            q, a = turn["input"], short_answer(turn["output"])
            if m := ARITH.match(q):
                x, op, y = int(m.group(1)), m.group(2), int(m.group(3))
                last = {"+": x + y, "-": x - y, "*": x * y}[op]
                assert a == str(last), (q, a)
            elif m := FOLLOW.match(q):
                last = last + int(m.group(1))
                assert a == str(last), (q, a)
            elif q.startswith("Reverse the order of these words: "):
                assert a == " ".join(reversed(q.split(": ", 1)[1].split()))
            elif q.startswith("Sort these numbers from smallest to largest: "):
                nums = [int(n) for n in q.split(": ", 1)[1].split(", ")]
                assert a == ", ".join(str(n) for n in sorted(nums))
            elif q.startswith("How many words are in this list: "):
                assert a == str(len(q.split(": ", 1)[1].split()))
            elif q.startswith("Which is the largest of these numbers: "):
                nums = [int(n) for n in q.split(": ", 1)[1].rstrip("?").split(", ")]
                last = max(nums)
                assert a == str(last)
            elif q.startswith("Repeat exactly: "):
                assert a == q.split(": ", 1)[1]
            elif q.startswith("Remember these facts: "):
                facts = dict(re.findall(r"the code of (\w+) is (\d+)", q))
                assert facts
            elif m := re.match(r"^What is the code of (\w+)\?$", q):
                assert a == facts[m.group(1)]
            else:
                pytest.fail(f"unknown task: {q!r}")
            if not ARITH.match(q) and not FOLLOW.match(q) and not q.startswith("Which is the largest"):
                last = None if not q.startswith("How many") else int(a)
            checked += 1
    assert checked > 5000


def test_fanfics_are_long_and_recall_their_cast(demo_files):
    rows = read_jsonl(demo_files["fanfics"])
    cfg = load_config(REPO / "params.yaml")
    assert len(rows) == cfg.demo_data.fanfics_stories
    for row in rows:
        assert list(row) == ["TITLE", "TEXT"] and row["TEXT"].startswith(row["TITLE"])
        text = row["TEXT"]
        assert cfg.demo_data.fanfics_story_chars <= len(text) < cfg.demo_data.fanfics_story_chars + 2000
        cast = {m.group(1): m for m in re.finditer(
            r"^(\w+ \w+) of (\w+), the ([\w ]+), who carries the ([\w ]+)\. Number: (\d+)\.$", text, re.M)}
        assert 8 <= len(cast) <= 14
        body = text.split("Chapter 1", 1)[1]
        recalls = re.findall(r"\"My number is (\d+),\" said (\w+ \w+) of (\w+)\.", body)
        assert recalls
        for number, name, home in recalls:  # every later recall agrees with the cast list at the top
            assert (cast[name].group(5), cast[name].group(2)) == (number, home)
        for name, trade, item in re.findall(r"Everyone in \w+ knew (\w+ \w+), the ([\w ]+) with the ([\w ]+)\.", body):
            assert (cast[name].group(3), cast[name].group(4)) == (trade, item)


def test_red_pajama_schema_and_kinds(demo_files):
    rows = read_jsonl(demo_files["red_pajama"])
    kinds = []
    for row in rows:
        assert list(row) == ["text", "meta"] and isinstance(row["meta"], str)
        meta = json.loads(row["meta"])
        assert meta["source"] == "orca8k-demo" and meta["language"] == "en"
        kinds.append(meta["kind"])
        if meta["kind"] == "passkey":
            keys = re.findall(r"The pass key is (\d+)\.", row["text"])
            assert len(keys) == 2 and keys[0] == keys[1] and row["text"].endswith(f"The pass key is {keys[0]}.")
        if meta["kind"] == "registry":
            members = dict(re.findall(r"^- (\w+ \w+), from \w+: member number (\d+)", row["text"], re.M))
            for name, number in re.findall(r"^- (\w+ \w+) \(member number (\d+)\)", row["text"], re.M):
                assert members[name] == number
    assert kinds[:4] == ["registry", "song", "passkey", "registry"]
    assert kinds.count("registry") == len(rows) // 2


def test_no_duplicate_documents(demo_files):
    """Every row is a distinct document as the mix sees it (its content digest): before the redraw, 7 short
    single-turn orca-chat rows of params.yaml repeated earlier ones and the mix dropped them."""
    from orca8k.data.sources import ADAPTERS

    formats = {"orca-chat": "orca_chat", "fanfics": "fanfics", "red_pajama": "red_pajama"}
    for name, path in demo_files.items():
        rows = read_jsonl(path)
        digests = {ADAPTERS[formats[name]].normalise(row).digest for row in rows}
        assert len(digests) == len(rows), name


def test_a_repeated_row_is_drawn_again_from_its_own_stream(tmp_path, monkeypatch):
    import orca8k.data.demo as demo

    def coin(rng):  # only two distinct documents exist: row 1 must be redrawn until it differs from row 0
        return {"instruction": "", "conversation": [{"input": "q", "output": str(rng.randrange(2))}]}

    monkeypatch.setattr(demo, "make_conversation", coin)
    cfg = load_config(REPO / "params.yaml", [f"paths.root={tmp_path}", "demo_data.orca_chat_conversations=2"])
    rows = list(demo.source_rows(cfg, "orca_chat"))
    assert rows[0] == coin(row_rng(cfg.seed, "orca_chat", 0))  # a row that repeats nothing is as before
    assert sorted(r["conversation"][0]["output"] for r in rows) == ["0", "1"]
    assert list(demo.source_rows(cfg, "orca_chat")) == rows  # the redraw is deterministic


def test_passkey_depth_and_story_length():
    import random

    doc = make_passkey(random.Random(3), 10)
    fillers = doc.split("The pass key is")[0].count(PASSKEY_FILLER)
    assert doc.count(PASSKEY_FILLER) == 10 and 0 <= fillers <= 10
    story = make_story(random.Random(5), 12000)
    assert 12000 <= len(story["TEXT"]) < 14000 and story["TEXT"].endswith("The end.")


def test_lines_are_ascii_with_fixed_key_order_and_no_floats():
    assert jsonl_line({"b": "\u2019", "a": [1, {"z": "x"}]}) == '{"b": "\\u2019", "a": [1, {"z": "x"}]}\n'
    with pytest.raises(TypeError):
        jsonl_line({"x": 0.5})
    # a row's generator depends on (seed, stream, index) only
    assert row_rng(1, "fanfics", 3).random() == row_rng(1, "fanfics", 3).random()
    assert row_rng(1, "fanfics", 3).random() != row_rng(1, "fanfics", 4).random()


def test_row_i_does_not_depend_on_the_row_count(tmp_path):
    a = write_demo_data(load_config(REPO / "params.yaml", [f"paths.root={tmp_path / 'a'}", *SMALL]))
    more = [s.replace("=40", "=44").replace("=300", "=301") for s in SMALL]
    b = write_demo_data(load_config(REPO / "params.yaml", [f"paths.root={tmp_path / 'b'}", *more]))
    for name in a:
        lines_a, lines_b = a[name].read_bytes().splitlines(), b[name].read_bytes().splitlines()
        assert lines_b[: len(lines_a)] == lines_a


def test_same_bytes_across_processes_with_different_global_rng_state(tmp_path):
    script = (
        "import random, sys; random.seed(int(sys.argv[2])); [random.random() for _ in range(int(sys.argv[2]))]\n"
        "from orca8k.config import load_config; from orca8k.data.demo import write_demo_data\n"
        f"write_demo_data(load_config({str(REPO / 'params.yaml')!r}, ['paths.root=' + sys.argv[1], *{SMALL!r}]))\n"
    )
    for name, state, hashseed in (("a", "1", "0"), ("b", "977", "12345")):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / name), state], check=True,
                       env=cli_env({"PYTHONHASHSEED": hashseed}))
    assert dvc_dir_md5(tmp_path / "a" / "data") == dvc_dir_md5(tmp_path / "b" / "data")


def test_data_dvc_matches_a_fresh_generation(demo_files):
    """`data.dvc` (committed) versions exactly what `orca8k demo-data` writes with params.yaml."""
    out = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]
    assert out["path"] == "data" and out["hash"] == "md5"
    data_dir = demo_files["orca-chat"].parents[1]
    assert dvc_dir_md5(data_dir) == (out["md5"], out["size"], out["nfiles"])


def test_cli_demo_data_refuses_a_recipe(tmp_path):
    proc = run_cli("demo-data", "--params", str(REPO / "recipes" / "llama2-13b-orca-8k.yaml"),
                   "--set", f"paths.root={tmp_path}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "demo_data: null" in proc.stderr
