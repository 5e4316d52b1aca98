"""The registry's pure parts: lineage from git/DVC files, the gate's decision table, evidence parsing, the
generation config and the side-by-side page (no MLflow)."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest

from orca8k.errors import DataError, StageInputMissing
from orca8k.registry import card, compare, lineage
from orca8k.registry.gate import Evidence, decide

GATE = SimpleNamespace(enabled=True, max_eval_loss_regression=0.05, max_ppl_ratio_2x_over_1x=1.1, min_proper_end_rate=0.5)


def _ev(**kw) -> Evidence:
    base = dict(val_set_sha256="v" * 64, validation_success=True, eval_loss={"a": 2.0, "b": 3.0},
                ppl_ratio_2x_over_1x=1.0, proper_end_rate=0.9, outputs=10, empty_outputs=0)
    return Evidence(**{**base, **kw})


# --------------------------------------------------------------------------------------------------- lineage
def test_lineage_reads_git_data_dvc_and_the_mix_out_of_dvc_lock(tmp_path):
    repo = tmp_path / "repo"
    (repo / "artifacts" / "mix").mkdir(parents=True)
    (repo / "data.dvc").write_text("outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  size: 10\n  path: data\n")
    (repo / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  mix:\n    cmd: orca8k mix\n    outs:\n"
        "    - path: artifacts/mix\n      md5: fedcba9876543210fedcba9876543210.dir\n"
        "    - path: metrics/mix.json\n      md5: 11111111111111111111111111111111\n"
    )
    assert lineage.git_state(repo) == ("unknown", "unknown")  # not a repository
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "data.dvc"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert lineage.git_state(repo) == (head, "false")
    (repo / "data.dvc").write_text((repo / "data.dvc").read_text() + "# edited\n")
    assert lineage.git_state(repo) == (head, "true")
    assert lineage.data_hash(repo, repo / "data") == "0123456789abcdef0123456789abcdef.dir"
    assert lineage.data_hash(repo, tmp_path / "elsewhere") == "unknown"  # --set paths.data=…: not what data.dvc hashes
    (repo / "hub-2026.dvc").write_text("outs:\n- md5: 22222222222222222222222222222222.dir\n  path: data/hub-2026\n")
    assert lineage.data_hash(repo, repo / "data" / "hub-2026") == "22222222222222222222222222222222.dir"
    assert lineage.mix_hash(repo, repo / "artifacts" / "mix") == "fedcba9876543210fedcba9876543210.dir"
    assert lineage.mix_hash(repo, repo / "runs" / "x" / "artifacts" / "mix") == "unknown"  # another run's mix
    tags = {"lineage.mix_hash": "fedcba9876543210fedcba9876543210.dir", "lineage.val_set_sha256": "a" * 64}
    assert lineage.mix_digest(tags) == ("fedcba9876543210fedcba9876543210", "dvc-md5")
    assert lineage.mix_digest({**tags, "lineage.mix_hash": "unknown"}) == ("a" * 32, "val-sha256")
    (repo / "data.dvc").write_text("outs: []\n")
    with pytest.raises(DataError, match=r"data.dvc: field outs\[0\].path/md5"):
        lineage.data_hash(repo, repo / "data")
    (repo / "data.dvc").write_text("outs:\n- path: data\n")
    with pytest.raises(DataError, match=r"data.dvc: field outs\[0\].md5 missing"):
        lineage.data_hash(repo, repo / "data")


def test_validation_result_and_model_facts_name_what_is_wrong(tmp_path):
    path = tmp_path / "result.json"
    with pytest.raises(StageInputMissing, match="run `orca8k validate` first"):
        lineage.ValidationStatus.read(path)
    path.write_text(json.dumps({"success": "yes", "run_id": "r"}))
    with pytest.raises(DataError, match="result.json: field success missing or not a boolean"):
        lineage.ValidationStatus.read(path)
    path.write_text(json.dumps({"success": True}))
    with pytest.raises(DataError, match="field run_id missing"):
        lineage.ValidationStatus.read(path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(StageInputMissing, match="no \\*.safetensors"):
        lineage.model_facts(tmp_path / "m")


# --------------------------------------------------------------------------------------------------- gate
def test_gate_decision_table():
    assert decide(_ev(), None, GATE).outcome == "promoted"
    champion = _ev(eval_loss={"a": 2.0, "b": 3.0})
    assert decide(_ev(eval_loss={"a": 2.05, "b": 2.0}), champion, GATE, "4").reasons[-2:] == [
        "PASS eval_loss[a] 2.0500 vs champion v4 2.0000 (+0.0500 <= 0.05)",
        "PASS eval_loss[b] 2.0000 vs champion v4 3.0000 (-1.0000 <= 0.05)",
    ]
    assert decide(_ev(eval_loss={"a": 2.06, "b": 2.0}), champion, GATE).outcome == "rejected"
    assert decide(_ev(eval_loss={"a": 1.0}), champion, GATE).outcome == "not_comparable"  # lacks source b
    assert decide(_ev(val_set_sha256="w" * 64), champion, GATE).outcome == "not_comparable"
    assert decide(_ev(val_set_sha256="w" * 64, validation_success=False), champion, GATE).outcome == "rejected"
    missing_ratio = decide(_ev(ppl_ratio_2x_over_1x=None), None, GATE)
    assert (missing_ratio.outcome, missing_ratio.reasons[1]) == (
        "rejected", "FAIL context.ppl_ratio_2x_over_1x missing from the eval metrics")
    no_outputs = decide(_ev(outputs=0, empty_outputs=0), None, GATE)
    assert no_outputs.outcome == "rejected" and "FAIL sampling report has 0 outputs (0 empty)" in no_outputs.reasons
    # proper_end_rate alone is not enough: empty outputs count against the rate
    empty = decide(_ev(proper_end_rate=0.9, outputs=10, empty_outputs=6), None, GATE)
    assert empty.outcome == "rejected" and "FAIL proper_end_rate 0.9 and non-empty share 0.4000 < 0.5" in empty.reasons
    off = decide(_ev(), None, SimpleNamespace(**{**vars(GATE), "enabled": False}))
    assert (off.outcome, off.promote) == ("disabled", False)
    assert Evidence.from_json(_ev().to_json()) == _ev()


def test_evidence_names_the_file_and_field(tmp_path):
    e, s = tmp_path / "eval.json", tmp_path / "summary.json"
    good = {"eval": {"a": {"eval_loss": 1.5}}, "context": {"ppl_ratio_2x_over_1x": 0.9}}
    summary = {"outputs": 4, "empty_outputs": 1, "proper_end_rate": 0.75, "files": []}
    ev = Evidence.from_outputs(good, e, summary, s, True, "h")
    assert (ev.eval_loss, ev.ppl_ratio_2x_over_1x, ev.outputs, ev.empty_outputs) == ({"a": 1.5}, 0.9, 4, 1)
    with pytest.raises(DataError, match=r"eval.json: field eval.a.eval_loss missing or not a number \(got 'x'\)"):
        Evidence.from_outputs({"eval": {"a": {"eval_loss": "x"}}}, e, summary, s, True, "h")
    with pytest.raises(DataError, match="eval.json: field eval missing or empty"):
        Evidence.from_outputs({}, e, summary, s, True, "h")
    with pytest.raises(DataError, match="summary.json: field empty_outputs missing"):
        Evidence.from_outputs(good, e, {"outputs": 4}, s, True, "h")


# --------------------------------------------------------------------------------------------------- card, page
def test_generation_config_takes_eos_pad_from_the_tokenizer_and_the_oa_defaults(tmp_path, saved_tiny_model):
    cfg_file = tmp_path / "oa.json"
    cfg_file.write_text(json.dumps({"default": {"generate_args": {"max_new_tokens": 400, "top_p": 0.9, "typo": 1}},
                                    "configurations": [{"name": "greedy"}]}))
    gen = card.generation_config(saved_tiny_model, cfg_file)
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    assert (gen["max_new_tokens"], gen["top_p"]) == (400, 0.9) and "typo" not in gen
    ids = card.special_token_ids(saved_tiny_model)
    assert ids["<|prompter|>"] > ids["</s>"] and len(set(ids.values())) == 5
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in saved_tiny_model.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "eos_token_id": 7}))
    with pytest.raises(DataError, match="eos_token_id 7 is not the tokenizer's </s> id 2"):
        card.generation_config(broken, cfg_file)
    with pytest.raises(DataError, match="field default.generate_args unreadable"):
        card.generation_config(saved_tiny_model, tmp_path / "none.json")


def test_side_by_side_pairs_prompts_and_configurations(tmp_path):
    def folder(name, outputs):
        d = tmp_path / name
        d.mkdir()
        report = {"model_name": name, "date": "d", "args": {}, "prompts": [
            {"prompt": p, "results": [{"sampling_config": c, "sampling_params": {}, "outputs": o}]}
            for (p, c), o in outputs.items()]}
        (d / "r.json").write_text(json.dumps(report))
        (d / "summary.json").write_text(json.dumps({"outputs": 2, "empty_outputs": 0, "proper_end_rate": 1.0,
                                                    "files": ["r.json"]}))
        return compare.read_report_folder(d)

    cand = folder("cand", {("2+2?", "greedy"): ["<b>4</b>"], ("hi", "k50"): ["", "hello"]})
    champ = folder("champ", {("2+2?", "greedy"): ["5"]})
    page, counts = compare.side_by_side_html(cand, "m v2", champ, "m v1 (champion)", "promoted", ["PASS x"])
    assert counts == {"rows": 2, "compared": 1, "only_candidate": 1}
    assert "&lt;b&gt;4&lt;/b&gt;" in page and "<pre>5</pre>" in page and "<em>(empty)</em>" in page
    assert "champion has no output for this prompt/config" in page
    _, counts = compare.side_by_side_html(cand, "m v1", None, "no champion yet", "promoted", [])
    assert counts == {"rows": 2, "compared": 0, "only_candidate": 2}
    (tmp_path / "cand" / "r.json").write_text(json.dumps({"prompts": [{"prompt": "p"}]}))
    with pytest.raises(DataError, match="r.json: field 'results' missing"):
        compare.read_report_folder(tmp_path / "cand")
