"""The `train` stage on a tiny Llama (in-process): outputs and their RoPE convention, per-source eval, the schedule as
logged, checkpoints, the facts printed before step 0, and the stops (non-finite loss, wall-clock budget, dtype)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from orca8k.config import load_config
from orca8k.data.collate import causal_lm_loss, training_loss
from orca8k.errors import StageInputMissing, TrainingError
from orca8k.layout import Layout
from orca8k.model.loading import load_causal_lm
from orca8k.model.tokenizer import OA_SPECIAL_TOKENS, load_tokenizer
from orca8k.stages import run_stage
from orca8k.training.checkpoints import COMPLETE_MARKER, list_checkpoints
from orca8k.training.schedule import warmup_factor
from tests.fixtures.common import REPO
from tests.fixtures.train import NATIVE_CONTEXT, tiny_train_overrides


def _cfg(root, inputs, store, **extra):
    return load_config(REPO / "params.yaml", tiny_train_overrides(root, inputs, store, **extra))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, train_inputs, tracking_store):
    """One finished 6-step run (module-scoped: several tests read its outputs)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = _cfg(root, train_inputs, tracking_store)
    result = run_stage("train", cfg)
    return cfg, Layout.from_config(cfg), result


def test_outputs_follow_the_rope_convention_and_reload(trained, train_inputs):
    cfg, layout, result = trained
    assert result.outputs == {"model": layout.model, "checkpoints": layout.checkpoints,
                              "train_metrics": layout.train_metrics, "train_run": layout.train_run}
    config = json.loads((layout.model / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert config["max_position_embeddings"] == NATIVE_CONTEXT  # native; effective = 128
    assert config["vocab_size"] % 16 == 0 and config["vocab_size"] >= 600 + len(OA_SPECIAL_TOKENS)
    assert config["use_cache"] is True
    files = sorted(p.name for p in layout.model.iterdir())
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt", ".pth"))], files
    umask = os.umask(0)
    os.umask(umask)  # safetensors writes 0600: the weights must be as readable as the config next to them
    assert {p.name: p.stat().st_mode & 0o777 for p in layout.model.iterdir()} == dict.fromkeys(files, 0o666 & ~umask)
    tok = load_tokenizer(layout.model)  # the OA tokenizer travels with the model
    assert len(tok) == 600 + len(OA_SPECIAL_TOKENS)
    # the final model is the last checkpoint's weights, and reloads with its scaling
    model = load_causal_lm(layout.model)
    assert model.config.rope_parameters["factor"] == 2.0
    last = load_file(str(layout.checkpoints / "checkpoint-6" / "model.safetensors"))
    final = load_file(str(layout.model / "model.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    base = load_file(str(train_inputs / "base" / "model.safetensors"))
    assert not torch.equal(final["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


def test_metrics_eval_per_source_and_logged_schedule(trained):
    cfg, layout, result = trained
    m = json.loads(layout.train_metrics.read_text())
    assert m["global_step"] == m["max_steps"] == 6 and m["resumed_from_step"] == 0
    assert set(m["eval"]) == {"orca-chat", "fanfics"}
    total = sum(v["supervised_tokens"] for v in m["eval"].values())
    weighted = sum(v["eval_loss"] * v["supervised_tokens"] for v in m["eval"].values()) / total
    assert m["eval_loss"] == pytest.approx(weighted)
    assert 0 < m["eval_loss"] < 7 and m["train_loss"] > 0
    # 6 steps × 2 rows × 2 accumulation = the 24 rows once: every real token counted once
    from datasets import load_from_disk

    rows = load_from_disk(str(layout.tokenized_train))
    assert m["tokens"] == m["tokens_this_run"] == sum(len(r) for r in rows["input_ids"])
    assert m["parameters"] > 0 and 0 < m["supervised_token_share"] < 1
    assert result.summary["global_step"] == 6
    # eval every 3 steps, per source, in the checkpoint's log history; the LR logged is the one each step applied
    history = json.loads((layout.checkpoints / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [3, 6]
    assert all({"eval_orca-chat_loss", "eval_fanfics_loss"} <= h.keys() for h in evals)
    lrs = {h["step"]: h["learning_rate"] for h in history if "learning_rate" in h}
    assert lrs == {k: pytest.approx(3e-3 * warmup_factor(k, 2, "linear")) for k in range(1, 7)}
    assert lrs[3] == pytest.approx(1.5e-3)  # half-way through the linear warm-up of W=2 (DeepSpeed's indexing)


def _history(store, run_id: str, key: str) -> list[tuple[int, float]]:
    import mlflow

    hist = mlflow.MlflowClient(tracking_uri=store["uri"]).get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.step, m.timestamp))]


def test_mlflow_curves_grad_norm_tokens_per_second_and_supervised_tokens_per_source(trained, tracking_store):
    """The run's training curves: loss, lr, grad norm, tokens/s at every logged step, and the supervised tokens seen
    per source, which end at exactly the supervised tokens of each source's train rows (all 24 rows seen once)."""
    from datasets import load_from_disk

    cfg, layout, _ = trained
    run_id = json.loads(layout.train_run.read_text())["run_id"]
    for key in ("loss", "learning_rate", "grad_norm"):
        assert [step for step, _ in _history(tracking_store, run_id, key)] == [1, 2, 3, 4, 5, 6], key
    speed = _history(tracking_store, run_id, "tokens_per_second")
    # between log events from step 2 on, then the whole run's average from train.json at the last step
    assert [step for step, _ in speed] == [2, 3, 4, 5, 6, 6] and all(v > 0 for _, v in speed)
    assert speed[-1][1] == json.loads(layout.train_metrics.read_text())["tokens_per_second"]
    rows = load_from_disk(str(layout.tokenized_train))
    expected: dict[str, int] = {}
    for source, labels in zip(rows["source"], rows["labels"], strict=True):
        expected[source] = expected.get(source, 0) + sum(1 for x in labels if x != -100)
    assert set(expected) == {"orca-chat", "fanfics"}
    for source, total in expected.items():
        curve = _history(tracking_store, run_id, f"supervised_tokens_seen/{source}")
        values = [v for _, v in curve]
        assert values == sorted(values) and 0 < values[0] < total, source
        assert curve[-1] == (6, total), source
    state = json.loads((layout.checkpoints / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["SourceTokensSeen"]["attributes"]["seen"] == expected  # resumes count on


def test_checkpoints_are_marked_and_rotated(trained):
    cfg, layout, _ = trained
    names = [p.name for p in list_checkpoints(layout.checkpoints)]
    assert names == ["checkpoint-4", "checkpoint-6"]  # save_steps 2, limit 2; the best (step 6) is the newest
    assert all((layout.checkpoints / n / COMPLETE_MARKER).is_file() for n in names)
    run = json.loads(layout.train_run.read_text())
    assert run["run_id"] and run == json.loads(layout.checkpoint_run.read_text())


def test_facts_are_printed_before_step_0(tmp_path, train_inputs, tracking_store, capsys):
    cfg = _cfg(tmp_path, train_inputs, tracking_store, **{"train.max_steps": 1, "train.eval_steps": 1})
    run_stage("train", cfg)
    out = capsys.readouterr().out
    facts_at = out.index("[train] parameters")
    assert facts_at < out.index("[train] step 1/1")
    assert "native 64 × RoPE linear 2 = effective 128 tokens" in out
    assert "per optimizer step       4 rows" in out and "(at most 512)" in out
    assert "supervised share" in out and "optimizer steps          1" in out


def _corrupt_base(inputs, dst):
    shutil.copytree(inputs / "base", dst)
    weights = load_file(str(dst / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, train_inputs, tracking_store):
    base = _corrupt_base(train_inputs, tmp_path / "bad_base")
    cfg = _cfg(tmp_path, train_inputs, tracking_store, **{"paths.base": str(base)})
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at optimiser step 1"):
        run_stage("train", cfg)
    layout = Layout.from_config(cfg)
    assert list_checkpoints(layout.checkpoints) == [] and not layout.model.exists()


def test_wall_clock_budget_stops_cleanly_and_a_rerun_continues(tmp_path, train_inputs, tracking_store, capsys):
    cfg = _cfg(tmp_path, train_inputs, tracking_store, **{"train.max_seconds": 1e-6})
    layout = Layout.from_config(cfg)
    run_stage("train", cfg)
    out = capsys.readouterr().out
    assert "stopping at step 1/6: train.max_seconds=1e-06 reached" in out
    m = json.loads(layout.train_metrics.read_text())
    assert m["global_step"] == 1 and m["stopped_by_max_seconds"] is True
    assert [p.name for p in list_checkpoints(layout.checkpoints)] == ["checkpoint-1"]
    first_run = json.loads(layout.train_run.read_text())["run_id"]
    # the budget is bookkeeping: lifting it resumes the same run from checkpoint-1
    run_stage("train", _cfg(tmp_path, train_inputs, tracking_store))
    out = capsys.readouterr().out
    assert "checkpoints: resuming from checkpoint-1" in out and "resumed from step 1" in out
    m = json.loads(layout.train_metrics.read_text())
    assert m["global_step"] == 6 and m["resumed_from_step"] == 1 and m["stopped_by_max_seconds"] is False
    assert json.loads(layout.train_run.read_text())["run_id"] == first_run


def test_fp16_on_cpu_is_rejected_before_step_0(tmp_path, train_inputs, tracking_store):
    cfg = _cfg(tmp_path, train_inputs, tracking_store, **{"train.fp16": True})
    with pytest.raises(TrainingError, match="train.fp16 needs a CUDA GPU"):
        run_stage("train", cfg)
    assert list_checkpoints(Layout.from_config(cfg).checkpoints) == []


def test_missing_inputs_name_the_upstream_stage(tmp_path, train_inputs, tracking_store):
    cfg = _cfg(tmp_path, train_inputs, tracking_store, **{"paths.tokenized": str(tmp_path / "none")})
    with pytest.raises(StageInputMissing, match="orca8k tokenize"):
        run_stage("train", cfg)


def test_tokens_the_suite_did_not_pass_are_refused(tmp_path, train_inputs, tracking_store):
    from orca8k.errors import ValidationFailed

    tokenized = tmp_path / "tokenized"
    shutil.copytree(train_inputs / "tokenized", tokenized)
    cfg = _cfg(tmp_path, train_inputs, tracking_store, **{"paths.tokenized": str(tokenized)})
    result = tokenized / "validation" / "result.json"
    result.write_text('{"success": false, "run_id": "tokens-x"}')
    with pytest.raises(ValidationFailed, match="failed its token-level checks"):
        run_stage("train", cfg)
    result.unlink()  # an interrupted tokenize: data without a result
    with pytest.raises(StageInputMissing, match="never checked"):
        run_stage("train", cfg)
    assert not Layout.from_config(cfg).model.exists()


def _packed_inputs(tmp_path, train_inputs):
    """A tokenized folder under `tmp_path` whose train split is the fixture's examples packed into rows of 128
    (val and tokenizer copied as they are); returns (folder, examples, packed rows)."""
    from datasets import Dataset, load_from_disk

    from orca8k.data.packing import pack_examples

    examples = load_from_disk(str(train_inputs / "tokenized" / "train")).to_list()
    packed = pack_examples(examples, 128)
    tokenized = tmp_path / "tokenized"
    shutil.copytree(train_inputs / "tokenized" / "val", tokenized / "val")
    shutil.copytree(train_inputs / "tokenized" / "tokenizer", tokenized / "tokenizer")
    shutil.copytree(train_inputs / "tokenized" / "validation", tokenized / "validation")
    Dataset.from_list(packed).save_to_disk(str(tokenized / "train"))
    return tokenized, examples, packed


def test_packed_rows_train_and_count_only_real_tokens(tmp_path, train_inputs, tracking_store, capsys):
    from orca8k.data.collate import CausalLMCollator
    from orca8k.training.trainer import real_token_count

    tokenized, examples, packed = _packed_inputs(tmp_path, train_inputs)
    assert len(packed) < len(examples)
    real = sum(len(e["input_ids"]) for e in examples)

    # the count itself, on collated batches of both kinds (pad = eos = 2 also appears as a real token)
    collate = CausalLMCollator(pad_token_id=2)
    assert int(real_token_count(collate(packed[:3]), 2)) == sum(len(r["input_ids"]) for r in packed[:3])
    assert int(real_token_count(collate(examples[:3]), 2)) == sum(len(e["input_ids"]) for e in examples[:3])

    steps = -(-len(packed) // 2)
    cfg = _cfg(tmp_path, train_inputs, tracking_store, **{
        "paths.tokenized": str(tokenized), "train.gradient_accumulation_steps": 1, "train.max_steps": steps,
        "train.eval_steps": steps, "train.save_steps": steps})
    run_stage("train", cfg)
    assert "(packing True)" in capsys.readouterr().out
    m = json.loads(Layout.from_config(cfg).train_metrics.read_text())
    assert m["global_step"] == steps and m["tokens"] == real
    # packed rows name their examples' sources: the per-source curves end at each source's supervised tokens
    run_id = json.loads(Layout.from_config(cfg).train_run.read_text())["run_id"]
    for source in ("orca-chat", "fanfics"):
        total = sum(sum(1 for x in e["labels"] if x != -100) for e in examples if e["source"] == source)
        assert _history(tracking_store, run_id, f"supervised_tokens_seen/{source}")[-1] == (steps, total)


def test_torch_compile_trains_the_same_model_and_saves_plain_weights(tmp_path, train_inputs, tracking_store,
                                                                     monkeypatch):
    # packed rows: all near 128 tokens, so few shapes (dynamo turns the length dynamic at the second one)
    import orca8k.data.collate as collate_module

    losses = []  # the Trainer's compute_loss_func per run: compiled with the model
    monkeypatch.setattr(collate_module, "training_loss", lambda *a: losses.append(training_loss(*a)) or losses[-1])
    tokenized, _, _ = _packed_inputs(tmp_path, train_inputs)
    sets = {"paths.tokenized": str(tokenized), "train.gradient_accumulation_steps": 1, "train.max_steps": 3,
            "train.eval_steps": 3, "train.save_steps": 3, "tracking.experiment_name": "compile"}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    runs = {}
    for compiled in (False, True):
        cfg = _cfg(tmp_path / str(compiled), train_inputs, tracking_store, **sets, **{"train.torch_compile": compiled})
        run_stage("train", cfg)
        layout = Layout.from_config(cfg)
        runs[compiled] = (json.loads(layout.train_metrics.read_text()), load_file(layout.model / "model.safetensors"))
        if not compiled:
            assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled run really ran compiled graphs
    assert losses[0] is causal_lm_loss and losses[1] is training_loss(True)  # the loss is compiled too
    (eager, eager_weights), (comp, comp_weights) = runs[False], runs[True]
    assert list(comp_weights) == list(eager_weights)  # no `_orig_mod.` prefixes: later stages load it as usual
    assert comp["global_step"] == eager["global_step"] == 3 and comp["tokens"] == eager["tokens"]
    assert comp["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-5)
    for name, tensor in eager_weights.items():
        torch.testing.assert_close(comp_weights[name], tensor, atol=1e-6, rtol=0)  # fused kernels round differently
