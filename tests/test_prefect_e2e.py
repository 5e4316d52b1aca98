"""End to end, as a user runs it: `prefect server start` (SQLite, its own PREFECT_HOME) and `mlflow server` on
127.0.0.1, the deployment served by `flows/deploy.py`, two runs triggered at once through the REST endpoint the UI's
"Run" button calls (`POST /api/deployments/{id}/create_flow_run`), one with `learning_rate=0.002`. Both complete in
their own `runs/<flow-run-name>/`, register their own versions, the override reaches MLflow, and the demo base is
computed once (the other run waits on the cache lock and reads it). Then headless Chromium renders the deployment's
run form in the Prefect UI: the parameters and their descriptions are in the DOM; the screenshot is kept as evidence.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fixtures.common import REPO
from tests.fixtures.flow import flow_overrides, flow_repo
from tests.fixtures.servers import free_port, start, stop, wait_http

pytestmark = pytest.mark.slow
EVIDENCE = REPO / "reports" / "evidence" / "prefect-run-form.png"  # reports/ is git-ignored


@pytest.fixture()
def stack(tmp_path, migrated_mlflow_db):
    """A repository copy with tiny demo data; Prefect server, MLflow server and the served deployment running."""
    repo = flow_repo(tmp_path / "repo")
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        pport, mport = free_port(), free_port()
        api = f"http://127.0.0.1:{pport}/api"
        server_env = {"PREFECT_HOME": str(tmp_path / "prefect-server"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                      "PREFECT_API_URL": api}
        procs.append(start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                            str(pport)], logs / "prefect-server.log", server_env))
        db = tmp_path / "mlflow-server.db"
        shutil.copyfile(migrated_mlflow_db, db)
        procs.append(start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                            "--artifacts-destination", str(tmp_path / "mlflow-artifacts"), "--host", "127.0.0.1",
                            "--port", str(mport), "--workers", "1"], logs / "mlflow-server.log"))
        wait_http(f"{api}/health", procs[0], logs / "prefect-server.log", 180)
        wait_http(f"http://127.0.0.1:{mport}/health", procs[1], logs / "mlflow-server.log", 180)
        serve_env = {"PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect-client"),
                     "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mport}"}
        procs.append(start([sys.executable, "flows/deploy.py"], logs / "serve.log", serve_env, cwd=repo))
        yield {"repo": repo, "api": api, "ui": f"http://127.0.0.1:{pport}", "mlflow": f"http://127.0.0.1:{mport}",
               "logs": logs, "serve": procs[2]}
    finally:
        for proc in reversed(procs):
            stop(proc)


RETRY_STATUSES = (429, 502, 503)  # what Prefect's own client retries (PREFECT_CLIENT_RETRY_EXTRA_CODES aside)


def _api(method: str, url: str, *, timeout_seconds: float = 60, **kwargs) -> httpx.Response:
    """One Prefect REST call, retried with backoff on 429/502/503 as `prefect.client` does: the server answers 503
    while its SQLite database is locked by another writer (the serve process, a flow run)."""
    deadline, wait = time.monotonic() + timeout_seconds, 0.5
    while True:
        r = httpx.request(method, url, timeout=30, **kwargs)
        if r.status_code not in RETRY_STATUSES or time.monotonic() + wait > deadline:
            return r
        time.sleep(wait)
        wait = min(wait * 2, 8.0)


def _deployment(api: str, serve: subprocess.Popen, log: Path, timeout_seconds: float = 120) -> dict:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            pytest.fail(f"flows/deploy.py exited {serve.returncode}:\n{log.read_text()[-3000:]}")
        r = _api("GET", f"{api}/deployments/name/finetune/demo")
        if r.status_code == 200:
            return r.json()
        time.sleep(0.5)
    pytest.fail(f"deployment finetune/demo not registered after {timeout_seconds} s:\n{log.read_text()[-3000:]}")


def _wait_final(api: str, ids: list[str], logs: Path, timeout_seconds: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout_seconds
    runs: dict[str, dict] = {}
    while time.monotonic() < deadline:
        runs = {i: _api("GET", f"{api}/flow_runs/{i}").raise_for_status().json() for i in ids}
        if all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs.values()):
            break
        time.sleep(2)
    bad = {r["name"]: r["state_type"] for r in runs.values() if r["state_type"] != "COMPLETED"}
    if bad:
        pytest.fail(f"flow runs not COMPLETED: {bad}\n{(logs / 'serve.log').read_text()[-6000:]}")
    return runs


def _base_states(api: str, flow_run_id: str) -> list[str]:
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}, "task_runs": {"name": {"like_": "base-"}}}
    return [t["state"]["name"] for t in _api("POST", f"{api}/task_runs/filter", json=body).raise_for_status().json()]


def test_two_ui_triggered_runs_at_once_then_the_run_form_in_chromium(stack, tmp_path):
    import mlflow

    api, repo = stack["api"], stack["repo"]
    deployment = _deployment(api, stack["serve"], stack["logs"] / "serve.log")
    tiny = flow_overrides()
    started = time.monotonic()
    ids = []
    for params in ({"overrides": tiny}, {"overrides": tiny, "learning_rate": 0.002}):
        r = _api("POST", f"{api}/deployments/{deployment['id']}/create_flow_run", json={"parameters": params})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    runs = _wait_final(api, ids, stack["logs"], 420)
    print(f"two runs at once: COMPLETED after {time.monotonic() - started:.0f} s")
    default_run, override_run = (runs[i]["name"] for i in ids)

    # separate run directories named after the flow runs, each with its resolved params
    params = {}
    for name in (default_run, override_run):
        root = repo / "runs" / name
        assert (root / "artifacts" / "model" / "model.safetensors").is_file()
        params[name] = yaml.safe_load((root / "params.yaml").read_text())
        assert params[name]["paths"]["root"] == str(root)
    repo_lr = yaml.safe_load((repo / "params.yaml").read_text())["train"]["learning_rate"]
    assert params[default_run]["train"]["learning_rate"] == repo_lr != 0.002
    assert params[override_run]["train"]["learning_rate"] == 0.002

    # the demo base was computed once and reused by content: one run computed it, the other read the cache
    bases = {name: Path(p["paths"]["root"]) / p["paths"]["base"] for name, p in params.items()}  # abs stays abs
    assert len(set(bases.values())) == 1
    [base_dir] = set(bases.values())
    assert sorted((repo / "runs").glob("*/artifacts/base")) == [base_dir]
    states = sorted(s for i in ids for s in _base_states(api, i))
    assert states == ["Cached", "Completed"]

    # separate registry versions on the MLflow server, each from its run; the override reached the MLflow run
    client = mlflow.MlflowClient(tracking_uri=stack["mlflow"], registry_uri=stack["mlflow"])  # not the global registry URI
    versions = client.search_model_versions("name='orca8k-demo'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    run_ids = {}
    for name in (default_run, override_run):
        run_file = json.loads((repo / "runs" / name / "metrics" / "mlflow_run.json").read_text())
        assert run_file["tracking_uri"] == stack["mlflow"]
        register = json.loads((repo / "runs" / name / "metrics" / "register.json").read_text())
        run_ids[name] = run_file["run_id"]
        assert {v.run_id: int(v.version) for v in versions}[run_file["run_id"]] == register["version"]
    assert run_ids[default_run] != run_ids[override_run]
    assert float(client.get_run(run_ids[override_run]).data.params["train.learning_rate"]) == 0.002
    assert float(client.get_run(run_ids[default_run]).data.params["train.learning_rate"]) == repo_lr

    # the run form in the UI, rendered by headless Chromium
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium); the UI form check did not run")
    url = f"{stack['ui']}/deployments/deployment/{deployment['id']}/run"
    names = ("learning_rate", "rope_factor", "max_length", "fractions", "overrides", "run_name", "params_file")
    descriptions = ("peak learning rate", "linear RoPE scaling factor", "tokens per training row",
                    "any other params keys, dotted")
    for budget_ms in (20_000, 40_000, 60_000):  # the SPA fetches the deployment and its schema: slower under load
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium'}", f"--virtual-time-budget={budget_ms}",
                "--window-size=1280,2400"]
        dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
        if all(n in dom for n in names) and all(d in dom for d in descriptions):
            break
    for name in names:
        assert name in dom, f"parameter {name} missing from the rendered run form"
    for description in descriptions:
        assert description in dom, f"description {description!r} missing from the rendered run form"
    png = tmp_path / "prefect-run-form.png"
    subprocess.run([*args, f"--screenshot={png}", url], capture_output=True, timeout=180, check=True)
    assert png.stat().st_size > 10_000
    EVIDENCE.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, EVIDENCE)
    print(f"run form screenshot: {png} (copied to {EVIDENCE})")
    assert os.path.getsize(EVIDENCE) == png.stat().st_size
