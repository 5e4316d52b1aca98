"""The config contract: strict keys, overrides, cross-field checks, the recipe's exact seed facts, `orca8k plan`."""

from __future__ import annotations

import json

import pytest

from orca8k.config import apply_overrides, config_from_dict, load_config, read_params
from orca8k.errors import ConfigError
from orca8k.plan import count_parameters, make_plan
from tests.fixtures.common import REPO, run_cli

RECIPE = REPO / "recipes" / "llama2-13b-orca-8k.yaml"
PARAMS = REPO / "params.yaml"


def test_demo_params_and_recipe_load_with_the_same_keys():
    demo, recipe = read_params(PARAMS), read_params(RECIPE)

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out.add(prefix + k)
            if isinstance(v, dict) and k not in ("sources",):
                out |= keys(v, prefix + k + ".")
        return out

    # every key a stage reads is spelled out in both files (null sections count as spelled out)
    demo_keys = {k for k in keys(demo) if not k.startswith(("demo_data.", "base.tokenizer.", "base.pretrain."))}
    recipe_keys = {k for k in keys(recipe) if not k.startswith(("data.sources.",))}
    assert {k for k in demo_keys if not k.startswith("data.sources.")} == recipe_keys
    load_config(PARAMS)
    load_config(RECIPE)


def test_recipe_has_the_seed_facts():
    cfg = load_config(RECIPE)
    assert cfg.seed == 0xE1291F1A
    assert cfg.base.model_name_or_path == "meta-llama/Llama-2-13b-hf"
    assert cfg.base.native_context == 4096
    assert cfg.tokenize.max_length == 8192
    assert (cfg.model.rope_scaling.type, cfg.model.rope_scaling.factor) == ("linear", 2.0)
    src = cfg.data.sources
    assert list(src) == ["orca-chat", "fanfics", "red_pajama"]
    assert src["orca-chat"].hub.repo_id == "shahules786/orca-chat"
    assert src["orca-chat"].hub.data_files == ["orca-chat-gpt4.json"]
    assert src["fanfics"].hub.repo_id == "atom-in-the-universe/fanfics-10k-50k"
    assert src["red_pajama"].hub.repo_id == "togethercomputer/RedPajama-Data-1T-Sample"
    assert [s.fraction for s in src.values()] == [1.0, 1.0, 0.25]
    assert [s.max_val_set for s in src.values()] == [5000, 1000, 1000]
    assert [s.max_chunk_size for s in src.values()] == [None, 65535, 65535]
    assert [s.expected_train_rows for s in src.values()] == [188842, 47760, 188262]
    assert cfg.data.val_split == 0.2
    t = cfg.train
    assert t.learning_rate == 1e-5 and t.warmup_steps == 100 and t.lr_scheduler_type == "constant_with_warmup"
    assert t.weight_decay == 0.0 and (t.adam_beta1, t.adam_beta2, t.adam_epsilon) == (0.9, 0.95, 1e-12)
    assert t.max_grad_norm == 2.0
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.world_size) == (2, 8, 8)
    assert t.num_train_epochs == 1.0 and (t.eval_steps, t.save_steps, t.save_total_limit) == (200, 1000, 4)
    assert t.fp16 and not t.bf16 and t.gradient_checkpointing
    assert t.deepspeed == "configs/deepspeed/zero2.json" and t.warmup_shape == "log"
    assert cfg.model.pad_vocab_size_multiple == 16
    assert cfg.tokenize.train_on_system is False


def test_plan_on_the_recipe_shows_3319_steps_and_128x8192_tokens(monkeypatch, tmp_path):
    # cwd = the repo (train.deepspeed is repo-relative); paths.root = an empty folder, so a mix manifest that a
    # `dvc repro` of the demo left in the checkout (artifacts/mix) is not read as the recipe's train rows
    monkeypatch.chdir(REPO)
    facts = make_plan(load_config(RECIPE, [f"paths.root={tmp_path}"]))
    assert facts["train_rows"] == 188_842 + 47_760 + 188_262  # the card's counts: 424,864 rows // 128 = 3319
    assert facts["train_rows_from"] == "data.sources.*.expected_train_rows"
    assert facts["optimizer_steps"] == 3319
    assert facts["rows_per_optimizer_step"] == 128
    assert facts["max_tokens_per_optimizer_step"] == 128 * 8192
    assert facts["effective_context_tokens"] == 8192
    assert facts["vocab_size_padded"] == 32016
    # Llama-2-13B has 13,015,864,320 parameters at vocab 32,000; 16 extra rows × 5120 × 2 (embed + lm_head)
    assert facts["parameters"] == 13_015_864_320 + 16 * 5120 * 2
    assert facts["memory_per_gpu"]["zero_stage"] == 2


def test_plan_reads_only_outputs_made_from_its_own_params(monkeypatch, tmp_path):
    """The demo and the recipe share `artifacts/mix` and `metrics/` in one checkout: the recipe's plan must not take
    the demo's mix manifest or token stats as its own (the demo's 2,592 rows would make it 20 steps)."""
    monkeypatch.chdir(REPO)
    recipe = load_config(RECIPE, [f"paths.root={tmp_path}"])
    demo = load_config(PARAMS, [f"paths.root={tmp_path}"])
    manifest = tmp_path / "artifacts" / "mix" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    stats = tmp_path / "metrics" / "tokenize.json"
    stats.parent.mkdir(parents=True)

    def write(cfg, rows: int) -> None:
        manifest.write_text(json.dumps({"params": {"seed": cfg.seed, "data": cfg.to_dict()["data"]},
                                        "sources": {"orca-chat": {"train": {"rows": rows}}}}))
        stats.write_text(json.dumps({"max_length": cfg.tokenize.max_length, "packing": cfg.tokenize.packing,
                                     "train": {"rows": rows, "tokens": 1000, "supervised_tokens": 250}}))

    write(demo, 2592)
    facts = make_plan(recipe)
    assert (facts["train_rows"], facts["optimizer_steps"]) == (424_864, 3319)
    assert facts["supervised_token_share"] is None
    write(recipe, 1280)  # a mix of the recipe's own params: its rows count
    facts = make_plan(recipe)
    assert (facts["train_rows"], facts["optimizer_steps"], facts["supervised_token_share"]) == (1280, 10, 0.25)
    assert facts["train_rows_from"] == f"mix manifest ({manifest})"


def test_a_packing_strategy_without_packing_is_refused():
    with pytest.raises(ConfigError, match=r"tokenize: packing_strategy='bfd_text_fill' packs: it needs packing: true"):
        load_config(PARAMS, ["tokenize.packing=false", "tokenize.packing_strategy=bfd_text_fill"])
    with pytest.raises(ConfigError, match=r"tokenize.packing_strategy: Input should be 'bfd' or 'bfd_text_fill'"):
        load_config(PARAMS, ["tokenize.packing_strategy=wrapped"])
    assert load_config(PARAMS, ["tokenize.packing=false"]).tokenize.packing_strategy == "bfd"


def test_plan_takes_packed_rows_only_from_stats_of_its_packing_strategy(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    stats = tmp_path / "metrics" / "tokenize.json"
    stats.parent.mkdir(parents=True)
    bfd = load_config(PARAMS, [f"paths.root={tmp_path}"])
    fill = load_config(PARAMS, [f"paths.root={tmp_path}", "tokenize.packing_strategy=bfd_text_fill"])
    train = {"rows": 700, "tokens": 1000, "supervised_tokens": 250}
    stats.write_text(json.dumps({"max_length": bfd.tokenize.max_length, "packing": True, "train": train}))
    share = "supervised_token_share"  # from the token stats, when they are this config's
    assert make_plan(bfd)[share] == 0.25  # stats from before packing_strategy existed: bfd's
    assert make_plan(fill)[share] is None and make_plan(fill)["packing_strategy"] == "bfd_text_fill"
    stats.write_text(json.dumps({"max_length": bfd.tokenize.max_length, "packing": True,
                                 "packing_strategy": "bfd_text_fill", "train": train}))
    assert (make_plan(bfd)[share], make_plan(fill)[share]) == (None, 0.25)


def test_plan_cli_prints_the_facts_as_json(tmp_path):
    proc = run_cli("plan", "--params", str(RECIPE), "--json", "--set", f"paths.root={tmp_path}", cwd=REPO)
    facts = json.loads(proc.stdout)
    assert facts["optimizer_steps"] == 3319 and facts["max_tokens_per_optimizer_step"] == 1_048_576


def test_parameter_count_matches_transformers():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = load_config(PARAMS)
    arch = cfg.base.architecture.model_copy(update={"hidden_size": 64, "intermediate_size": 96, "vocab_size": 300})
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**arch.model_dump()))
    assert count_parameters(arch)["total"] == sum(p.numel() for p in model.parameters())


def test_unknown_key_fails_with_its_dotted_path(tmp_path):
    data = read_params(PARAMS)
    data["train"]["lerning_rate"] = 1e-3
    bad = tmp_path / "bad.yaml"
    import yaml

    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"train\.lerning_rate: unknown key"):
        load_config(bad)


def test_override_of_a_missing_key_fails_and_typed_values_parse():
    with pytest.raises(ConfigError, match="unknown key train.lerning_rate"):
        load_config(PARAMS, ["train.lerning_rate=1"])
    cfg = load_config(PARAMS, ["train.learning_rate=3e-4", "data.sources.red_pajama.fraction=0.5", "train.max_seconds=null"])
    assert cfg.train.learning_rate == 3e-4 and cfg.data.sources["red_pajama"].fraction == 0.5
    assert cfg.train.max_seconds is None


def test_a_wrongly_typed_override_is_blamed_on_the_set_not_the_file():
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, ["train.learning_rate=abc"])
    line = next(ln for ln in str(err.value).splitlines() if ln.strip().startswith("train.learning_rate:"))
    assert line.endswith("(from --set train.learning_rate=abc)")
    with pytest.raises(ConfigError) as err:  # a bad value in the file names no --set
        config_from_dict({**read_params(PARAMS), "seed": "x"}, str(PARAMS))
    assert "--set" not in str(err.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("tokenize.max_length=1024", "exceeds the effective context"),
        ("data.sources.red_pajama.fraction=1.5", "data.sources.red_pajama.fraction"),
        ("data.sources.red_pajama.fraction=0", "data.sources.red_pajama.fraction"),
        ("data.sources.orca-chat.max_chunk_size=100", "chat sources are not chunked"),
        ("model.rope_scaling.factor=0.5", "model.rope_scaling.factor"),
        ("model.rope_scaling.type=dynamic", "model.rope_scaling.type"),
        ("train.bf16=true", None),
        ("train.nproc_per_node=2", "several processes need launcher"),
    ],
)
def test_cross_field_checks(override, message):
    if message is None:  # bf16 alone is fine; bf16 + fp16 is not
        load_config(PARAMS, [override])
        with pytest.raises(ConfigError, match="fp16 and bf16 are exclusive"):
            load_config(PARAMS, [override, "train.fp16=true"])
        return
    with pytest.raises(ConfigError, match=message):
        load_config(PARAMS, [override])


def test_rope_scaling_accepts_the_new_key_spelling():
    cfg = load_config(PARAMS, ["model.rope_scaling={rope_type: linear, factor: 2.0}"])
    assert cfg.model.rope_scaling.type == "linear"
    with pytest.raises(ConfigError, match="missing|Field required"):
        load_config(PARAMS, ["model.rope_scaling={type: linear}"])


def test_paths_resolve_against_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(PARAMS, ["paths.root=runs/x", f"paths.data={tmp_path / 'abs'}"])
    assert cfg.paths.resolve("mix") == tmp_path / "runs" / "x" / "artifacts" / "mix"
    assert cfg.paths.resolve("data") == tmp_path / "abs"


def test_apply_overrides_does_not_mutate_input():
    data = {"a": {"b": 1}}
    out = apply_overrides(data, ["a.b=2"])
    assert data == {"a": {"b": 1}} and out == {"a": {"b": 2}}


def test_a_boolean_is_never_read_as_a_number():
    # pydantic's lax mode would read `true` as 1: a typo'd `--set sampling.batch_size=true` must fail instead
    for key, value in (("sampling.batch_size", "true"), ("sampling.compact_every", "false"), ("train.learning_rate", "true"),
                       ("train.max_seconds", "true")):
        with pytest.raises(ConfigError) as err:
            load_config(PARAMS, [f"{key}={value}"])
        assert f"{key}: expected a number, got the boolean {value} (from --set {key}={value})" in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.torch_compile: .*valid boolean \(from --set train\.torch_compile=null\)"):
        load_config(PARAMS, ["train.torch_compile=null"])
    cfg = load_config(PARAMS, ["train.torch_compile=true", "sampling.compact_every=null", "train.max_seconds=90"])
    assert (cfg.train.torch_compile, cfg.sampling.compact_every, cfg.train.max_seconds) == (True, None, 90)
