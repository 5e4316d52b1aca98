"""The evaluate stage end to end on tiny saved models: contract keys, plot tables, figures, determinism."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from orca8k.config import load_config
from orca8k.errors import ConfigError, DataError, StageInputMissing
from orca8k.layout import Layout
from orca8k.stages import run_stage
from tests.fixtures.common import REPO
from tests.fixtures.evaluate import EVAL_NATIVE_CONTEXT, make_eval_run

CONTRACT_CONTEXT_KEYS = {
    "native_context", "ppl_1x", "ppl_2x", "ppl_ratio_2x_over_1x", "scaled_base_ppl_2x", "unscaled_base_ppl_ratio_2x_over_1x",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "seconds"}


def test_stage_writes_the_contract_and_is_deterministic(eval_run):
    layout = Layout.from_config(eval_run)
    result = run_stage("evaluate", eval_run)
    assert set(result.outputs) >= {"eval_metrics", "ppl_vs_context", "passkey", "ppl_vs_context_png", "passkey_png"}
    metrics = json.loads(layout.eval_metrics.read_text())

    # CONTRACTS §7: the keys the registry gate reads
    assert set(metrics["eval"]) == {"orca-chat", "fanfics", "red_pajama"}
    for source in metrics["eval"].values():
        assert set(source) == {"eval_loss", "perplexity", "token_accuracy", "supervised_tokens"}
    # orca-chat: 5 conversations, assistant replies + </s> supervised; text rows: every token after BOS
    assert metrics["eval"]["orca-chat"]["supervised_tokens"] > 0
    assert CONTRACT_CONTEXT_KEYS <= set(metrics["context"])
    assert metrics["context"]["native_context"] == EVAL_NATIVE_CONTEXT
    assert metrics["context"]["ppl_ratio_2x_over_1x"] == pytest.approx(metrics["context"]["ppl_2x"] / metrics["context"]["ppl_1x"])
    # budget 64 tokens / tail 16 = 4 windows, round-robin over the 3 documents of ≥ 256 tokens (red_pajama-0002
    # is too short): block 0 of each, then block 1 of the first (fanfics-0001)
    assert metrics["context"]["windows_per_length"] == 4 and metrics["context"]["scored_tokens_per_length"] == 64
    assert metrics["context"]["documents_by_source"] == {"fanfics": 2, "red_pajama": 1}
    assert metrics["forward_tokens"]["ppl_vs_context"] == 3 * 4 * (32 + 64 + 128 + 192 + 256)
    assert metrics["seconds"]["total"] >= metrics["seconds"]["per_source"] + metrics["seconds"]["ppl_vs_context"]
    assert 0.0 <= metrics["passkey"]["accuracy"] <= 1.0 and metrics["passkey"]["trials"] == 6
    assert set(metrics["acceptance"]) == {"passed", "ppl_ratio_2x_over_1x_ok", "max_ppl_ratio_2x_over_1x", "ppl_2x_below_scaled_base"}

    table = json.loads(layout.ppl_vs_context.read_text())
    assert [(r["model"], r["context_length"]) for r in table] == [
        (m, n) for m in ("base_unscaled", "base_scaled", "fine_tuned") for n in (32, 64, 128, 192, 256)
    ]
    assert all(r["scored_tokens"] == 64 for r in table)
    ppl = {(r["model"], r["context_length"]): r["perplexity"] for r in table}
    assert ppl[("fine_tuned", 128)] == metrics["context"]["ppl_1x"]
    assert ppl[("base_scaled", 256)] == metrics["context"]["scaled_base_ppl_2x"]
    # same weights, other RoPE: the numbers differ, so the scaling really reached the model
    assert ppl[("base_scaled", 256)] != ppl[("base_unscaled", 256)]
    passkey = json.loads(layout.passkey.read_text())
    assert [(r["context_length"], r["depth"]) for r in passkey] == [(256, 0.0), (256, 0.5), (256, 1.0)]
    for png in (layout.ppl_vs_context_png, layout.passkey_png):
        assert png.read_bytes()[:8] == PNG_MAGIC
    trials = json.loads(layout.passkey_trials.read_text())
    assert len(trials) == 6 and all(len(t["key"]) == 5 for t in trials)

    # determinism: a second run gives identical numbers (timings aside)
    tables = (layout.ppl_vs_context.read_text(), layout.passkey.read_text())
    run_stage("evaluate", eval_run)
    assert _without_timing(json.loads(layout.eval_metrics.read_text())) == _without_timing(metrics)
    assert (layout.ppl_vs_context.read_text(), layout.passkey.read_text()) == tables


def test_missing_inputs_and_bad_factors_are_named(tmp_path, base_tokenizer_dir, tokenizer_dir):
    with pytest.raises(ConfigError, match=r"evaluate: .*must contain \[2.0\]"):
        load_config(REPO / "params.yaml", ["evaluate.context_factors=[0.5, 1.0]"])
    cfg = make_eval_run(tmp_path / "b", base_tokenizer_dir, tokenizer_dir)
    layout = Layout.from_config(cfg)
    shutil.rmtree(layout.tokenized_val)
    with pytest.raises(StageInputMissing, match="tokenized/val"):
        run_stage("evaluate", cfg)


def test_no_document_long_enough_is_a_data_error(tmp_path, base_tokenizer_dir, tokenizer_dir):
    cfg = make_eval_run(tmp_path / "c", base_tokenizer_dir, tokenizer_dir)
    layout = Layout.from_config(cfg)
    frame = pd.read_parquet(layout.mix_val)
    frame.loc[frame["kind"] == "text", "text"] = "a short text"
    frame.to_parquet(layout.mix_val)
    with pytest.raises(DataError, match="no text row has 256 tokens"):
        run_stage("evaluate", cfg)
