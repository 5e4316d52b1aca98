"""The walking pipeline, end to end (issue 2's acceptance, at TINY_OVERRIDES' budget):

- the eight stage CLIs on real text (`../shared/realdata`, selected with `--set paths.data=...`), each output checked;
- `dvc repro` on the demo in a throw-away copy of the repository: every stage runs and says where it wrote, a second
  `dvc repro` reruns nothing, `dvc metrics show` lists the evaluation metrics, and the tuning loop works
  (`dvc exp run -S`, `dvc exp show`, `dvc metrics diff`).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fixtures.common import REPO, cli_env, run_cli
from tests.fixtures.tiny import TINY_OVERRIDES

STAGES = ["mix", "validate", "base", "tokenize", "train", "evaluate", "sampling-report", "register"]
SOURCES = ["orca-chat", "fanfics", "red_pajama"]
pytestmark = pytest.mark.slow


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


# ---------------------------------------------------------------------------------------------------------------
# (a) the eight stages on real text


@pytest.fixture(scope="module")
def real_run(realdata, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Run every stage CLI on ../shared/realdata into a temp root (cwd = the repo, whose sampling configs the
    params name); the MLflow store lives in the temp root. Returns (root, {stage: stdout})."""
    root = tmp_path_factory.mktemp("real_run")
    args = sets(
        *TINY_OVERRIDES,
        f"paths.root={root}",
        f"paths.data={realdata}",
        f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        f"tracking.artifact_location={root / 'mlartifacts'}",
    )
    out = {}
    for stage in STAGES:
        out[stage] = run_cli(stage, *args, cwd=REPO, env={"MLFLOW_TRACKING_URI": ""}).stdout
    return root, out


def test_real_every_stage_prints_where_it_wrote(real_run):
    root, out = real_run
    for stage in STAGES:
        wrote = re.findall(rf"^\[{stage}\] wrote \w+: (\S+)$", out[stage], re.M)
        assert wrote, f"{stage} printed no output paths:\n{out[stage]}"
        for path in wrote:
            assert Path(path).exists() and Path(path).is_relative_to(root), (stage, path)


def _raw_counts(realdata: Path) -> dict[str, int]:
    import pandas as pd

    return {
        "orca-chat": len((realdata / "orca-chat" / "orca-chat-gpt4.jsonl").read_text().splitlines()),
        "fanfics": len(pd.read_parquet(realdata / "fanfics" / "train.parquet")),
        "red_pajama": len((realdata / "red_pajama" / "sample.jsonl").read_text().splitlines()),
    }


def test_real_mix_manifest_counts_are_the_parquet_rows(real_run, realdata):
    import pandas as pd

    root, _ = real_run
    mix = root / "artifacts" / "mix"
    manifest = json.loads((mix / "manifest.json").read_text())
    frames = {split: pd.read_parquet(mix / f"{split}.parquet") for split in ("train", "val")}
    raw = _raw_counts(realdata)
    assert raw == {"orca-chat": 225, "fanfics": 6, "red_pajama": 240}  # ../shared/realdata/README.md
    for name in SOURCES:
        m = manifest["sources"][name]
        for split, frame in frames.items():
            rows = frame[frame["source"] == name]
            assert m[split]["rows"] == len(rows), (name, split)
            assert m[split]["documents"] == rows["doc_id"].nunique(), (name, split)
        # nothing rejected or dropped; 20 % of the documents held out, rounded up
        assert (m["read"]["rows"], m["read"]["documents"], m["read"]["quarantined"]) == (raw[name], raw[name], 0)
        assert m["split"]["val_documents"] == math.ceil(0.2 * raw[name])
        # no document on both sides of the split
        assert not set(frames["train"].doc_id[frames["train"].source == name]) & set(
            frames["val"].doc_id[frames["val"].source == name])
    # orca-chat: one row per conversation; fanfics: 130,129-char stories → 2 chunks of ≤ 65,535 each
    assert (manifest["sources"]["orca-chat"]["train"]["rows"], manifest["sources"]["orca-chat"]["val"]["rows"]) == (180, 45)
    assert (manifest["sources"]["fanfics"]["train"]["rows"], manifest["sources"]["fanfics"]["val"]["rows"]) == (8, 4)
    rp = manifest["sources"]["red_pajama"]["train"]
    assert rp["rows"] == math.floor(0.25 * rp["draw"]["candidates"])  # fraction 0.25 of the train chunks
    assert manifest["totals"]["train"]["rows"] == len(frames["train"])
    assert manifest["totals"]["val"]["rows"] == len(frames["val"])
    assert frames["train"]["text"].str.len().max() <= 65535


def test_real_validation_passes(real_run):
    root, out = real_run
    result = json.loads((root / "reports" / "validation" / "result.json").read_text())
    assert result["success"] is True
    assert "PASSED" in out["validate"]


def test_real_tokenized_files_and_token_stats(real_run):
    from datasets import load_from_disk

    root, _ = real_run
    stats = json.loads((root / "metrics" / "tokenize.json").read_text())
    assert stats["max_length"] == 256 and stats["packing"] is True
    assert stats["tokenizer"]["padded_vocab_size"] == 528  # 512 pieces + 5 special tokens, padded to 16
    for split in ("train", "val"):
        ds = load_from_disk(str(root / "artifacts" / "tokenized" / split))
        lengths = [len(ids) for ids in ds["input_ids"]]
        supervised = sum(sum(1 for t in labels if t != -100) for labels in ds["labels"])
        assert stats[split]["rows"] == len(ds) and max(lengths) <= 256
        assert stats[split]["tokens"] == sum(lengths)
        assert stats[split]["supervised_tokens"] == supervised
        assert sum(s["tokens"] for s in stats[split]["sources"].values()) == stats[split]["tokens"]
        assert set(stats[split]["sources"]) == set(SOURCES)
    assert (root / "artifacts" / "tokenized" / "tokenizer" / "tokenizer.json").is_file()


def test_real_model_folder_has_the_scaled_rope(real_run):
    root, _ = real_run
    model = root / "artifacts" / "model"
    assert (model / "model.safetensors").is_file() and not list(model.glob("*.bin"))
    config = json.loads((model / "config.json").read_text())
    # transformers 5 writes RoPE scaling as rope_parameters (STACK_NOTES): linear ×2 over the native 128
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert config["max_position_embeddings"] == 128
    train = json.loads((root / "metrics" / "train.json").read_text())
    assert train["global_step"] == 8


def test_real_eval_metrics_per_source_are_finite(real_run):
    root, _ = real_run
    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    assert sorted(metrics["eval"]) == sorted(SOURCES)
    for name in SOURCES:
        m = metrics["eval"][name]
        assert math.isfinite(m["eval_loss"]) and m["supervised_tokens"] > 0
        assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-9)
    ctx = metrics["context"]
    assert ctx["native_context"] == 128
    for key in ("ppl_1x", "ppl_2x", "unscaled_base_ppl_1x", "unscaled_base_ppl_2x"):
        assert math.isfinite(ctx[key])
    assert ctx["ppl_ratio_2x_over_1x"] == pytest.approx(ctx["ppl_2x"] / ctx["ppl_1x"], rel=1e-9)
    assert set(metrics["passkey"]["by_context_length"]) == {"256"}  # TINY_OVERRIDES: passkey at 2× only


def test_real_sampling_report_is_in_the_oa_schema(real_run):
    from orca8k.sampling.schema import SamplingReport

    root, _ = real_run
    folder = root / "reports" / "sampling"
    files = sorted(folder.glob("*_orca8k-demo_sampling_*.json"))
    assert [re.sub(r"^\d{4}-\d\d-\d\d_", "", f.name) for f in files] == [
        "orca8k-demo_sampling_greedy.json", "orca8k-demo_sampling_k50.json", "orca8k-demo_sampling_nucleus9.json"]
    prompts = [json.loads(line) for line in (REPO / "configs/sampling/prompts_demo.jsonl").read_text().splitlines()]
    for f in files:
        report = SamplingReport.model_validate(json.loads(f.read_text()))  # unknown keys are refused
        assert report.model_name == "orca8k-demo" and [p.prompt for p in report.prompts] == prompts
        for p in report.prompts:
            (result,) = p.results
            assert len(result.outputs) == 1  # TINY_OVERRIDES: num_samples 1 (greedy runs once anyway)


def test_real_registered_version_has_alias_candidate(real_run):
    from mlflow import MlflowClient

    root, out = real_run
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # an earlier test's global registry URI must not win
    version = client.get_model_version_by_alias("orca8k-demo", "candidate")
    assert str(version.version) == "1" and "candidate" in version.aliases
    run_id = json.loads((root / "metrics" / "mlflow_run.json").read_text())["run_id"]
    assert version.run_id == run_id
    registered = json.loads((root / "metrics" / "register.json").read_text())
    assert registered["model_uri"] == "models:/orca8k-demo/1" and "candidate" in registered["aliases"]
    assert "orca8k-demo v1" in out["register"]


# ---------------------------------------------------------------------------------------------------------------
# (b) `dvc repro` on the demo


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = cli_env({"PYTHONPATH": str(cwd / "src"), "MLFLOW_TRACKING_URI": ""})
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def write_tiny_params(repo: Path) -> None:
    """params.yaml with TINY_OVERRIDES applied (still one strict, valid config; comments are not kept)."""
    from orca8k.config import apply_overrides, config_from_dict, read_params

    path = repo / "params.yaml"
    data = apply_overrides(read_params(path), TINY_OVERRIDES)
    config_from_dict(data, str(path))  # strict: every key known, cross-field checks hold
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def test_dvc_repro_runs_every_stage_then_nothing(repo_copy):
    write_tiny_params(repo_copy)
    _run(["orca8k", "demo-data"], repo_copy)
    first = _run(["dvc", "repro"], repo_copy)
    log = first.stdout + first.stderr
    # the tiny demo data is not what the committed data.dvc versions: repro records the new data in data.dvc
    assert "Verifying data sources in stage: 'data.dvc'" in log
    for stage in STAGES:
        assert f"Running stage '{stage}'" in log, f"stage {stage} did not run:\n{log}"
        assert re.search(rf"^\[{stage}\] wrote \w+: {re.escape(str(repo_copy))}/\S+$", log, re.M), stage
    assert re.search(r"^\[register\] orca8k-demo v1 \(new version\)", log, re.M)
    assert "models:/orca8k-demo/1" in (repo_copy / "metrics" / "register.json").read_text()
    assert (repo_copy / "dvc.lock").is_file()

    again = _run(["dvc", "repro"], repo_copy)
    log2 = again.stdout + again.stderr
    assert "Running stage" not in log2
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in log2, f"{stage} not up to date:\n{log2}"
    assert "Data and pipelines are up to date." in log2
    # tokenize rerun on the same inputs writes the same train/val/tokenizer/result bytes: nothing after it is stale
    _run(["dvc", "repro", "-f", "-s", "tokenize"], repo_copy)
    status = _run(["dvc", "status"], repo_copy)
    assert "Data and pipelines are up to date." in status.stdout + status.stderr, status.stdout + status.stderr

    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo_copy).stdout)
    (workspace,) = shown.values()
    metrics = workspace["data"]["metrics/eval.json"]["data"]
    expected = json.loads((repo_copy / "metrics" / "eval.json").read_text())
    assert sorted(metrics["eval"]) == sorted(SOURCES)
    assert metrics["eval"] == expected["eval"] and metrics["context"]["ppl_2x"] == expected["context"]["ppl_2x"]
    table = _run(["dvc", "metrics", "show"], repo_copy).stdout
    assert "metrics/eval.json" in table and "eval.orca-chat.eval_loss" in table

    # what git sees after a run: the lock files, the params, and the small metrics (cache: false, versioned by git
    # so that other revisions and experiments can be compared); no data, models, stores or lock files of MLflow
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], repo_copy).stdout.splitlines()
    assert sorted(line[3:] for line in status) == sorted(
        ["data.dvc", "params.yaml", "dvc.lock", *(f"metrics/{m}.json" for m in (
            "mix", "tokenize", "train", "mlflow_run", "eval", "ppl_vs_context", "passkey", "register"))])

    # the tuning loop of the README: commit the run, then one override as a DVC experiment
    _run(["git", "add", "-A"], repo_copy)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny demo run"], repo_copy)
    exp = _run(["dvc", "exp", "run", "-S", "train.learning_rate=2e-3"], repo_copy)
    ran = re.findall(r"Running stage '([\w-]+)'", exp.stdout + exp.stderr)
    assert ran == ["train", "evaluate", "sampling-report", "register"]  # the stages that read train.* and after
    (_, head) = json.loads(_run(["dvc", "exp", "show", "--json"], repo_copy).stdout)
    (experiment,) = [rev for e in head["experiments"] for rev in e["revs"]]
    data = experiment["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 2e-3
    new_eval = data["metrics"]["metrics/eval.json"]["data"]["eval"]
    assert new_eval == json.loads((repo_copy / "metrics" / "eval.json").read_text())["eval"]  # applied to workspace
    diff = json.loads(_run(["dvc", "metrics", "diff", "--json"], repo_copy).stdout)
    change = diff["metrics/eval.json"]["eval.orca-chat.eval_loss"]
    assert change["old"] == expected["eval"]["orca-chat"]["eval_loss"]
    assert change["new"] == new_eval["orca-chat"]["eval_loss"] != change["old"]
