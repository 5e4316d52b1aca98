"""`orca8k register` against a real local MLflow (SQLite): registration from a checkpoint folder while loading the
model in memory is made to fail, what the loaded model keeps (dtype, RoPE, tokenizer), lineage and run records,
idempotency, the gate's outcomes, its compare-and-set under concurrency, and a store that fails."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import time

import pytest

from orca8k.errors import RegistryError
from orca8k.stages import register as register_stage
from orca8k.tracking import registry as reg
from tests.fixtures.common import REPO
from tests.fixtures.registry import NATIVE_CONTEXT, PROMPTS, SOURCES, trained_candidate


def _forbid_loading(mp: pytest.MonkeyPatch) -> None:
    """Make every way of loading weights into memory fail."""
    import safetensors.torch
    import transformers
    from transformers import PreTrainedModel

    def refuse(*args, **kwargs):
        raise AssertionError("the registry must not load the model into memory")

    mp.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse))
    mp.setattr(transformers, "pipeline", refuse)
    mp.setattr(transformers.pipelines, "pipeline", refuse)
    mp.setattr(safetensors.torch, "load_file", refuse)
    mp.setattr(safetensors.torch, "load", refuse)


@pytest.fixture(scope="module")
def first(tmp_path_factory, tracking_store, saved_tiny_model):
    """One registration (model `tiny-chat`) done with in-memory loading forbidden."""
    root = tmp_path_factory.mktemp("first")
    cfg, layout, run_id = trained_candidate(root, tracking_store, saved_tiny_model)
    with pytest.MonkeyPatch.context() as mp:
        _forbid_loading(mp)
        result = register_stage.run(cfg)
        # the guard is real: loading the version just registered fails under the same patches
        import mlflow

        with pytest.raises(AssertionError, match="must not load the model into memory"):
            mlflow.transformers.load_model(f"models:/tiny-chat/{result.summary['version']}", return_type="components")
        with pytest.raises(AssertionError, match="must not load the model into memory"):
            mlflow.pyfunc.load_model(f"models:/tiny-chat/{result.summary['version']}")
    return {"cfg": cfg, "layout": layout, "run_id": run_id, "result": result,
            "metrics": json.loads(layout.register_metrics.read_text())}


def _client(store):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=store["uri"], registry_uri=store["uri"])


def test_first_version_is_registered_with_aliases_and_metrics_file(first):
    m = first["metrics"]
    assert (m["model_name"], m["version"], m["created"], m["decision"], m["promoted"]) == ("tiny-chat", 1, True, "promoted", True)
    assert m["aliases"] == ["candidate", "champion"] and m["champion"] == 1 and m["champion_before"] is None
    assert m["reasons"][-1] == "PASS no champion yet: the first version passing the gate becomes champion"
    assert m["run_id"] == first["run_id"] and m["model_uri"] == "models:/tiny-chat/1"
    assert first["result"].outputs["register_metrics"] == first["layout"].register_metrics
    assert m["missing_artifacts"] == []


def test_loaded_model_keeps_dtype_rope_tokenizer_and_weights(first, tracking_store, saved_tiny_model, tokenizer, monkeypatch):
    import mlflow
    import torch
    from safetensors.torch import load_file

    from orca8k.model.tokenizer import OA_SPECIAL_TOKENS

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # mlflow.set_*_uri export these: restore after
        monkeypatch.setenv(key, tracking_store["uri"])
    mlflow.set_tracking_uri(tracking_store["uri"])
    mlflow.set_registry_uri(tracking_store["uri"])
    parts = mlflow.transformers.load_model("models:/tiny-chat@champion", return_type="components")
    model, tok = parts["model"], parts["tokenizer"]
    assert model.dtype == torch.bfloat16  # as trained, not MLflow's default
    assert model.config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert model.config.max_position_embeddings == NATIVE_CONTEXT
    trained = load_file(saved_tiny_model / "model.safetensors")
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.items())
    for token in ("<s>", "</s>", *OA_SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == tokenizer.convert_tokens_to_ids(token)
    text = "<|prompter|>the knight and the dragon</s><|assistant|>"
    assert tok(text, add_special_tokens=False).input_ids == tokenizer(text, add_special_tokens=False).input_ids


def test_readme_consumer_snippets_pyfunc_and_lineage_by_alias(first, tracking_store, monkeypatch):
    """The README's Python consumers: a generic pyfunc applies the OA prompt template (same greedy reply as the
    transformers components fed the OA prompt by hand), and the champion's lineage and gate reasons read by alias."""
    import mlflow

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(key, tracking_store["uri"])
    mlflow.set_tracking_uri(tracking_store["uri"])
    mlflow.set_registry_uri(tracking_store["uri"])
    params = {"max_new_tokens": 6, "do_sample": False}
    [reply] = mlflow.pyfunc.load_model("models:/tiny-chat@champion").predict([PROMPTS[0]], params=params)
    parts = mlflow.transformers.load_model("models:/tiny-chat@champion", return_type="components")
    model, tok = parts["model"], parts["tokenizer"]
    ids = tok(f"<s><|prompter|>{PROMPTS[0]}</s><|assistant|>", add_special_tokens=False, return_tensors="pt")
    by_hand = tok.decode(model.generate(**ids, **params)[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert isinstance(reply, str) and reply.strip() == by_hand.strip()
    v = mlflow.MlflowClient().get_model_version_by_alias("tiny-chat", "champion")
    assert (str(v.version), v.run_id) == ("1", first["run_id"])
    assert json.loads(v.tags["gate.reasons"]) == first["metrics"]["reasons"]
    assert v.tags["lineage.mix_hash"] == "unknown" and len(v.tags["lineage.git_commit"]) == 40


def test_model_folder_carries_card_and_generation_config(first, tracking_store):
    from orca8k.config import load_config
    from orca8k.tracking.registry import resolve_model_dir
    from tests.fixtures.tracking import tracked_config

    cfg = tracked_config(first["layout"].root, tracking_store, "register")
    folder = resolve_model_dir(cfg, "models:/tiny-chat@champion")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    assert (gen["max_new_tokens"], gen["min_new_tokens"], gen["repetition_penalty"], gen["do_sample"]) == (400, 4, 1.2, True)
    card = (folder / "README.md").read_text()
    assert card == first["layout"].register_model_card.read_text()
    assert "| orca-chat | 1.0 | 100 | 10 | synthetic (orca8k demo) |" in card
    assert "| red_pajama | 0.25 | 102 | 12 | synthetic (orca8k demo) |" in card
    assert f"| `train.learning_rate` | {load_config(REPO / 'params.yaml').train.learning_rate} |" in card
    assert "apache-2.0 (orca8k demo base)" in card and "linear RoPE scaling ×2.0" in card
    with pytest.raises(RegistryError, match="not found in the registry"):
        resolve_model_dir(cfg, "models:/tiny-chat@nonexistent")


def test_generate_loads_the_champion_through_the_registry(first, tracking_store, saved_tiny_model, capsys):
    """`orca8k generate --model models:/tiny-chat@champion` answers exactly as the checkpoint folder does."""
    from orca8k.cli import main

    root = first["layout"].root
    sets = [f"paths.root={root}", f"tracking.tracking_uri={tracking_store['uri']}",
            f"sampling.config_file={root / 'oa_configuration.json'}"]
    args = ["--params", str(REPO / "params.yaml"), *[x for kv in sets for x in ("--set", kv)],
            "--config", "greedy", "--max-new-tokens", "6", PROMPTS[0]]
    assert main(["generate", "--model", "models:/tiny-chat@champion", *args]) == 0
    via_registry = capsys.readouterr().out
    assert main(["generate", "--model", str(saved_tiny_model), *args]) == 0
    local = capsys.readouterr().out
    assert via_registry.startswith(f"### models:/tiny-chat@champion [greedy] prompt: {PROMPTS[0]}\n")
    assert via_registry.split("\n", 1)[1] == local.split("\n", 1)[1]  # same reply, same cut note
    assert main(["generate", "--model", "models:/tiny-chat@nobody", *args]) == 1
    assert "RegistryError: models:/tiny-chat@nobody: not found in the registry" in capsys.readouterr().err
    missing = root / "no-such-model"
    assert main(["generate", "--model", str(missing), *args]) == 1
    assert f"--model {missing}: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:  # argparse: usage line and message, exit 2, no traceback
        main(["generate", "--model", str(saved_tiny_model), "--max-new-tokens", "0", PROMPTS[0]])
    assert bad.value.code == 2 and "argument --max-new-tokens: 0 is not ≥ 1" in capsys.readouterr().err


def test_lineage_tags_run_records_and_dataset_input(first, tracking_store):
    c = _client(tracking_store)
    version = c.get_model_version("tiny-chat", "1")
    tags = version.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    val_sha = tags["lineage.val_set_sha256"]
    assert tags["lineage.git_commit"] == head and tags["lineage.git_dirty"] in ("true", "false")
    assert tags["lineage.validation_run_id"] == "gx-val-A-True" and tags["lineage.validation_success"] == "true"
    assert tags["lineage.params_hash"] == first["cfg"].section_hash()
    assert (tags["lineage.base_model"], tags["lineage.base_revision"]) == ("orca8k-demo-base", "none")
    assert tags["lineage.train_run_id"] == first["run_id"] and tags["lineage.dtype"] == "bfloat16"
    assert json.loads(tags["lineage.rope_parameters"])["factor"] == 2.0
    assert tags["orca8k.registration"] == "complete" and tags["gate.decision"] == "promoted"
    assert json.loads(tags["gate.evidence"])["eval_loss"] == {s: 2.0 for s in SOURCES}
    assert tags["orca8k.side_by_side"] == f"runs:/{first['run_id']}/register/v1/side_by_side.html"

    run = c.get_run(first["run_id"])
    assert run.data.tags["lineage.val_set_sha256"] == val_sha
    assert run.data.tags["orca8k.stage.register"] == "done" and run.info.status == "FINISHED"
    [dataset] = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("orca8k-mix", val_sha[:32])  # no dvc.lock here
    assert [m.step for m in c.get_metric_history(first["run_id"], "eval/orca-chat/eval_loss")] == [12]
    assert c.get_metric_history(first["run_id"], "context/ppl_ratio_2x_over_1x")[0].value == 0.95

    def files(path=""):
        out = []
        for f in c.list_artifacts(first["run_id"], path):
            out += files(f.path) if f.is_dir else [f.path]
        return out

    logged = set(files())
    for expected in ("mix/manifest.json", "validation/result.json", "validation/data_docs/index.html",
                     "tokenize/tokenize.json", "train/train.json", "eval/eval.json", "eval/ppl_vs_context.json",
                     "eval/passkey.json", "eval/plots/ppl_vs_context.png", "sampling/summary.json",
                     "sampling/index.html", "params/resolved_params.json", "register/v1/side_by_side.html"):
        assert expected in logged, expected


def test_register_twice_creates_no_second_version(first, tracking_store, capsys):
    register_stage.run(first["cfg"])
    again = json.loads(first["layout"].register_metrics.read_text())
    assert (again["version"], again["created"], again["decision"]) == (1, False, "already_champion")
    assert [str(v.version) for v in _client(tracking_store).search_model_versions("name = 'tiny-chat'")] == ["1"]
    assert "[register] tiny-chat v1 (existing version), gate: already_champion" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------- the gate
def test_gate_outcomes_better_worse_failed_validation_and_other_val_set(tmp_path, tracking_store, saved_tiny_model):
    name = "tiny-gate"

    def register(label, **upstream):
        cfg, layout, _ = trained_candidate(tmp_path / label, tracking_store, saved_tiny_model, model_name=name,
                                           reply=f"reply of {label}", **upstream)
        register_stage.run(cfg)
        return json.loads(layout.register_metrics.read_text()), layout

    a, _ = register("a", eval_loss=2.0)
    b, b_layout = register("b", eval_loss={"orca-chat": 1.9, "fanfics": 2.04, "red_pajama": 1.5})  # +0.04 <= 0.05
    c, _ = register("c", eval_loss={"orca-chat": 1.9, "fanfics": 2.2, "red_pajama": 1.5})  # fanfics +0.16 vs b
    d, _ = register("d", eval_loss=1.0, validation_success=False)
    e, _ = register("e", eval_loss=1.0, val_set="val-B")
    f, _ = register("f", eval_loss=1.0, ppl_ratio=1.3, proper_end_rate=0.25)
    assert [x["decision"] for x in (a, b, c, d, e, f)] == [
        "promoted", "promoted", "rejected", "rejected", "not_comparable", "rejected"]
    assert [x["champion"] for x in (a, b, c, d, e, f)] == [1, 2, 2, 2, 2, 2]
    assert b["champion_before"] == 1 and b["aliases"] == ["candidate", "champion"] and f["aliases"] == ["candidate"]
    client = _client(tracking_store)
    assert [sorted(client.get_model_version(name, str(v)).aliases) for v in (1, 2, 6)] == [[], ["champion"], ["candidate"]]
    assert "PASS eval_loss[fanfics] 2.0400 vs champion v1 2.0000 (+0.0400 <= 0.05)" in b["reasons"]
    assert "FAIL eval_loss[fanfics] 2.2000 vs champion v2 2.0400 (+0.1600 > 0.05)" in c["reasons"]
    assert d["reasons"][0] == "FAIL data validation success=false"
    assert e["reasons"][-1].startswith("NOT COMPARABLE champion v2 was evaluated on another val set")
    assert "FAIL ppl_ratio_2x_over_1x 1.3000 > 1.1" in f["reasons"]
    assert any(r.startswith("FAIL proper_end_rate 0.25") for r in f["reasons"])
    tags = client.get_model_version(name, "3").tags
    assert tags["gate.decision"] == "rejected" and tags["gate.compared_with"] == "v2"
    assert json.loads(tags["gate.reasons"]) == c["reasons"]
    # b's side-by-side page shows a's outputs (the champion it replaced) beside its own, for the same prompt/config
    page = b_layout.register_side_by_side.read_text()
    assert f"reply of b to {PROMPTS[0]} [greedy]" in page and f"reply of a to {PROMPTS[0]} [greedy]" in page
    assert b["side_by_side"] == {"rows": 4, "compared": 4, "only_candidate": 0}


def test_concurrent_promotions_cannot_both_win(tracking_store, monkeypatch):
    """Two passing candidates, each worse than the other on one source, promote at the same moment from two
    processes with no champion: under the lock the second is compared with the first and loses; without it both
    would win."""
    from orca8k.config import load_config
    from orca8k.registry import promote as promote_module
    from orca8k.registry.gate import Evidence
    from orca8k.tracking.store import connect

    store = connect(tracking_store["uri"])
    name = "tiny-race"
    store.client.create_registered_model(name)
    versions = [reg.get_version(store, name, store.client.create_model_version(name, f"file:///tmp/{i}").version)
                for i in range(2)]
    evidence = [Evidence("val", True, {"orca-chat": 1.0, "fanfics": 2.0}, 1.0, 1.0, 4, 0),
                Evidence("val", True, {"orca-chat": 2.0, "fanfics": 1.0}, 1.0, 1.0, 4, 0)]
    decide = promote_module.decide

    def slow_decide(*args, **kwargs):  # widen the race window between reading the champion and setting it
        time.sleep(0.5)
        return decide(*args, **kwargs)

    monkeypatch.setattr(promote_module, "decide", slow_decide)  # forked children inherit the patch
    gate = load_config(REPO / "params.yaml").register_.gate
    numbers = [v.version for v in versions]

    def go(i, queue):  # a separate process: its own store connection, the real file lock between processes
        own = connect(tracking_store["uri"])
        version = reg.get_version(own, name, numbers[i])
        queue.put((i, promote_module.promote(own, name, version, evidence[i], gate)[0].outcome))

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=go, args=(i, queue)) for i in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [got[0], got[1]]
    assert sorted(results) == ["promoted", "rejected"]
    winner = versions[results.index("promoted")].version
    assert reg.alias_version(store, name, reg.CHAMPION).version == winner


# --------------------------------------------------------------------------------------------------- failures
def test_unreachable_store_fails_clearly(tmp_path, tracking_store, saved_tiny_model, monkeypatch):
    import socket

    from orca8k.tracking import store as store_module

    cfg, layout, _ = trained_candidate(tmp_path / "down", tracking_store, saved_tiny_model, model_name="tiny-down")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(store_module, "RETRY_BACKOFF_SECONDS", 0.01)
    with pytest.raises(RegistryError, match=rf"MLflow at http://127.0.0.1:{port}: could not connect after 3 attempt\(s\)"):
        register_stage.run(cfg)
    assert not layout.register_metrics.exists()


def test_failure_after_the_version_exists_leaves_no_half_registered_version(tmp_path, tracking_store, saved_tiny_model, monkeypatch):
    name = "tiny-half"
    cfg, layout, run_id = trained_candidate(tmp_path / "half", tracking_store, saved_tiny_model, model_name=name)
    original = reg.set_alias

    def broken(store, model, alias, version):
        raise RegistryError("MLflow at test: could not set alias candidate after 3 attempt(s): ConnectionError")

    monkeypatch.setattr(reg, "set_alias", broken)
    with pytest.raises(RegistryError, match=r"tiny-half v1: registration failed .* the version was removed"):
        register_stage.run(cfg)
    c = _client(tracking_store)
    assert list(c.search_model_versions(f"name = '{name}'")) == []
    monkeypatch.setattr(reg, "set_alias", original)
    register_stage.run(cfg)  # the retry registers cleanly
    m = json.loads(layout.register_metrics.read_text())
    assert (m["version"], m["created"], m["aliases"]) == (2, True, ["candidate", "champion"])
    assert [v.run_id for v in c.search_model_versions(f"name = '{name}'")] == [run_id]


# --------------------------------------------------------------------------------------------------- a real stage process
def test_register_process_in_a_dvc_repo_logs_dvc_digests_deepspeed_and_no_secret(tmp_path, tracking_store, saved_tiny_model, monkeypatch):
    """`orca8k register` in its own process, in a repository with `data.dvc` and `dvc.lock`: it re-attaches to the
    run `train` created (one run), logs the mix with DVC's md5 as digest, the DeepSpeed config, and a secret planted
    in the environment and in params (train's and register's) is nowhere in the store, the model folder or the
    stage's outputs."""
    import mlflow

    from orca8k.redaction import REDACTED
    from tests.fixtures.common import run_cli

    secret = "hf_PlantedRegisterSecret0123456789ab"
    monkeypatch.setenv("HF_TOKEN", secret)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text("stages: {}\n")
    (repo / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  size: 10\n  path: run/data\n")  # paths.root = run
    (repo / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  mix:\n    cmd: orca8k mix\n    outs:\n"
        "    - path: run/artifacts/mix\n      md5: fedcba9876543210fedcba9876543210.dir\n")
    deepspeed = REPO / "configs" / "deepspeed" / "zero2.json"
    sets = {"train.deepspeed": str(deepspeed), "base.revision": f"main-{secret}"}
    cfg, layout, run_id = trained_candidate(repo / "run", tracking_store, saved_tiny_model, model_name="tiny-proc",
                                            experiment="proc", sets=sets)
    # the sampling report's own args carry the secret too (an upstream file, logged as an artifact)
    report = next(p for p in layout.sampling_reports.glob("*.json") if p.name != "summary.json")
    report.write_text(report.read_text().replace('"mode": "v3"', f'"mode": "v3", "auth": "Bearer {secret}"'))

    overrides = {"paths.root": str(layout.root), "tracking.tracking_uri": tracking_store["uri"],
                 "tracking.experiment_name": "proc", "register.model_name": "tiny-proc",
                 "sampling.config_file": str(layout.root / "oa_configuration.json"),
                 "register.base_license": f"apache-2.0 (see https://bob:{secret}@licences.example/x)"}
    args = [x for kv in overrides.items() for x in ("--set", "=".join(kv))]
    proc = run_cli("register", "--params", str(REPO / "params.yaml"), *args, cwd=repo,
                   env={"HF_TOKEN": secret, "MLFLOW_TRACKING_URI": ""})
    assert "[register] tiny-proc v1 (new version), gate: promoted; aliases: candidate, champion" in proc.stdout

    c = _client(tracking_store)
    [run] = c.search_runs([c.get_experiment_by_name("proc").experiment_id])
    assert run.info.run_id == run_id and run.data.tags["orca8k.stage.register"] == "done"
    [dataset] = run.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("orca8k-mix", "fedcba9876543210fedcba9876543210")
    assert {t.key: t.value for t in dataset.tags}["orca8k.digest_kind"] == "dvc-md5"
    tags = c.get_model_version("tiny-proc", "1").tags
    assert tags["lineage.data_hash"] == "0123456789abcdef0123456789abcdef.dir"
    lineage_metrics = json.loads(layout.register_metrics.read_text())["lineage"]
    assert lineage_metrics["data_hash"] == tags["lineage.data_hash"]  # `lineage.data_hash` in `dvc metrics show`
    assert not any(k.startswith("lineage.") for k in lineage_metrics)
    assert tags["lineage.mix_hash"] == "fedcba9876543210fedcba9876543210.dir"
    assert tags["lineage.base_revision"] == f"main-{REDACTED}"
    logged = {f.path for f in c.list_artifacts(run_id, "deepspeed")}
    assert logged == {"deepspeed/zero2.json"}
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="deepspeed/zero2.json",
                                                 dst_path=str(tmp_path / "dl"), tracking_uri=tracking_store["uri"])
    assert json.loads(open(folder).read()) == json.loads(deepspeed.read_text())
    # the planted secret: not in the DB, not in any artifact (model folder and card included), not in the outputs
    card = layout.register_model_card.read_text()
    assert f"https://bob:{REDACTED}@licences.example/x" in card
    blobs = [tracking_store["db"].read_bytes(), layout.register_metrics.read_bytes(), layout.train_run.read_bytes()]
    blobs += [p.read_bytes() for p in tracking_store["artifacts"].rglob("*") if p.is_file()]
    blobs += [p.read_bytes() for p in layout.register_reports.rglob("*") if p.is_file()]
    assert any(b"Bearer " + REDACTED.encode() in b for b in blobs)  # the report went up, redacted
    assert not any(secret.encode() in b for b in blobs)
