"""Run directories, flow knobs and content keys of the Prefect flow (no Prefect server needed)."""

from __future__ import annotations

import pytest
import yaml

from orca8k.config import load_config
from orca8k.errors import ConfigError
from orca8k.orchestration import content_hash, knob_overrides, prepare_run, stage_fingerprint


def test_knobs_map_to_params_keys_and_none_keeps_the_file_value():
    out = knob_overrides({"learning_rate": 3e-4, "max_length": None, "rope_factor": 2.0}, {"red_pajama": 0.5})
    assert out == {"train.learning_rate": 3e-4, "model.rope_scaling.factor": 2.0, "data.sources.red_pajama.fraction": 0.5}
    with pytest.raises(ConfigError, match="unknown flow parameter"):
        knob_overrides({"lr": 1})


def test_prepare_run_writes_an_isolated_params_file(repo_copy):
    spec = prepare_run("params.yaml", {"train.learning_rate": 1e-3}, "r1", repo_copy)
    assert spec.root == repo_copy / "runs" / "r1" and spec.uses_dvc_mix
    written = yaml.safe_load(spec.params_file.read_text())
    assert written["paths"]["root"] == str(repo_copy / "runs" / "r1")
    assert written["paths"]["data"] == str(repo_copy / "data")
    assert written["paths"]["mix"] == str(repo_copy / "artifacts" / "mix")  # the DVC-versioned mix is shared
    cfg = load_config(spec.params_file)
    assert cfg.train.learning_rate == 1e-3
    assert cfg.paths.resolve("model") == repo_copy / "runs" / "r1" / "artifacts" / "model"
    other = prepare_run("params.yaml", {"data.sources.red_pajama.fraction": 0.5}, "r2", repo_copy)
    assert not other.uses_dvc_mix  # a changed mix is built inside the run
    assert other.config.paths.resolve("mix") == repo_copy / "runs" / "r2" / "artifacts" / "mix"


def test_prepare_run_rejects_bad_names_and_keys(repo_copy):
    with pytest.raises(ConfigError, match="run name"):
        prepare_run("params.yaml", {}, "../escape", repo_copy)
    with pytest.raises(ConfigError, match="unknown key"):
        prepare_run("params.yaml", {"train.lerning_rate": 1}, "ok", repo_copy)
    assert not (repo_copy / "runs" / "ok").exists()


def test_content_hash_follows_content_not_paths(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "x.txt").write_text("same")
    assert content_hash(a) == content_hash(b)
    (b / "sub" / "x.txt").write_text("different")
    assert content_hash(a) != content_hash(b)
    assert content_hash(tmp_path / "nope") == "missing"


def test_stage_fingerprint_changes_with_the_params_a_stage_reads_only(repo_copy, monkeypatch):
    monkeypatch.chdir(repo_copy)
    base = load_config(repo_copy / "params.yaml")
    fp = stage_fingerprint("mix", base, repo_copy)
    assert stage_fingerprint("mix", load_config(repo_copy / "params.yaml", ["train.learning_rate=1"]), repo_copy) == fp
    assert stage_fingerprint("mix", load_config(repo_copy / "params.yaml", ["data.val_split=0.3"]), repo_copy) != fp
    (repo_copy / "data").mkdir(exist_ok=True)
    (repo_copy / "data" / "new.jsonl").write_text("{}\n")
    assert stage_fingerprint("mix", base, repo_copy) != fp
