"""Warm-up shapes (DeepSpeed WarmupLR semantics, explicit), the DeepSpeed configs and their checks against params,
the precision checks before step 0, and the launcher command lines."""

from __future__ import annotations

import json
import math

import pytest
import torch

from orca8k.config import load_config
from orca8k.errors import ConfigError, TrainingError
from orca8k.training.arguments import check_precision, load_deepspeed_config, model_load_dtype
from orca8k.training.launch import launch_command, needs_relaunch
from orca8k.training.schedule import lr_factor, make_lr_scheduler, warmup_factor
from tests.fixtures.common import REPO

PARAMS = REPO / "params.yaml"
RECIPE = REPO / "recipes" / "llama2-13b-orca-8k.yaml"


def test_log_and_linear_warmup_follow_deepspeed_warmuplr_exactly():
    # W = 4: DeepSpeed's WarmupLR leaves step 1 at min_lr, then γ(i) with i = step - 2
    log = [warmup_factor(k, 4, "log") for k in range(1, 8)]
    assert log == [0.0, 0.0, math.log(2) / math.log(4), math.log(3) / math.log(4), 1.0, 1.0, 1.0]
    assert log[2] == 0.5
    linear = [warmup_factor(k, 4, "linear") for k in range(1, 8)]
    assert linear == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    with pytest.raises(ValueError, match="shape"):
        warmup_factor(3, 4, "cosine")


def test_log_warmup_is_deepspeeds_own_formula():
    """Against DeepSpeed's scheduler object itself (no engine, no JIT): same LR at every step."""
    from deepspeed.runtime.lr_schedules import WarmupLR

    for shape in ("log", "linear"):
        w = torch.nn.Parameter(torch.zeros(1))
        ds_opt = torch.optim.AdamW([w], lr=1e-3)
        ds = WarmupLR(ds_opt, warmup_min_lr=0.0, warmup_max_lr=1e-3, warmup_num_steps=10, warmup_type=shape)
        ours_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        ours = make_lr_scheduler(ours_opt, warmup_steps=10, total_steps=30, shape=shape, scheduler_type="constant_with_warmup")
        for step in range(1, 20):
            # the LR optimiser step `step` uses, then each scheduler steps once (as the engine / Trainer do)
            assert ours_opt.param_groups[0]["lr"] == pytest.approx(ds_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), (shape, step)
            for opt in (ds_opt, ours_opt):
                opt.param_groups[0]["params"][0].grad = torch.zeros(1)
                opt.step()
            ds.step()
            ours.step()


def test_decays_after_the_warmup():
    kw = {"warmup_steps": 4, "total_steps": 20, "shape": "linear"}
    assert lr_factor(5, scheduler_type="constant_with_warmup", **kw) == 0.75
    assert lr_factor(6, scheduler_type="linear", **kw) == 1.0  # first step at the full rate
    assert lr_factor(13, scheduler_type="linear", **kw) == pytest.approx(1 - 7 / 15)
    assert lr_factor(13, scheduler_type="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert lr_factor(1, scheduler_type="constant", **kw) == 1.0
    assert lr_factor(1, warmup_steps=0, total_steps=20, shape="log", scheduler_type="constant_with_warmup") == 1.0


# ----------------------------------------------------------------------------------------------- DeepSpeed configs
def test_zero2_is_the_seeds_zero_config_pretrain_without_train_batch_size():
    ds = json.loads((REPO / "configs" / "deepspeed" / "zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    assert not any("offload" in k for k in ds["zero_optimization"])
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    assert ds["scheduler"]["type"] == "WarmupLR"
    assert ds["scheduler"]["params"] == {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}
    assert "train_batch_size" not in ds
    assert ds["train_micro_batch_size_per_gpu"] == ds["gradient_accumulation_steps"] == ds["gradient_clipping"] == "auto"
    assert ds["fp16"]["enabled"] == ds["bf16"]["enabled"] == "auto"


def test_zero3_gathers_16bit_weights_on_save():
    ds = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "train_batch_size" not in ds


def test_recipe_deepspeed_config_gets_the_log_shape_from_params(monkeypatch):
    monkeypatch.chdir(REPO)
    ds = load_deepspeed_config(load_config(RECIPE))
    assert ds["scheduler"]["params"]["warmup_type"] == "log"
    ds = load_deepspeed_config(load_config(RECIPE, ["train.warmup_shape=linear"]))
    assert ds["scheduler"]["params"]["warmup_type"] == "linear"
    assert load_deepspeed_config(load_config(PARAMS)) is None


def _ds_cfg(tmp_path, data, *sets):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return load_config(PARAMS, [f"train.deepspeed={path}", *sets])


@pytest.mark.parametrize(
    ("data", "sets", "message"),
    [
        ({"train_batch_size": "auto"}, ["train.launcher=torchrun", "train.nproc_per_node=2"], "train_batch_size"),
        ({"scheduler": {"type": "WarmupDecayLR"}}, [], "not supported"),
        ({"scheduler": {"type": "WarmupLR"}}, ["train.lr_scheduler_type=cosine"], "lr_scheduler_type"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "log"}}}, ["train.warmup_shape=linear"], "warmup_type"),
        ({"scheduler": {"type": "WarmupLR"}}, ["train.warmup_steps=0"], "at least 2 steps"),
    ],
)
def test_deepspeed_configs_that_contradict_params_are_rejected(tmp_path, data, sets, message):
    with pytest.raises(ConfigError, match=message):
        load_deepspeed_config(_ds_cfg(tmp_path, data, *sets))


def test_missing_deepspeed_file_is_named(tmp_path):
    cfg = load_config(PARAMS, [f"train.deepspeed={tmp_path / 'nope.json'}"])
    with pytest.raises(ConfigError, match="nope.json"):
        load_deepspeed_config(cfg)


# ----------------------------------------------------------------------------------------------- precision
def _train(*sets):
    return load_config(PARAMS, list(sets)).train


@pytest.mark.parametrize(
    ("dtype", "sets", "ds", "device", "message"),
    [
        (torch.bfloat16, [], None, "cpu", "model weights are torch.bfloat16"),
        (torch.float16, ["train.fp16=true"], None, "cuda", "model weights are torch.float16"),
        (torch.float32, ["train.bf16=true"], {"fp16": {"enabled": True}, "bf16": {"enabled": "auto"}}, "cuda", "fp16.enabled=True"),
        (torch.float32, [], {"bf16": {"enabled": True}}, "cpu", "bf16.enabled=True"),
        (torch.float16, ["train.bf16=true"], {"bf16": {"enabled": "auto"}}, "cuda", "model weights are torch.float16"),
        (torch.float32, ["train.fp16=true"], None, "cpu", "needs a CUDA GPU"),
    ],
)
def test_dtype_mismatches_are_rejected_before_step_0(dtype, sets, ds, device, message):
    with pytest.raises(TrainingError, match=message):
        check_precision(dtype, _train(*sets), ds, device)


@pytest.mark.parametrize(
    ("dtype", "sets", "ds", "device"),
    [
        (torch.float32, [], None, "cpu"),
        (torch.float32, ["train.bf16=true"], None, "cpu"),
        (torch.float32, ["train.fp16=true"], None, "cuda"),
        (torch.float16, ["train.fp16=true"], {"fp16": {"enabled": "auto"}}, "cuda"),
        (torch.bfloat16, ["train.bf16=true"], {"bf16": {"enabled": True}, "fp16": {"enabled": False}}, "cuda"),
    ],
)
def test_consistent_precision_passes(dtype, sets, ds, device):
    check_precision(dtype, _train(*sets), ds, device)


def test_weights_load_in_half_only_under_deepspeed():
    assert model_load_dtype(_train("train.fp16=true"), {"fp16": {"enabled": "auto"}}) == "fp16"
    assert model_load_dtype(_train("train.fp16=true"), None) == "fp32"
    assert model_load_dtype(_train(), {}) == "fp32"


# ----------------------------------------------------------------------------------------------- launcher
def test_launcher_command_lines(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    params = tmp_path / "launch_params.yaml"
    cfg = load_config(PARAMS, ["train.launcher=torchrun", "train.nproc_per_node=2"])
    assert needs_relaunch(cfg)
    cmd = launch_command(cfg, params)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--standalone"]
    assert cmd[6:] == ["-m", "orca8k", "train", "--params", str(params)]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not needs_relaunch(cfg)  # already one of the launched ranks
    monkeypatch.delenv("LOCAL_RANK")

    two_nodes = load_config(PARAMS, ["train.launcher=torchrun", "train.nproc_per_node=8", "train.num_nodes=2"])
    for var in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ConfigError, match="NODE_RANK"):
        launch_command(two_nodes, params)
    monkeypatch.setenv("NODE_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29511")
    assert launch_command(two_nodes, params)[4:8] == ["--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29511"]

    monkeypatch.delenv("MASTER_PORT")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("worker-0 slots=8\nworker-1 slots=8\n")
    ds = load_config(PARAMS, ["train.launcher=deepspeed", "train.nproc_per_node=8", "train.num_nodes=2", f"train.hostfile={hostfile}"])
    cmd = launch_command(ds, params)
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert cmd[3:9] == ["--num_gpus", "8", "--num_nodes", "2", "--hostfile", str(hostfile)]
    assert cmd[9:] == ["--no_local_rank", "--module", "orca8k", "train", "--params", str(params)]
    single = load_config(PARAMS, ["train.launcher=deepspeed", "train.nproc_per_node=1"])
    assert not needs_relaunch(single)  # one process: no launcher needed


@pytest.mark.parametrize(("optim", "fused"), [(None, True), ("adamw_torch", False)])
def test_the_optimizer_is_torchs_adamw_with_the_seeds_settings_fused_by_default(tmp_path, optim, fused):
    from transformers import Trainer

    from orca8k.layout import Layout
    from orca8k.training.arguments import training_arguments

    cfg = load_config(PARAMS, [f"paths.root={tmp_path}"] + ([f"train.optim={optim}"] if optim else []))
    args = training_arguments(cfg, Layout.from_config(cfg), None)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    assert cls is torch.optim.AdamW
    assert kwargs == {"lr": 5e-4, "betas": (0.9, 0.95), "eps": 1e-12, **({"fused": True} if fused else {})}
