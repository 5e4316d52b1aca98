"""Server mode and serving: `mlflow server` (SQLite backend, proxied artifacts) on 127.0.0.1 as the tracking URI of
`train` + `register`, then `mlflow models serve -m models:/<name>@champion --env-manager local` answering one
generation request, then the same register against the stopped server failing clearly."""

from __future__ import annotations

import json
import shutil
import sys
import urllib.request

import pytest

from orca8k.errors import RegistryError
from orca8k.stages import register as register_stage
from tests.fixtures.registry import PROMPTS, trained_candidate
from tests.fixtures.servers import free_port, start, stop, wait_http

pytestmark = pytest.mark.slow


def test_server_mode_register_then_serve_champion(tmp_path, migrated_mlflow_db, saved_tiny_model, monkeypatch, tokenizer):
    from orca8k.tracking import store as store_module

    db = tmp_path / "server.db"
    shutil.copyfile(migrated_mlflow_db, db)
    port = free_port()
    server_log = tmp_path / "server.log"
    server = start([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                    "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
                    "--port", str(port), "--workers", "1"], server_log, {})
    uri = f"http://127.0.0.1:{port}"
    serve = None
    try:
        wait_http(f"{uri}/health", server, server_log, 180)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        store = {"uri": "sqlite:///unused.db", "artifacts": tmp_path / "unused-local-artifacts"}
        cfg, layout, run_id = trained_candidate(tmp_path / "run", store, saved_tiny_model, model_name="tiny-served",
                                                experiment="served")
        register_stage.run(cfg)
        m = json.loads(layout.register_metrics.read_text())
        assert (m["version"], m["decision"], m["champion"]) == (1, "promoted", 1)
        run_file = json.loads(layout.train_run.read_text())
        assert run_file["tracking_uri"] == uri
        assert run_file["run_url"] == f"{uri}/#/experiments/{run_file['experiment_id']}/runs/{run_id}"
        assert m["version_url"] == f"{uri}/#/models/tiny-served/versions/1"
        # artifacts went through the server (its --artifacts-destination), not to a local path of this client
        assert not (tmp_path / "unused-local-artifacts").exists()
        assert any((tmp_path / "server-artifacts").rglob("model.safetensors"))

        serve_port = free_port()
        serve_log = tmp_path / "serve.log"
        serve = start([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny-served@champion",
                       "--env-manager", "local", "-h", "127.0.0.1", "-p", str(serve_port)], serve_log,
                      {"MLFLOW_TRACKING_URI": uri})
        wait_http(f"http://127.0.0.1:{serve_port}/ping", serve, serve_log, 240)
        body = json.dumps({"inputs": [PROMPTS[0]], "params": {"max_new_tokens": 6, "do_sample": False}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{serve_port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            [reply] = json.loads(r.read())["predictions"]
        # the served reply is the greedy continuation of the OA prompt, computed here from the checkpoint folder
        import torch

        from orca8k.model.loading import load_causal_lm

        model = load_causal_lm(saved_tiny_model, dtype="bf16")
        ids = tokenizer(f"<s><|prompter|>{PROMPTS[0]}</s><|assistant|>", add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, repetition_penalty=1.2, min_new_tokens=4,
                                 eos_token_id=2, pad_token_id=2)
        expected = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert isinstance(reply, str) and reply.strip() == expected.strip()
    finally:
        if serve is not None:
            stop(serve)
        stop(server)
    # the server is down: register retries, then fails clearly, and nothing is written
    layout.register_metrics.unlink()
    monkeypatch.setattr(store_module, "RETRY_BACKOFF_SECONDS", 0.05)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(RegistryError, match=rf"MLflow at {uri}: could not connect after 3 attempt\(s\)"):
        register_stage.run(cfg)
    assert not layout.register_metrics.exists()
