"""Resume after SIGKILL: the process kills itself through a test hook (an env var read by a callback, not a timer),
`orca8k train` is rerun, and the final weights are `torch.equal` to an uninterrupted run (CPU, one thread). A
checkpoint killed while being written is never used, and the same MLflow run is re-attached."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from orca8k.training.callbacks import KILL_AT_STEP_ENV, KILL_DURING_SAVE_ENV
from orca8k.training.checkpoints import COMPLETE_MARKER
from tests.fixtures.common import REPO, run_cli
from tests.fixtures.train import as_cli_sets, tiny_train_overrides

pytestmark = pytest.mark.slow  # four `orca8k train` processes (≈ 10 s each on 2 idle cores)

FIXED_THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _train(root, inputs, store, extra_env=None, check=True, **overrides):
    sets = {**tiny_train_overrides(root, inputs, store), **overrides}
    env = {**FIXED_THREADS, **(extra_env or {})}
    return run_cli("train", "--params", str(REPO / "params.yaml"), *as_cli_sets(sets), cwd=root, env=env, check=check)


def _weights(root):
    return load_file(str(root / "artifacts" / "model" / "model.safetensors"))


def test_killed_runs_resume_to_identical_weights(tmp_path, train_inputs, tracking_store):
    reference = tmp_path / "reference"
    reference.mkdir()
    _train(reference, train_inputs, tracking_store)

    root = tmp_path / "interrupted"
    root.mkdir()
    ckpts = root / "artifacts" / "checkpoints"
    # 1) killed while checkpoint-4 is being written: its files are there, its completion marker is not
    proc = _train(root, train_inputs, tracking_store, {KILL_DURING_SAVE_ENV: "4"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (ckpts / "checkpoint-4" / "model.safetensors").is_file()
    assert not (ckpts / "checkpoint-4" / COMPLETE_MARKER).exists()
    assert (ckpts / "checkpoint-2" / COMPLETE_MARKER).is_file()
    run_id = json.loads((ckpts / "mlflow_run.json").read_text())["run_id"]

    # 2) rerun: checkpoint-4 is discarded, training resumes from checkpoint-2; killed again right after step 5
    proc = _train(root, train_inputs, tracking_store, {KILL_AT_STEP_ENV: "5"}, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "removed checkpoint-4: interrupted while being written" in proc.stdout
    assert "resuming from checkpoint-2" in proc.stdout and "resumed from step 2" in proc.stdout
    assert (ckpts / "checkpoint-4" / COMPLETE_MARKER).is_file() and not (ckpts / "checkpoint-6").exists()

    # 3) rerun: resumes from checkpoint-4 and finishes
    proc = _train(root, train_inputs, tracking_store)
    assert "resuming from checkpoint-4" in proc.stdout
    metrics = json.loads((root / "metrics" / "train.json").read_text())
    assert metrics["global_step"] == 6 and metrics["resumed_from_step"] == 4
    assert json.loads((root / "metrics" / "mlflow_run.json").read_text())["run_id"] == run_id

    expected, got = _weights(reference), _weights(root)
    assert expected.keys() == got.keys()
    different = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert different == [], f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    ref_metrics = json.loads((reference / "metrics" / "train.json").read_text())
    assert metrics["eval_loss"] == ref_metrics["eval_loss"] and metrics["tokens"] == ref_metrics["tokens"]
    # the per-source curves count on across the resumes: they end where the uninterrupted run's end
    import mlflow

    c = mlflow.MlflowClient(tracking_uri=tracking_store["uri"])
    ref_id = json.loads((reference / "metrics" / "mlflow_run.json").read_text())["run_id"]
    for source in ("orca-chat", "fanfics"):
        key = f"supervised_tokens_seen/{source}"

        def final(rid, key=key):
            return max((m.step, m.timestamp, m.value) for m in c.get_metric_history(rid, key))[::2]

        assert final(run_id) == final(ref_id) and final(run_id)[0] == 6


def test_a_finished_run_rerun_trains_no_further_step(tmp_path, train_inputs, tracking_store):
    """Rerunning a finished run (same inputs: `dvc repro -f`, or a crash after the last checkpoint) resumes from the
    checkpoint at `max_steps` and must not train on: transformers' loop runs one more optimizer step when that
    checkpoint falls mid-epoch (4 of the fixture's 6 steps per epoch). The weights stay the finished run's, bit for
    bit, and the metrics say step 4."""
    root = tmp_path / "run"
    root.mkdir()
    _train(root, train_inputs, tracking_store, **{"train.max_steps": 4})
    finished = _weights(root)
    first = json.loads((root / "metrics" / "train.json").read_text())
    assert first["global_step"] == 4 and 0 < first["epoch"] < 1  # mid-epoch: where the extra step came from

    proc = _train(root, train_inputs, tracking_store, **{"train.max_steps": 4})
    assert "resuming from checkpoint-4" in proc.stdout
    metrics = json.loads((root / "metrics" / "train.json").read_text())
    assert metrics["global_step"] == 4 and metrics["resumed_from_step"] == 4 and metrics["tokens_this_run"] == 0
    assert metrics["eval_loss"] == first["eval_loss"] and metrics["train_loss"] == first["train_loss"]
    # no step this call: no average over it (the Trainer's would be 0), in train.json and in the MLflow run
    assert metrics["train_loss_mean"] is None and metrics["tokens_per_second"] is None
    assert first["train_loss_mean"] > 0 and first["tokens_per_second"] > 0
    import mlflow

    run_id = json.loads((root / "metrics" / "mlflow_run.json").read_text())["run_id"]
    history = mlflow.MlflowClient(tracking_uri=tracking_store["uri"]).get_metric_history(run_id, "train_loss")
    assert history and all(m.value > 0 for m in history)
    assert not (root / "artifacts" / "checkpoints" / "checkpoint-5").exists()
    again = _weights(root)
    assert [k for k in finished if not torch.equal(finished[k], again[k])] == []
