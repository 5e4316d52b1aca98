"""DeepSpeed on CPU and several processes: ZeRO-2 in one process (the distributed environment set as a launcher
would), the same through `orca8k train` relaunching itself under torchrun with two processes (gloo), and ZeRO-3
saving gathered safetensors. Rank 0 alone logs and writes the outputs; two processes × accumulation 1 match one
process × accumulation 2; the log-shaped warm-up LR under DeepSpeed is pinned.

The DeepSpeed configs are the repository's, minus the `optimizer` block (torch AdamW instead of DeepSpeed's, whose
first use JIT-compiles for ≈ 2 min); each engine still loads DeepSpeed's shared-memory comm op, JIT-built once into
`TORCH_EXTENSIONS_DIR` (≈ 1–4 min on a cold cache, cached by `.ci/run`).
"""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
from safetensors.torch import load_file

from orca8k.model.loading import load_causal_lm
from orca8k.training.checkpoints import COMPLETE_MARKER
from orca8k.training.schedule import warmup_factor
from tests.fixtures.common import REPO, run_cli
from tests.fixtures.train import as_cli_sets, tiny_train_overrides

pytestmark = pytest.mark.slow  # three DeepSpeed runs, ≈ 30–60 s each with a warm extensions cache

LR, WARMUP = 3e-3, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ds_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ds_configs")
    out = {}
    for stage in ("zero2", "zero3"):
        data = json.loads((REPO / "configs" / "deepspeed" / f"{stage}.json").read_text())
        data.pop("optimizer")
        out[stage] = folder / f"{stage}.json"
        out[stage].write_text(json.dumps(data))
    return out


def _run(root, inputs, store, ds_config, *, accum, env=None, **extra):
    root.mkdir()
    sets = tiny_train_overrides(root, inputs, store, **{
        "train.deepspeed": str(ds_config), "train.gradient_accumulation_steps": accum, "train.max_steps": 4,
        "train.eval_steps": 2, "train.warmup_steps": WARMUP, "train.warmup_shape": "log", "train.learning_rate": LR,
        **extra,
    })
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    return run_cli("train", "--params", str(REPO / "params.yaml"), *as_cli_sets(sets), cwd=root, env=env)


def _single_process_env():
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}


def _history(root, step):
    return json.loads((root / "artifacts" / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def zero2_one_process(tmp_path_factory, train_inputs, tracking_store, ds_configs):
    root = tmp_path_factory.mktemp("zero2") / "one"
    proc = _run(root, train_inputs, tracking_store, ds_configs["zero2"], accum=2, env=_single_process_env())
    return root, proc


def test_zero2_one_process_pins_the_log_warmup(zero2_one_process):
    root, proc = zero2_one_process
    assert "processes                1, fp32, ZeRO stage 2" in proc.stdout
    lrs = {h["step"]: h["learning_rate"] for h in _history(root, 4) if "learning_rate" in h}
    assert lrs[1] == lrs[2] == 0.0
    assert lrs[3] == pytest.approx(LR * math.log(2) / math.log(WARMUP))  # DeepSpeed WarmupLR, log shape
    assert lrs == {k: pytest.approx(LR * warmup_factor(k, WARMUP, "log")) for k in range(1, 5)}
    assert (root / "artifacts" / "checkpoints" / "checkpoint-4" / COMPLETE_MARKER).is_file()
    assert (root / "artifacts" / "checkpoints" / "checkpoint-4" / "global_step4").is_dir()  # DeepSpeed's own state


def test_two_processes_under_torchrun_match_one_process_with_doubled_accumulation(
    zero2_one_process, tmp_path, train_inputs, tracking_store, ds_configs
):
    one, _ = zero2_one_process
    two = tmp_path / "two"
    proc = _run(two, train_inputs, tracking_store, ds_configs["zero2"], accum=1,
                **{"train.launcher": "torchrun", "train.nproc_per_node": 2})
    out = proc.stdout
    assert "launching 2 processes" in out and "torch.distributed.run --nproc_per_node=2" in out
    assert "processes                2, fp32, ZeRO stage 2" in out
    # rank 0 alone logs: every training line once (the launcher's parent prints only its own summary)
    assert out.count("[train] parameters") == 1 and out.count("[train] step 1/4 loss") == 1
    assert out.count("built successfully") <= 1  # DeepSpeed's op-loading message from rank 0 only
    assert (two / "artifacts" / "checkpoints" / "checkpoint-4" / "global_step4" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()

    a = load_file(str(one / "artifacts" / "model" / "model.safetensors"))
    b = load_file(str(two / "artifacts" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    ma, mb = (json.loads((r / "metrics" / "train.json").read_text()) for r in (one, two))
    assert mb["eval_loss"] == pytest.approx(ma["eval_loss"], abs=1e-5)
    assert mb["tokens"] == ma["tokens"]  # tokens counted over both ranks
    # supervised tokens per source (the MLflow curves) are summed over both ranks too
    seen = [json.loads((r / "artifacts" / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())
            ["stateful_callbacks"]["SourceTokensSeen"]["attributes"]["seen"] for r in (one, two)]
    assert seen[0] == seen[1] and set(seen[0]) == {"orca-chat", "fanfics"} and all(v > 0 for v in seen[0].values())
    lrs_two = {h["step"]: h["learning_rate"] for h in _history(two, 4) if "learning_rate" in h}
    assert lrs_two == {h["step"]: h["learning_rate"] for h in _history(one, 4) if "learning_rate" in h}


def test_zero3_gathers_the_weights_into_safetensors(zero2_one_process, tmp_path, train_inputs, tracking_store, ds_configs):
    """Also: a plain `orca8k train` with a DeepSpeed config and no launcher sets the distributed environment itself."""
    one, _ = zero2_one_process
    root = tmp_path / "zero3"
    proc = _run(root, train_inputs, tracking_store, ds_configs["zero3"], accum=2)
    assert "ZeRO stage 3" in proc.stdout and "parameters               59,552" in proc.stdout
    model_dir = root / "artifacts" / "model"
    z3, z2 = load_file(str(model_dir / "model.safetensors")), load_file(str(one / "artifacts" / "model" / "model.safetensors"))
    assert z3.keys() == z2.keys() and all(z3[k].shape == z2[k].shape for k in z3)
    for k in z3:
        torch.testing.assert_close(z3[k], z2[k], rtol=1e-5, atol=1e-6, msg=k)
    model = load_causal_lm(model_dir)
    assert model.config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
