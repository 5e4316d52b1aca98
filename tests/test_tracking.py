"""MLflow tracking against a real local store: URI resolution, one run across processes/ranks/resumes, the curves
callback, and no secret anywhere in the store."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orca8k import tracking
from orca8k.layout import Layout
from orca8k.redaction import REDACTED, flatten, is_secret_key, redact_params, redact_text, redact_uri
from tests.fixtures.common import cli_env
from tests.fixtures.tracking import tracked_config


# --------------------------------------------------------------------------------------------------- redaction
@pytest.mark.parametrize(
    "key, secret",
    [
        ("HF_TOKEN", True), ("hub_token", True), ("hubToken", True), ("db.password", True), ("api-key", True),
        ("AWS_SECRET_ACCESS_KEY", True), ("MLFLOW_TRACKING_PASSWORD", True), ("Authorization", True),
        ("tokenize.max_length", False), ("sampling.max_new_tokens", False), ("evaluate.passkey.trials", False),
        ("evaluate.scored_tail_tokens", False), ("base.tokenizer.vocab_size", False), ("PWD", False),
        ("data.sources.orca-chat.fraction", False),
    ],
)
def test_secret_keys_are_words_not_substrings(key, secret):
    assert is_secret_key(key) is secret


def test_redaction_by_key_shape_url_and_environment():
    env = {"HF_TOKEN": "plain-looking-value-42", "PATH": "/usr/bin", "PWD": "/home/me"}
    params = {
        "hub_token": "abc123456", "x.path": "/data/plain-looking-value-42/y", "uri": "https://bob:hunter2pw@h/x",
        "note": "use hf_abcdefghijklmnopqrstuvwxyz0123 please", "aws": "AKIAABCDEFGHIJKLMNOP", "n": 3,
        "cwd": "/home/me/work",
    }
    out = redact_params(params, environ=env)
    assert out["hub_token"] == REDACTED
    assert out["x.path"] == f"/data/{REDACTED}/y"
    assert out["uri"] == f"https://bob:{REDACTED}@h/x"
    assert out["note"] == f"use {REDACTED} please"
    assert out["aws"] == REDACTED
    assert out["n"] == 3 and out["cwd"] == "/home/me/work"
    # a secret-named param's value is also removed where it is repeated under an innocent key
    assert redact_params({"api_key": "s3cr3t-value", "cmd": "run --key s3cr3t-value"}, environ={})["cmd"] == (
        f"run --key {REDACTED}"
    )
    assert redact_uri("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    assert redact_text("", environ=env) == ""


def test_flatten_keeps_lists_as_values():
    assert flatten({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2], "f": {}}) == {"a.b": 1, "a.c.d": None, "e": [1, 2], "f": {}}


# --------------------------------------------------------------------------------------------------- URIs
def test_tracking_uri_resolution(tmp_path, monkeypatch, tracking_store):
    repo = tmp_path / "repo"
    (repo / "sub" / "deeper").mkdir(parents=True)
    (repo / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(repo / "sub" / "deeper")
    cfg = tracked_config(tmp_path, tracking_store, "uri", **{"tracking.tracking_uri": "sqlite:///mlflow.db",
                                                              "tracking.artifact_location": "mlartifacts"})
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.repo_root() == repo.resolve()
    assert tracking.resolve_tracking_uri(cfg) == f"sqlite:///{repo.resolve()}/mlflow.db"
    assert tracking.resolve_artifact_location(cfg) == (repo.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri(cfg) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////abs/m.db")
    assert tracking.resolve_tracking_uri(cfg) == "sqlite:////abs/m.db"


# --------------------------------------------------------------------------------------------------- one run
_STAGE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from orca8k import tracking
    from orca8k.layout import Layout
    from tests.fixtures.tracking import tracked_config
    from pathlib import Path
    store = json.loads(sys.argv[1]); store = {k: (Path(v) if k != "uri" else v) for k, v in store.items()}
    cfg = tracked_config(Path(sys.argv[2]), store, sys.argv[3])
    layout = Layout.from_config(cfg)
    what = sys.argv[4]
    if what == "train":
        with tracking.train_run(cfg, layout) as run:
            tracking.log_metrics({"loss": 2.5}, step=int(sys.argv[5]))
            print(json.dumps({"run_id": run.run_id, "active": run.active}))
    else:
        with tracking.attach_run(cfg, layout, stage=what) as run:
            run.log_metrics({"eval": {"orca-chat": {"eval_loss": 1.75}}}, step=10)
            print(json.dumps({"run_id": run.run_id, "active": run.active}))
    """
)


def _stage(tmp_path, store, experiment, *args, env=None):
    from tests.fixtures.common import REPO

    payload = json.dumps({k: str(v) for k, v in store.items()})
    proc = subprocess.run(
        [sys.executable, "-c", _STAGE_SCRIPT, payload, str(tmp_path), experiment, *args],
        cwd=REPO, env=cli_env({"PYTHONPATH": f"{REPO / 'src'}:{REPO}", **(env or {})}), capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_one_run_across_stage_processes_ranks_and_resume(tmp_path, tracking_store, monkeypatch):
    import mlflow

    exp = "one-run"
    first = _stage(tmp_path, tracking_store, exp, "train", "5")  # process 1: train creates the run
    cfg = tracked_config(tmp_path, tracking_store, exp)
    layout = Layout.from_config(cfg)
    # another rank of the same training: a no-op handle, no run created, the run file untouched
    monkeypatch.setenv("RANK", "1")
    with tracking.train_run(cfg, layout) as other_rank:
        tracking.log_metrics({"loss": 9.0}, step=5)
    assert (other_rank.active, other_rank.run_id) == (False, "")
    monkeypatch.delenv("RANK")
    # resume (the run file beside the checkpoints): the same run, never a new one
    with tracking.train_run(cfg, layout) as resumed:
        tracking.log_metrics({"loss": 2.5}, step=7)
    evaluated = _stage(tmp_path, tracking_store, exp, "evaluate")  # process 2: a later stage re-attaches
    assert first["run_id"] == resumed.run_id == evaluated["run_id"] and first["active"]

    c = mlflow.MlflowClient(tracking_uri=tracking_store["uri"])
    experiment = c.get_experiment_by_name(exp)
    runs = c.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first["run_id"]]
    run = runs[0]
    assert [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, "loss")] == [(5, 2.5), (7, 2.5)]
    assert c.get_metric_history(run.info.run_id, "eval/orca-chat/eval_loss")[0].step == 10
    assert run.data.tags["orca8k.stage.train"] == "done" and run.data.tags["orca8k.stage.evaluate"] == "done"
    assert run.data.tags["orca8k.resumed"] == "true"
    assert run.info.status == "FINISHED"
    # the full resolved config, flattened
    assert run.data.params["train.learning_rate"] == str(cfg.train.learning_rate)
    assert run.data.params["data.sources.red_pajama.fraction"] == "0.25"
    assert len(run.data.params) == len(tracking.config_params(cfg))
    assert run.data.tags[tracking.PARAMS_HASH_TAG] == cfg.section_hash()
    recorded = json.loads(layout.train_run.read_text())
    assert recorded == json.loads(layout.checkpoint_run.read_text())
    assert recorded == {"run_id": first["run_id"], "experiment_id": experiment.experiment_id,
                        "tracking_uri": tracking_store["uri"]}
    # artifacts under the configured root, not ./mlruns
    assert experiment.artifact_location == Path(tracking_store["artifacts"]).resolve().as_uri()


def test_attach_without_train_and_with_a_foreign_run_fail_clearly(tmp_path, tracking_store):
    from orca8k.errors import RegistryError, StageInputMissing

    cfg = tracked_config(tmp_path, tracking_store, "attach-errors")
    layout = Layout.from_config(cfg)
    with pytest.raises(StageInputMissing, match="mlflow_run.json"):
        with tracking.attach_run(cfg, layout):
            pass
    layout.train_run.parent.mkdir(parents=True)
    layout.train_run.write_text(json.dumps({"run_id": "0" * 32, "experiment_id": "9", "tracking_uri": "sqlite:///x.db"}))
    with pytest.raises(RegistryError, match="not in the tracking store .* created in sqlite:///x.db"):
        with tracking.attach_run(cfg, layout):
            pass


def test_a_failing_stage_keeps_the_training_status(tmp_path, tracking_store):
    import mlflow

    cfg = tracked_config(tmp_path, tracking_store, "stage-fails")
    layout = Layout.from_config(cfg)
    with tracking.train_run(cfg, layout) as run:
        pass
    with pytest.raises(ValueError):
        with tracking.attach_run(cfg, layout, stage="evaluate"):
            raise ValueError("boom")
    got = mlflow.MlflowClient(tracking_uri=tracking_store["uri"]).get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["orca8k.stage.evaluate"] == "failed"
    assert tracking.current_run().active is False  # closed


# --------------------------------------------------------------------------------------------------- callback
def test_curves_callback_logs_each_value_at_its_step(tmp_path, tracking_store, monkeypatch):
    import mlflow
    from transformers import TrainerControl, TrainerState

    cfg = tracked_config(tmp_path, tracking_store, "curves")
    clock = iter([100.0, 102.0, 104.0])
    from orca8k.tracking import callback as callback_module
    monkeypatch.setattr(callback_module.time, "perf_counter", lambda: next(clock))
    with tracking.train_run(cfg, Layout.from_config(cfg)) as run:
        seen = {"orca-chat": 0}
        cb = tracking.MlflowCurvesCallback(run, extra_metrics=lambda: {f"supervised_tokens_seen/{k}": v for k, v in seen.items()})
        state = TrainerState()
        for step, tokens, logs in [(10, 4000, {"loss": 3.0, "learning_rate": 1e-4, "grad_norm": 1.5}),
                                   (20, 8000, {"loss": 2.0, "learning_rate": 2e-4, "grad_norm": 0.5}),
                                   (20, 8000, {"eval_loss": 2.25, "eval_orca-chat_loss": 2.5, "epoch": 0.5})]:
            state.global_step, state.num_input_tokens_seen = step, tokens
            seen["orca-chat"] += 100
            cb.on_log(None, state, TrainerControl(), logs=logs)
    c = mlflow.MlflowClient(tracking_uri=tracking_store["uri"])

    def hist(name):
        return [(m.step, m.value) for m in c.get_metric_history(run.run_id, name)]

    assert hist("loss") == [(10, 3.0), (20, 2.0)]
    assert hist("grad_norm") == [(10, 1.5), (20, 0.5)]
    assert hist("learning_rate") == [(10, 1e-4), (20, 2e-4)]
    assert hist("tokens_per_second") == [(20, 2000.0)]  # 4000 tokens in 2 s; the eval log adds no point
    assert hist("eval_loss") == [(20, 2.25)] and hist("eval_orca-chat_loss") == [(20, 2.5)]
    assert hist("supervised_tokens_seen/orca-chat") == [(10, 100), (20, 200), (20, 300)]


def test_callback_is_silent_off_rank_zero():
    from transformers import TrainerControl, TrainerState

    null = tracking.NullRun()
    cb = tracking.MlflowCurvesCallback(null)
    cb.on_log(None, TrainerState(), TrainerControl(), logs={"loss": 1.0})  # must not touch any store
    # every logging method is a no-op without a store (its URI is empty: a real call would fail)
    null.log_params({"a": 1}), null.set_tags({"a": "b"}), null.log_artifact("/nonexistent")
    null.log_dataset("mix", "d", "/x", "training")
    assert (null.params(), null.tags(), null.metric_keys(), null.dataset_digests()) == ({}, {}, set(), [])
    assert null._client is None


# --------------------------------------------------------------------------------------------------- secrets
def test_no_secret_reaches_the_store(tmp_path, tracking_store, monkeypatch):
    """Plant secrets in the environment and in the config, then search every param, tag, artifact and the DB."""
    import mlflow

    env_secret = "hf_PlantedEnvSecret0123456789abcdef"
    url_password = "Pl4ntedUrlPassw0rd"
    monkeypatch.setenv("HF_TOKEN", env_secret)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "another-planted-pw")
    cfg = tracked_config(tmp_path, tracking_store, "secrets", **{
        "base.revision": env_secret,  # a token pasted into a param value
        "base.model_name_or_path": f"https://bob:{url_password}@hub.example/llama",
        "tracking.experiment_name": "secrets another-planted-pw",
    })
    layout = Layout.from_config(cfg)
    with tracking.train_run(cfg, layout) as run:
        run.set_tags({"note": f"launched with HF_TOKEN={env_secret}"})
        tracking.log_metrics({"loss": 1.0}, step=1)
    got = mlflow.MlflowClient(tracking_uri=tracking_store["uri"]).get_run(run.run_id)
    values = [*got.data.params.values(), *got.data.tags.values()]
    assert got.data.params["base.revision"] == REDACTED
    assert got.data.params["base.model_name_or_path"] == f"https://bob:{REDACTED}@hub.example/llama"
    blobs = [Path(tracking_store["db"]).read_bytes(), layout.train_run.read_bytes(), layout.checkpoint_run.read_bytes()]
    blobs += [p.read_bytes() for p in Path(tracking_store["artifacts"]).rglob("*") if p.is_file()]
    assert any(b"resolved_params" in p.name.encode() for p in Path(tracking_store["artifacts"]).rglob("*"))
    for secret in (env_secret, url_password, "another-planted-pw"):
        assert not any(secret in v for v in values), secret
        assert not any(secret.encode() in b for b in blobs), secret


def test_connecting_leaves_the_environment_alone(tracking_store, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a later stage in the same process must still resolve
    its own store from params, so connecting restores the environment."""
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    tracking.connect(tracking_store["uri"])
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ


def test_artifacts_are_uploaded_with_text_files_redacted(tmp_path, monkeypatch):
    """Evidence files written by other stages (reports, JSON) go up through a redacted copy when they hold a secret;
    clean folders go up as they are; binary files are never rewritten."""
    from orca8k.tracking.runs import redacted_copy

    secret = "hf_PlantedArtifactSecret0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    clean = tmp_path / "clean"
    (clean / "sub").mkdir(parents=True)
    (clean / "sub" / "a.json").write_text('{"a": 1}')
    with redacted_copy(clean) as upload:
        assert upload == clean
    dirty = tmp_path / "dirty"
    (dirty / "sub").mkdir(parents=True)
    (dirty / "sub" / "report.html").write_text(f"<p>token {secret}</p>")
    (dirty / "plot.png").write_bytes(b"\x89PNG" + secret.encode())  # binary: left alone
    (dirty / "b.json").write_text('{"b": 2}')
    with redacted_copy(dirty) as upload:
        assert upload != dirty and upload.name == "dirty"
        assert (upload / "sub" / "report.html").read_text() == f"<p>token {REDACTED}</p>"
        assert (upload / "b.json").read_text() == '{"b": 2}'
        assert (upload / "plot.png").read_bytes() == (dirty / "plot.png").read_bytes()
    assert not upload.exists()  # the copy is temporary
    assert (dirty / "sub" / "report.html").read_text() == f"<p>token {secret}</p>"  # the stage's output untouched
    single = dirty / "sub" / "report.html"
    with redacted_copy(single) as upload:
        assert upload.name == "report.html" and upload.read_text() == f"<p>token {REDACTED}</p>"
