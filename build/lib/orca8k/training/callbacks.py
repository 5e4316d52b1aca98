"""Trainer callbacks: the run guard (non-finite loss, repeated skipped steps, wall-clock budget), checkpoint
completion markers + rotation, the facts printed before step 0, and the test hooks that kill the process.

Test hooks (read from the environment when the callbacks are built; never set them outside tests):
    ORCA8K_TEST_KILL_AT_STEP=k              SIGKILL right after optimiser step k (before step k's checkpoint).
    ORCA8K_TEST_KILL_DURING_SAVE_AT_STEP=k  SIGKILL while checkpoint-k is being saved (files written, no marker).
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from orca8k.errors import TrainingError
from orca8k.training import checkpoints as ckpt
from orca8k.training.distributed import any_rank, barrier, is_main

if TYPE_CHECKING:
    from orca8k.training.trainer import Orca8kTrainer

# fp16 loss scaling skips a step on overflow and halves the scale; a fresh run from 2^16 typically skips a handful.
# This many skips in a row means the scale cannot find a finite gradient: the run is diverging.
MAX_CONSECUTIVE_SKIPPED_STEPS = 20
KILL_AT_STEP_ENV = "ORCA8K_TEST_KILL_AT_STEP"
KILL_DURING_SAVE_ENV = "ORCA8K_TEST_KILL_DURING_SAVE_AT_STEP"


def _env_step(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def _kill_self(reason: str) -> None:
    print(f"[train] test hook: SIGKILL ({reason})", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class GuardCallback(TrainerCallback):
    """Stops the run on a non-finite loss or on `max_skipped` consecutive skipped optimiser steps (raising
    `TrainingError` that names the step, before that step is checkpointed), and stops it cleanly, saving a
    checkpoint, once `max_seconds` of wall-clock have passed since training began (rank 0's clock decides, so all
    ranks stop at the same step).

    Args:
        trainer: the trainer (for the non-finite record and whether the optimiser step was skipped).
        max_seconds: wall-clock budget of this process's training loop, or None.
        max_skipped: consecutive skipped optimiser steps tolerated.
    """

    def __init__(self, trainer: Orca8kTrainer, max_seconds: float | None, max_skipped: int = MAX_CONSECUTIVE_SKIPPED_STEPS):
        self.trainer = trainer
        self.max_seconds = max_seconds
        self.max_skipped = max_skipped
        self.start: float | None = None
        self.skipped_run: list[int] = []
        self.stopped_by_budget_at: int | None = None
        self.kill_at = _env_step(KILL_AT_STEP_ENV)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.kill_at is not None and step == self.kill_at:
            _kill_self(f"{KILL_AT_STEP_ENV}={step}")
        loss = self.trainer.nonfinite_loss
        self.trainer.nonfinite_loss = None
        elapsed = time.monotonic() - (self.start or time.monotonic())
        over_budget = is_main() and self.max_seconds is not None and elapsed >= self.max_seconds
        nonfinite, over_budget = any_rank(loss is not None, over_budget, device=str(args.device))
        if nonfinite:
            shown = f"{loss}" if loss is not None else "on another rank"
            raise TrainingError(
                f"non-finite loss ({shown}) at optimiser step {step}: stopping before step {step} is saved "
                f"(resume would restart from the last checkpoint; lower train.learning_rate or check the data)"
            )
        if self.trainer.accelerator.optimizer_step_was_skipped:
            self.skipped_run.append(step)
            if len(self.skipped_run) >= self.max_skipped:
                raise TrainingError(
                    f"{len(self.skipped_run)} consecutive optimiser steps skipped (steps {self.skipped_run[0]}–{step}): "
                    "the gradients overflow at every loss scale; stopping at step "
                    f"{step} (use bf16, or lower train.learning_rate)"
                )
        else:
            self.skipped_run = []
        if over_budget and not control.should_training_stop:
            control.should_training_stop = True
            control.should_save = True
            self.stopped_by_budget_at = step
            if is_main():
                print(
                    f"[train] stopping at step {step}/{state.max_steps}: train.max_seconds={self.max_seconds:g} "
                    f"reached after {elapsed:.1f} s; saving checkpoint-{step} (rerun to continue from it)",
                    flush=True,
                )
        return control


class CheckpointCallback(TrainerCallback):
    """After the Trainer saved `checkpoint-N` on every rank: mark it complete (rank 0, write-then-rename), then
    rotate to `limit` complete checkpoints, keeping the newest and the best.

    Args:
        limit: `train.save_total_limit`.
        info: extra fields for the marker (the run's fingerprint).
    """

    def __init__(self, limit: int, info: dict[str, Any]):
        self.limit = limit
        self.info = info
        self.kill_during_save_at = _env_step(KILL_DURING_SAVE_ENV)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir)
        path = folder / f"checkpoint-{state.global_step}"
        barrier()  # every rank has written its part (DeepSpeed writes one optimiser shard per rank)
        if is_main():
            if self.kill_during_save_at is not None and state.global_step == self.kill_during_save_at:
                _kill_self(f"{KILL_DURING_SAVE_ENV}={state.global_step}")
            ckpt.write_marker(path, self.info)
            best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
            for gone in ckpt.rotate(folder, self.limit, best):
                print(f"[train] removed {gone.name} (train.save_total_limit={self.limit})", flush=True)
        barrier()
        return control


class FactsCallback(TrainerCallback):
    """Prints the derived facts once, when training begins (rank 0): the Trainer knows `max_steps` only then.

    Args:
        facts: called with the Trainer state; returns the printable lines.
    """

    def __init__(self, facts: Callable[[Any], list[str]]):
        self.facts = facts
        self.printed: list[str] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if is_main():
            self.printed = self.facts(state)
            for line in self.printed:
                print(f"[train] {line}", flush=True)


class LogPrinterCallback(TrainerCallback):
    """One compact line per log event on rank 0 (`step 40/300 loss 3.1412 lr 5e-04 ...`), replacing tqdm."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not is_main() or not logs:
            return
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key, value in logs.items():
            if isinstance(value, float):
                shown = f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"
                if math.isnan(value) or math.isinf(value):
                    shown = str(value)
                parts.append(f"{key} {shown}")
            elif isinstance(value, int):
                parts.append(f"{key} {value}")
        print("[train] " + " ".join(parts), flush=True)
