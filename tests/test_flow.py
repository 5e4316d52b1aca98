"""The Prefect flow `finetune` in-process under `prefect_test_harness`: the demo at a tiny budget completes and
registers a version, a flow retry after a failure in `register` reruns only `register`, and two runs needing the same
content-keyed task compute it once (SERIALIZABLE cache with file locks)."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.fixtures.common import REPO
from tests.fixtures.flow import flow_overrides, flow_repo

pytestmark = pytest.mark.slow
sys.path.insert(0, str(REPO / "flows"))


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def in_repo(tmp_path, migrated_mlflow_db, monkeypatch):
    repo = flow_repo(tmp_path / "repo", migrated_mlflow_db)
    monkeypatch.chdir(repo)
    return repo


def _task_runs(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC)


def test_flow_registers_a_candidate_and_a_retry_after_register_fails_reruns_only_register(harness, in_repo, monkeypatch):
    import mlflow
    import pipeline

    calls: Counter[str] = Counter()
    real_run_stage, real_mix = pipeline.run_stage, pipeline.reproduce_mix

    def counting_run_stage(name, cfg):
        calls[name] += 1
        if name == "register" and calls[name] == 1:
            raise RuntimeError("injected register failure")
        return real_run_stage(name, cfg)

    def counting_mix(repo):
        calls["mix"] += 1
        return real_mix(repo)

    monkeypatch.setattr(pipeline, "run_stage", counting_run_stage)
    monkeypatch.setattr(pipeline, "reproduce_mix", counting_mix)
    model_file = in_repo / "runs" / "t1" / "artifacts" / "model" / "model.safetensors"

    state = pipeline.finetune.with_options(retries=1, retry_delay_seconds=0)(
        overrides=flow_overrides(), run_name="t1", return_state=True)

    assert state.is_completed(), state
    out = state.result()
    # every stage ran once; register failed once and ran again on the flow's retry
    assert dict(calls) == {"mix": 1, "validate": 1, "base": 1, "tokenize": 1, "train": 1, "evaluate": 1,
                           "sampling-report": 1, "register": 2}
    runs = _task_runs(state.state_details.flow_run_id)
    by_name: dict[str, list[str]] = {}
    for tr in runs:
        by_name.setdefault(tr.name.rsplit("-", 1)[0], []).append(tr.state.name)
    stages = ["validate", "base", "tokenize", "train", "evaluate", "sampling-report"]
    assert by_name["register"] == ["Failed", "Completed"]
    for stage in stages:  # first attempt computed it, the retry read the persisted result
        assert by_name[stage] == ["Completed", "Cached"], (stage, by_name)
    assert by_name["mix_task"] == ["Completed", "Cached"]
    assert model_file.is_file()

    # the registry holds the version, alias `candidate`, from this run's MLflow run
    uri = f"sqlite:///{in_repo / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # not an earlier test's global registry URI
    reg = out["register"]
    version = client.get_model_version_by_alias("orca8k-demo", "candidate")
    assert (int(version.version), reg["version"], reg["model_name"]) == (1, 1, "orca8k-demo")
    assert "candidate" in reg["aliases"]
    assert out["run_dir"] == str(in_repo / "runs" / "t1")
    import json

    run_file = json.loads((in_repo / "runs" / "t1" / "metrics" / "mlflow_run.json").read_text())
    assert version.run_id == run_file["run_id"]
    assert (in_repo / "runs" / "t1" / "metrics" / "register.json").is_file()


def test_two_runs_at_once_compute_a_content_keyed_task_once(harness, tmp_path):
    """Two flows in two threads call a task with the stage cache policy and the same key at once: one computes
    (holding the lock), the other waits and reads its result (state Cached)."""
    from prefect import flow, task

    from orca8k.orchestration import cache_dir, stage_cache_policy

    executions = tmp_path / "executions.txt"
    policy = stage_cache_policy(lambda ctx, params: f"shared-{params['content']}", tmp_path)

    @task(cache_policy=policy, persist_result=True, result_storage=cache_dir(tmp_path) / "results",
          result_serializer="json")
    def expensive(content: str) -> str:
        with executions.open("a") as f:
            f.write(f"{threading.get_ident()}\n")
        time.sleep(3)
        return content.upper()

    @flow
    def uses_it(content: str):
        return expensive(content, return_state=True)

    states: dict[str, object] = {}

    def run(name: str) -> None:
        states[name] = uses_it("abc")

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
        time.sleep(0.3)
    for t in threads:
        t.join(timeout=120)
    assert len(executions.read_text().splitlines()) == 1
    assert sorted(s.name for s in states.values()) == ["Cached", "Completed"]
    assert [s.result() for s in states.values()] == ["ABC", "ABC"]
    assert Path(cache_dir(tmp_path) / "locks").is_dir() and not list((cache_dir(tmp_path) / "locks").glob("*.lock"))
