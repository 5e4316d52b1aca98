"""Checkpoint bookkeeping: completion markers, interrupted checkpoints never used, rotation keeping the best and the
last, and a changed configuration starting fresh."""

from __future__ import annotations

import json

from orca8k.config import load_config
from orca8k.layout import Layout
from orca8k.training import checkpoints as ckpt
from tests.fixtures.common import REPO


def _make(folder, step, complete=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x" * step)
    if complete:
        ckpt.write_marker(path, {"fingerprint": "f"})
    return path


def test_marker_is_written_atomically_and_read_back(tmp_path):
    path = _make(tmp_path, 7)
    marker = json.loads((path / ckpt.COMPLETE_MARKER).read_text())
    assert marker["step"] == 7 and marker["fingerprint"] == "f"
    assert not list(path.glob("*.tmp"))
    assert ckpt.is_complete(path)


def test_an_interrupted_checkpoint_is_never_resumed_from(tmp_path):
    _make(tmp_path, 2)
    _make(tmp_path, 10)
    _make(tmp_path, 12, complete=False)  # killed while being written: newest, but no marker
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10", "checkpoint-12"]
    assert ckpt.last_complete_checkpoint(tmp_path).name == "checkpoint-10"
    assert [p.name for p in ckpt.remove_incomplete(tmp_path)] == ["checkpoint-12"]
    assert not (tmp_path / "checkpoint-12").exists()


def test_rotation_keeps_the_limit_the_newest_and_the_best(tmp_path):
    for step in (2, 4, 6, 8):
        _make(tmp_path, step)
    _make(tmp_path, 10, complete=False)  # being written: neither counted nor deleted
    deleted = ckpt.rotate(tmp_path, limit=1, best=tmp_path / "checkpoint-4")
    assert [p.name for p in deleted] == ["checkpoint-2", "checkpoint-6"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-8", "checkpoint-10"]
    # limit 2 with the best being the newest: plain "keep the last 2"
    _make(tmp_path, 12)
    assert [p.name for p in ckpt.rotate(tmp_path, limit=2, best=tmp_path / "checkpoint-12")] == ["checkpoint-4"]
    assert ckpt.rotate(tmp_path, limit=5, best=None) == []


def test_a_changed_configuration_starts_fresh_and_the_same_one_resumes(tmp_path):
    folder, run_file = tmp_path / "checkpoints", tmp_path / "checkpoints" / "mlflow_run.json"
    resume, notes = ckpt.prepare_checkpoints(folder, "aaaa", run_file)
    assert resume is None and notes == []
    _make(folder, 2)
    _make(folder, 4)
    _make(folder, 6, complete=False)
    run_file.write_text('{"run_id": "r1"}')
    resume, notes = ckpt.prepare_checkpoints(folder, "aaaa", run_file)
    assert resume.name == "checkpoint-4" and run_file.is_file()
    assert notes == [f"removed checkpoint-6: interrupted while being written (no {ckpt.COMPLETE_MARKER})",
                     "resuming from checkpoint-4"]
    resume, notes = ckpt.prepare_checkpoints(folder, "bbbb", run_file)
    assert resume is None and ckpt.list_checkpoints(folder) == [] and not run_file.exists()
    assert "another configuration" in notes[0]
    assert json.loads((folder / ckpt.FINGERPRINT_FILE).read_text()) == {"fingerprint": "bbbb"}


def test_fingerprint_follows_what_changes_the_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"hidden_size": 8}')

    def fp(*sets):
        cfg = load_config(REPO / "params.yaml", [f"paths.root={tmp_path}", *sets])
        return ckpt.training_fingerprint(cfg, Layout.from_config(cfg), base)

    ref = fp()
    assert fp("train.max_seconds=10", "train.save_steps=7", "train.logging_steps=3") == ref  # bookkeeping only
    assert fp("train.learning_rate=1e-4") != ref
    assert fp("seed=1") != ref
    assert fp("tokenize.max_length=256") != ref
    (base / "config.json").write_text('{"hidden_size": 16}')
    assert fp() != ref


# ----------------------------------------------------------------------------------------------- the run guard
def _guard(max_seconds=None, max_skipped=3):
    from types import SimpleNamespace

    from orca8k.training.callbacks import GuardCallback

    trainer = SimpleNamespace(nonfinite_loss=None, accelerator=SimpleNamespace(optimizer_step_was_skipped=False))
    guard = GuardCallback(trainer, max_seconds=max_seconds, max_skipped=max_skipped)
    args = SimpleNamespace(device="cpu")
    return guard, trainer, args


def _state(step):
    from types import SimpleNamespace

    return SimpleNamespace(global_step=step, max_steps=100)


def test_repeated_skipped_steps_stop_the_run_naming_the_steps():
    import pytest
    from transformers import TrainerControl

    from orca8k.errors import TrainingError

    guard, trainer, args = _guard(max_skipped=3)
    guard.on_train_begin(args, _state(0), TrainerControl())
    trainer.accelerator.optimizer_step_was_skipped = True
    guard.on_step_end(args, _state(1), TrainerControl())
    guard.on_step_end(args, _state(2), TrainerControl())
    trainer.accelerator.optimizer_step_was_skipped = False  # a good step resets the count
    guard.on_step_end(args, _state(3), TrainerControl())
    trainer.accelerator.optimizer_step_was_skipped = True
    guard.on_step_end(args, _state(4), TrainerControl())
    guard.on_step_end(args, _state(5), TrainerControl())
    with pytest.raises(TrainingError, match="3 consecutive optimiser steps skipped \\(steps 4–6\\)"):
        guard.on_step_end(args, _state(6), TrainerControl())


def test_non_finite_loss_and_budget_in_the_guard():
    import pytest
    from transformers import TrainerControl

    from orca8k.errors import TrainingError

    guard, trainer, args = _guard()
    guard.on_train_begin(args, _state(0), TrainerControl())
    trainer.nonfinite_loss = float("inf")
    with pytest.raises(TrainingError, match=r"non-finite loss \(inf\) at optimiser step 7"):
        guard.on_step_end(args, _state(7), TrainerControl())

    guard, trainer, args = _guard(max_seconds=3600)
    guard.on_train_begin(args, _state(0), TrainerControl())
    control = guard.on_step_end(args, _state(1), TrainerControl())
    assert not control.should_training_stop and guard.stopped_by_budget_at is None
    guard.max_seconds = 1e-9
    control = guard.on_step_end(args, _state(2), TrainerControl())
    assert control.should_training_stop and control.should_save and guard.stopped_by_budget_at == 2
