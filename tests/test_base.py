"""Stage `base`: the demo builder (tokenizer + tiny pre-training), determinism, the time cap, and a hub / local base
resolved against local stand-ins (never the network)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from orca8k.config import load_config
from orca8k.errors import ConfigError, OfflineError, StageInputMissing
from orca8k.layout import Layout
from orca8k.model.base import check_architecture, resolve_base
from orca8k.model.pretrain import plain_text, pretraining_blocks
from orca8k.stages import run_stage
from tests.fixtures.common import REPO, run_cli

PARAMS = REPO / "params.yaml"
SMALL_DATA = ["demo_data.orca_chat_conversations=200", "demo_data.fanfics_stories=3", "demo_data.red_pajama_documents=24"]
TINY = [
    "base.architecture.vocab_size=400", "base.tokenizer.vocab_size=400", "base.architecture.hidden_size=32",
    "base.architecture.intermediate_size=64", "base.architecture.num_hidden_layers=2",
    "base.architecture.num_attention_heads=2", "base.architecture.num_key_value_heads=2",
    "base.pretrain.max_steps=3", "base.pretrain.per_device_train_batch_size=2", "base.pretrain.warmup_steps=1",
    "base.pretrain.logging_steps=1",
]


@pytest.fixture(scope="module")
def mixed_root(tmp_path_factory) -> Path:
    """A run root with small demo data and its mix (the real `mix` stage)."""
    from orca8k.data.demo import write_demo_data

    root = tmp_path_factory.mktemp("base_root")
    cfg = load_config(PARAMS, [f"paths.root={root}", *SMALL_DATA])
    write_demo_data(cfg)
    run_stage("mix", cfg)
    return root


def tiny_cfg(root: Path, *extra: str):
    return load_config(PARAMS, [f"paths.root={root}", *SMALL_DATA, *TINY, *extra])


@pytest.fixture(scope="module")
def built(mixed_root):
    cfg = tiny_cfg(mixed_root)
    result = run_stage("base", cfg)
    info = json.loads(Layout.from_config(cfg).base_info.read_text())
    return cfg, result, info


def test_plain_text_renders_chat_without_special_tokens():
    row = {"kind": "chat", "text": None, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"}]}
    assert plain_text(row) == "Be brief.\n\nUser: What is 2 + 3?\n\nAssistant: 5"
    row["messages"][0]["content"] = ""
    assert plain_text(row) == "User: What is 2 + 3?\n\nAssistant: 5"
    assert plain_text({"kind": "text", "text": "Once upon a time", "messages": None}) == "Once upon a time"


def test_pretraining_blocks_are_bos_text_eos_in_a_seeded_order(tokenizer):
    texts = ["one two three", "four five", "six seven eight nine ten"]
    blocks = pretraining_blocks(tokenizer, texts, context=4, seed=3)
    import random

    order = list(range(3))
    random.Random(3).shuffle(order)
    ids = []
    for i in order:
        ids += [tokenizer.bos_token_id, *tokenizer(texts[i], add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    assert blocks.shape == (len(ids) // 4, 4)
    assert blocks.flatten().tolist() == ids[: len(ids) // 4 * 4]


def test_demo_base_is_built_and_resolvable(built):
    from orca8k.model.loading import load_causal_lm
    from orca8k.model.tokenizer import OA_SPECIAL_TOKENS, load_base_tokenizer

    cfg, result, info = built
    layout = Layout.from_config(cfg)
    assert result.outputs == {"base": layout.base, "base_info": layout.base_info}
    assert resolve_base(cfg) == layout.base
    assert sorted(p.name for p in layout.base.iterdir()) == [
        "base_info.json", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer.model", "tokenizer_config.json"]
    p = info["pretrain"]
    assert (info["kind"], p["steps"], p["max_steps"], p["stopped_by_max_seconds"]) == ("demo", 3, 3, False)
    assert p["tokens_seen"] == 3 * 2 * 256
    assert [s for s, _ in p["loss_curve"]] == [1, 2, 3] and p["final_loss"] == p["loss_curve"][-1][1]
    assert info["revision"].startswith("sha256:") and info["native_context"] == 256
    assert info["train_tokens"] == info["train_blocks"] * 256

    tok = load_base_tokenizer(layout.base)
    assert len(tok) == 400 and (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert not set(OA_SPECIAL_TOKENS) & set(tok.get_vocab())
    model = load_causal_lm(layout.base)
    assert model.config.max_position_embeddings == 256
    assert model.config.rope_parameters["rope_type"] == "default"
    assert sum(x.numel() for x in model.parameters()) == info["parameters"]


def test_rebuild_gives_the_same_weights(built, mixed_root, tmp_path):
    """max_steps is the budget: a rerun (same threads) gives byte-identical weights, hence the same revision."""
    cfg, _, info = built
    other = tiny_cfg(mixed_root, f"paths.base={tmp_path / 'base2'}")
    run_stage("base", other)
    again = json.loads(Layout.from_config(other).base_info.read_text())
    assert again["revision"] == info["revision"]
    # tokenizer.model embeds its output path (sentencepiece's trainer_spec); the vocabulary itself is identical
    first = Layout.from_config(cfg).base
    assert (tmp_path / "base2" / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()


def test_max_seconds_is_a_cap_that_says_so(mixed_root, tmp_path, capsys):
    cfg = tiny_cfg(mixed_root, f"paths.base={tmp_path / 'capped'}", "base.pretrain.max_steps=50",
                   "base.pretrain.max_seconds=0.001")
    result = run_stage("base", cfg)
    assert result.summary["stopped_by_max_seconds"] is True and result.summary["steps"] == 1
    assert "max_seconds=0.001 reached: stopping at step 1 of 50" in capsys.readouterr().out


def test_fewer_steps_than_logging_steps_report_the_runs_mean_loss(mixed_root, tmp_path):
    """No logging window completes (log_history has no `loss`): `final_loss` is the Trainer's mean training loss,
    not NaN (which failed the stage as "non-finite training loss nan")."""
    cfg = tiny_cfg(mixed_root, f"paths.base={tmp_path / 'short'}", "base.pretrain.max_steps=2",
                   "base.pretrain.logging_steps=5")
    result = run_stage("base", cfg)
    pretrain = json.loads(Layout.from_config(cfg).base_info.read_text())["pretrain"]
    assert result.summary["steps"] == 2 and pretrain["loss_curve"] == []
    # the same two steps logged one by one (same seed, same weights): final_loss is their mean
    logged = tiny_cfg(mixed_root, f"paths.base={tmp_path / 'logged'}", "base.pretrain.max_steps=2",
                      "base.pretrain.logging_steps=1")
    run_stage("base", logged)
    curve = json.loads(Layout.from_config(logged).base_info.read_text())["pretrain"]["loss_curve"]
    assert [s for s, _ in curve] == [1, 2]
    assert pretrain["final_loss"] == pytest.approx((curve[0][1] + curve[1][1]) / 2, abs=1e-3)
    assert result.summary["final_loss"] == pretrain["final_loss"]


def test_missing_mix_is_reported(tmp_path):
    with pytest.raises(StageInputMissing, match="train.parquet"):
        run_stage("base", tiny_cfg(tmp_path))
    layout = Layout.from_config(tiny_cfg(tmp_path))
    assert not layout.base.with_name(layout.base.name + ".partial").exists()  # nothing half-written is left
    with pytest.raises(StageInputMissing, match="run `orca8k base` first"):
        resolve_base(tiny_cfg(tmp_path))


def test_refuses_to_replace_a_folder_that_is_not_a_base(mixed_root, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    from orca8k.errors import Orca8kError

    with pytest.raises(Orca8kError, match="does not hold a base"):
        run_stage("base", tiny_cfg(mixed_root, f"paths.base={tmp_path / 'precious'}"))
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------------- hub / local
ARCH = {"vocab_size": 600, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-06}  # LlamaConfig's default, as make_tiny_llama saves it


def hub_cfg(root: Path, name: str, revision: str | None = None, **arch):
    sets = [f"paths.root={root}", f"base.model_name_or_path={name}", f"base.revision={revision or 'null'}",
            "base.tokenizer=null", "base.pretrain=null", "tokenize.max_length=128",
            "evaluate.context_factors=[0.5, 1.0, 2.0]"]
    sets += [f"base.architecture.{k}={v}" for k, v in {**ARCH, **arch}.items()]
    return load_config(PARAMS, sets)


@pytest.fixture(scope="module")
def standin(base_tokenizer_dir, tmp_path_factory) -> Path:
    """A tiny saved Llama + base tokenizer: the local stand-in for a hub base."""
    import shutil

    from orca8k.model.loading import save_model
    from orca8k.model.tokenizer import load_base_tokenizer
    from tests.fixtures.models import make_tiny_llama

    out = tmp_path_factory.mktemp("standin")
    tok = load_base_tokenizer(base_tokenizer_dir)
    save_model(make_tiny_llama(600, hidden_size=32, layers=2, heads=4, context=64), tok, out)
    shutil.copy(base_tokenizer_dir / "tokenizer.model", out / "tokenizer.model")
    return out


def test_local_base_is_recorded_as_a_pointer_not_copied(standin, tmp_path):
    cfg = hub_cfg(tmp_path, str(standin))
    result = run_stage("base", cfg)
    layout = Layout.from_config(cfg)
    assert [p.name for p in layout.base.iterdir()] == ["base_info.json"]
    info = json.loads(layout.base_info.read_text())
    assert (info["kind"], info["path"], info["revision"]) == ("local", str(standin.resolve()), None)
    assert len(info["fingerprint"]) == 64 and result.summary["kind"] == "local"
    assert resolve_base(cfg) == standin.resolve()
    # params that name another base make the recorded pointer stale
    with pytest.raises(StageInputMissing, match="rerun `orca8k base`"):
        resolve_base(hub_cfg(tmp_path, str(standin) + "/"))
    with pytest.raises(StageInputMissing, match="records a local base, params ask for the demo base"):
        resolve_base(load_config(PARAMS, [f"paths.root={tmp_path}"]))


def test_architecture_mismatch_names_the_field(standin, tmp_path):
    with pytest.raises(ConfigError, match=r"base\.architecture\.hidden_size: params say 64 but .*config\.json has 32"):
        run_stage("base", hub_cfg(tmp_path, str(standin), hidden_size=64, intermediate_size=128))
    check_architecture({**ARCH, "max_position_embeddings": 64, "rope_parameters": {"rope_theta": 10000.0}},
                       hub_cfg(tmp_path, str(standin)).base.architecture, "x")
    with pytest.raises(ConfigError, match="base.architecture.rope_theta"):
        check_architecture({**ARCH, "rope_theta": 500000.0}, hub_cfg(tmp_path, str(standin)).base.architecture, "x")


def test_hub_id_offline_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE=1 is set"):
        run_stage("base", hub_cfg(tmp_path, "meta-llama/Llama-2-13b-hf", "main"))
    assert time.monotonic() - start < 5


def test_hub_commit_already_cached_resolves_offline(standin, tmp_path, monkeypatch):
    """A hub id pinned to a commit sha that is in the HF cache resolves without network (a stand-in cache entry)."""
    import shutil

    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(constants.HF_HUB_CACHE) / "models--orca8k-test--tiny-llama"
    shutil.copytree(standin, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = hub_cfg(tmp_path, "orca8k-test/tiny-llama", sha)
    run_stage("base", cfg)
    info = json.loads(Layout.from_config(cfg).base_info.read_text())
    assert (info["kind"], info["repo_id"], info["revision"]) == ("hub", "orca8k-test/tiny-llama", sha)
    assert resolve_base(cfg) == repo / "snapshots" / sha
    # a commit that is not cached fails at once, offline
    with pytest.raises(OfflineError):
        run_stage("base", hub_cfg(tmp_path, "orca8k-test/tiny-llama", "f" * 40))


def test_cli_base_offline_error_exits_1(tmp_path):
    proc = run_cli("base", "--set", f"paths.root={tmp_path}", "--set", "base.model_name_or_path=meta-llama/Llama-2-13b-hf",
                   "--set", "base.revision=main", cwd=REPO, check=False, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 1 and "OfflineError" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
    assert "HF_TOKEN" not in proc.stderr
