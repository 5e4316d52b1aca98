"""Learning-rate schedules with an explicit warm-up shape, identical with and without DeepSpeed.

The seed ran DeepSpeed's `WarmupLR` (zero_config_pretrain.json), whose default warm-up is **log-shaped**. Its exact
behaviour (deepspeed/runtime/lr_schedules.py, 0.19.8), in optimiser steps k = 1, 2, ... and W = max(2, warm-up steps):

    k = 1:            warmup_min_lr (the scheduler has not stepped yet)
    k ≥ 2, i = k − 2: min + (max − min) · γ(i),  γ(i) = log(i + 1) / log(W)  (log)   or  i / W  (linear),  for i < W
                      max                                                                                 for i ≥ W

so the first two steps run at `warmup_min_lr` (0 under HF's "auto"), and the full rate is reached at step W + 1 (log)
or W + 2 (linear). Without DeepSpeed (or with a DeepSpeed config that has no `scheduler` block) this module builds a
`LambdaLR` giving the same rate at every step, so `train.warmup_shape` means one thing whatever runs the optimiser;
after the warm-up, `train.lr_scheduler_type` decides: `constant_with_warmup` (the seed) stays at the peak,
`linear` / `cosine` decay towards 0 at the end of the run as in transformers' schedules, `constant` has no warm-up.
`warmup_steps: 0` means no warm-up here; DeepSpeed's `WarmupLR` cannot do that (it warms up at least 2 steps), so
`orca8k.training.arguments` refuses that combination instead of letting the two disagree.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

WARMUP_SHAPES = ("linear", "log")
SCHEDULER_TYPES = ("constant_with_warmup", "linear", "cosine", "constant")


def warmup_factor(step: int, warmup_steps: int, shape: str) -> float:
    """Multiplier of the peak LR at optimiser step `step` (1-based) during DeepSpeed-`WarmupLR`-style warm-up.

    Args:
        step: optimiser step, 1 for the first update.
        warmup_steps: the configured warm-up length W (DeepSpeed clamps it to at least 2).
        shape: "log" (DeepSpeed's default, the seed) or "linear".

    Returns:
        γ in [0, 1]; 1.0 once the warm-up is over.

    Raises:
        ValueError: unknown shape or `step` < 1.
    """
    if shape not in WARMUP_SHAPES:
        raise ValueError(f"warm-up shape {shape!r}: use one of {WARMUP_SHAPES}")
    if step < 1:
        raise ValueError(f"optimiser steps count from 1, got {step}")
    w = max(2, warmup_steps)
    if step == 1:
        return 0.0
    i = step - 2
    if i >= w:
        return 1.0
    return math.log(i + 1) / math.log(w) if shape == "log" else i / w


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, shape: str, scheduler_type: str) -> float:
    """Multiplier of the peak LR at optimiser step `step` (1-based): warm-up (`warmup_factor`), then the decay.

    Args:
        step: optimiser step, 1 for the first update.
        warmup_steps: warm-up length; ignored by `constant`.
        total_steps: the run's optimiser steps (linear/cosine reach 0 there).
        shape: warm-up shape, "log" or "linear".
        scheduler_type: constant_with_warmup | linear | cosine | constant.

    Raises:
        ValueError: unknown scheduler type or shape.
    """
    if scheduler_type not in SCHEDULER_TYPES:
        raise ValueError(f"lr_scheduler_type {scheduler_type!r}: use one of {SCHEDULER_TYPES}")
    if scheduler_type == "constant":
        return 1.0
    # first step at the full rate: γ(W − 1) = 1 for log, γ(W) = 1 for linear
    end_of_warmup = max(2, warmup_steps) + 1 if shape == "log" else max(2, warmup_steps) + 2
    if warmup_steps > 0 and step < end_of_warmup:
        return warmup_factor(step, warmup_steps, shape)
    if scheduler_type == "constant_with_warmup":
        return 1.0
    start = end_of_warmup if warmup_steps > 0 else 1
    progress = min(1.0, max(0.0, (step - start) / max(1, total_steps - start + 1)))
    if scheduler_type == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, shape: str, scheduler_type: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` whose rate at optimiser step k is peak × `lr_factor(k, ...)`.

    `LambdaLR` applies `lambda(n)` after its n-th `step()` call; the Trainer calls `step()` once after each optimiser
    step, so the rate used by step k is `lambda(k - 1)`.
    """
    from torch.optim.lr_scheduler import LambdaLR

    lr_factor(1, warmup_steps=warmup_steps, total_steps=total_steps, shape=shape, scheduler_type=scheduler_type)  # validates

    def fn(n: int) -> float:
        return lr_factor(n + 1, warmup_steps=warmup_steps, total_steps=total_steps, shape=shape, scheduler_type=scheduler_type)

    return LambdaLR(optimizer, fn)
