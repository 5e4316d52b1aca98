"""`orca8k fetch-data`: fails at once offline naming the source and the switch; materialises hub sources (here a
local mirror, or a mocked hub) into paths.data with a snapshot of resolved revisions and hashes; HF_TOKEN is used,
never shown; the mix reads what it wrote."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orca8k.config import load_config
from orca8k.data import fetch as fetch_mod
from orca8k.data.readers import file_sha256
from orca8k.layout import Layout
from orca8k.stages.mix import run as run_mix
from tests.fixtures.common import REPO, run_cli
from tests.fixtures.mix import orca_row, text_of, write_jsonl

RECIPE = REPO / "recipes" / "llama2-13b-orca-8k.yaml"


def test_offline_switch_fails_at_once_naming_source_and_switch(tmp_path):
    start = time.perf_counter()
    proc = run_cli("fetch-data", "--params", str(RECIPE), "--set", f"paths.root={tmp_path}", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "OfflineError" in proc.stderr and "source 'orca-chat'" in proc.stderr and "HF_HUB_OFFLINE=1 is set" in proc.stderr
    assert time.perf_counter() - start < 30  # no download attempt, no retries
    assert not (tmp_path / "data-hub").exists()


def test_no_network_fails_at_once_naming_source_and_switch(tmp_path):
    env = {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = run_cli("fetch-data", "--params", str(RECIPE), "--set", f"paths.root={tmp_path}", cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "source 'orca-chat'" in proc.stderr and "cannot reach the Hugging Face Hub" in proc.stderr
    assert "HF_HUB_OFFLINE=1" in proc.stderr


def test_demo_params_have_no_hub_sources(tmp_path):
    proc = run_cli("fetch-data", "--params", str(REPO / "params.yaml"), "--set", f"paths.root={tmp_path}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "orca8k demo-data" in proc.stderr


def make_mirrors(root: Path) -> dict[str, Path]:
    """Local stand-ins for the three hub datasets, in their real layouts."""
    orca = root / "orca"
    orca.mkdir(parents=True)
    (orca / "orca-chat-gpt4.json").write_text(json.dumps([orca_row(i) for i in range(12)]))  # a JSON array
    write_jsonl(orca / "orca-chat-gpt3.5.jsonl", [orca_row(100)])  # not in data_files: not fetched
    fan = root / "fanfics"
    (fan / "data").mkdir(parents=True)
    pq.write_table(pa.table({"TEXT": [text_of(f"f{i}", 70_000 + i) for i in range(4)], "TITLE": list("abcd")}),
                   fan / "data" / "train-00000-of-00001.parquet")
    pajama = root / "pajama"
    for sub in ("arxiv", "c4"):
        write_jsonl(pajama / f"{sub}_sample.jsonl",
                    [{"text": text_of(f"{sub}{i}", 50 + i), "meta": {"source": sub}} for i in range(6)])
    (pajama / "README.md").write_text("card")
    return {"orca-chat": orca, "fanfics": fan, "red_pajama": pajama}


def mirror_config(tmp_path: Path, mirrors: dict[str, Path]):
    overrides = {"paths.root": str(tmp_path / "run")}
    for name, path in mirrors.items():
        overrides[f"data.sources.{name}.hub.repo_id"] = str(path)
    return load_config(RECIPE, overrides)


def test_full_fetch_from_a_mirror_writes_files_and_snapshot_then_mixes(tmp_path, capsys, monkeypatch):
    mirrors = make_mirrors(tmp_path / "mirrors")
    cfg = mirror_config(tmp_path, mirrors)
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    snapshot = fetch_mod.fetch_data(cfg)
    out = capsys.readouterr().out
    layout = Layout.from_config(cfg)
    assert layout.data == tmp_path / "run" / "data-hub"
    assert json.loads(layout.data_snapshot.read_text()) == snapshot
    s = snapshot["sources"]
    assert [f["file"] for f in s["orca-chat"]["files"]] == ["orca-chat/orca-chat-gpt4.json"]
    assert [f["file"] for f in s["fanfics"]["files"]] == ["fanfics/data/train-00000-of-00001.parquet"]
    assert [f["file"] for f in s["red_pajama"]["files"]] == ["red_pajama/arxiv_sample.jsonl", "red_pajama/c4_sample.jsonl"]
    for entry in s.values():
        assert entry["revision"] == "local" and entry["limit"] is None
        for f in entry["files"]:
            assert f["sha256"] == file_sha256(layout.data / f["file"])
    assert (layout.data / "orca-chat" / "orca-chat-gpt4.json").read_bytes() == (mirrors["orca-chat"] / "orca-chat-gpt4.json").read_bytes()
    assert "dvc add data-hub\n" in out and "git add data-hub.dvc" in out and "dvc push" in out
    assert "hub.revision: local" not in out  # nothing to pin for a mirror
    # the mix reads the snapshot and records it per source
    run_mix(cfg)
    manifest = json.loads(layout.mix_manifest.read_text())
    assert manifest["sources"]["orca-chat"]["snapshot"]["files"] == s["orca-chat"]["files"]
    assert manifest["sources"]["orca-chat"]["read"]["documents"] == 12
    assert manifest["sources"]["fanfics"]["read"]["chunks"] == 4 * 2  # 70,000+ chars at 65,535 → 2 chunks each
    # a second fetch replaces the folder and gives the same bytes (DVC sees the same snapshot)
    before = layout.data_snapshot.read_bytes()
    fetch_mod.fetch_data(cfg)
    assert layout.data_snapshot.read_bytes() == before


def test_limit_streams_a_slice_through_datasets(tmp_path):
    mirrors = make_mirrors(tmp_path / "mirrors")
    cfg = mirror_config(tmp_path, mirrors)
    snapshot = fetch_mod.fetch_data(cfg, limit=3)
    layout = Layout.from_config(cfg)
    for name in ("orca-chat", "fanfics", "red_pajama"):
        entry = snapshot["sources"][name]
        assert (entry["limit"], entry["rows"]) == (3, 3)
        assert [f["file"] for f in entry["files"]] == [f"{name}/part-00000.jsonl"]
    rows = [json.loads(line) for line in (layout.data / "orca-chat" / "part-00000.jsonl").read_text().splitlines()]
    assert rows == [orca_row(i) for i in range(3)]  # the source's own schema
    fan = [json.loads(line) for line in (layout.data / "fanfics" / "part-00000.jsonl").read_text().splitlines()]
    assert [r["TITLE"] for r in fan] == ["a", "b", "c"] and len(fan[0]["TEXT"]) == 70_000
    with pytest.raises(Exception, match="--limit 0"):
        fetch_mod.fetch_data(cfg, limit=0)


def test_hub_fetch_records_the_resolved_sha_and_never_shows_the_token(tmp_path, monkeypatch, capsys):
    """The hub path with the network calls replaced: dataset_info → sha, datasets' file resolution, hf_hub_download."""
    import datasets
    import huggingface_hub

    sha = "0123456789abcdef0123456789abcdef01234567"
    secret = "hf_secret_token_value"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    seen = []
    files = tmp_path / "remote"
    write_jsonl(files / "orca-chat-gpt4.json", [orca_row(i) for i in range(4)])
    write_jsonl(files / "c4_sample.jsonl", [{"text": f"doc {i}", "meta": "{}"} for i in range(4)])
    pq.write_table(pa.table({"TEXT": ["a story", "another story"]}), files / "train.parquet")
    remote = {"shahules786/orca-chat": ["orca-chat-gpt4.json"],
              "atom-in-the-universe/fanfics-10k-50k": ["data/train.parquet"],
              "togethercomputer/RedPajama-Data-1T-Sample": ["c4_sample.jsonl"]}

    class FakeApi:
        def dataset_info(self, repo_id, revision=None, timeout=None, token=None):
            seen.append(("info", repo_id, revision, token))
            return SimpleNamespace(sha=sha)

    def fake_builder(repo_id, revision=None, data_files=None, token=None):
        seen.append(("builder", repo_id, revision, tuple(data_files or ()), token))
        return SimpleNamespace(config=SimpleNamespace(data_files={"train": [f"hf://datasets/{repo_id}@{revision}/{f}" for f in remote[repo_id]]}))

    def fake_download(repo_id, filename, repo_type=None, revision=None, token=None):
        seen.append(("download", repo_id, filename, repo_type, revision, token))
        return str(files / Path(filename).name)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(datasets, "load_dataset_builder", fake_builder)
    cfg = load_config(RECIPE, {"paths.root": str(tmp_path / "run")})
    snapshot = fetch_mod.fetch_data(cfg)
    out = capsys.readouterr()
    for name, repo in (("orca-chat", "shahules786/orca-chat"), ("fanfics", "atom-in-the-universe/fanfics-10k-50k"),
                       ("red_pajama", "togethercomputer/RedPajama-Data-1T-Sample")):
        entry = snapshot["sources"][name]
        assert (entry["repo_id"], entry["revision_requested"], entry["revision"]) == (repo, "main", sha)
    assert [f["file"] for f in snapshot["sources"]["fanfics"]["files"]] == ["fanfics/data/train.parquet"]
    assert ("builder", "togethercomputer/RedPajama-Data-1T-Sample", sha, ("*.jsonl",), secret) in seen
    assert all(call[-1] == secret for call in seen)  # the token reaches the hub calls ...
    layout = Layout.from_config(cfg)
    for text in (out.out, out.err, layout.data_snapshot.read_text()):
        assert secret not in text  # ... and is never shown or written
    assert f"data.sources.orca-chat.hub.revision: {sha}" in out.out  # how to pin
