"""`TrainingArguments` from `cfg.train` (HF names), the DeepSpeed config, and the precision checks run before step 0.

Everything here is decided before any weight moves: a DeepSpeed config that disagrees with params, or a model dtype
that disagrees with the Trainer's mixed-precision flags, stops the run with a `ConfigError`/`TrainingError` naming
both sides, instead of failing (or silently training in another precision) later.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca8k.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    import torch
    from transformers import TrainingArguments

    from orca8k.config import Config, TrainConfig
    from orca8k.layout import Layout

# The metric that picks the "best" checkpoint (kept by the rotation): the supervised-token-weighted eval loss over
# all sources, computed by `orca8k.training.trainer.Orca8kTrainer.evaluate`.
BEST_METRIC = "eval_loss"


def trainer_precision(train: TrainConfig) -> str:
    """"fp16" | "bf16" | "fp32": the Trainer's mixed-precision mode from `train.fp16` / `train.bf16`."""
    return "fp16" if train.fp16 else "bf16" if train.bf16 else "fp32"


def load_deepspeed_config(cfg: Config) -> dict[str, Any] | None:
    """Read `train.deepspeed` (a JSON path, relative to the working directory) and align it with params.

    The file keeps DeepSpeed's `"auto"` values (HF fills them from `TrainingArguments`). What params decide and the
    file may not contradict: the warm-up shape (`scheduler.params.warmup_type` is set from `train.warmup_shape`
    when absent), the scheduler type, the precision (checked in `check_precision`).

    Returns:
        The config as a dict (a copy; the file is not modified), or None when `train.deepspeed` is null.

    Raises:
        ConfigError: the file is missing or not JSON; `train_batch_size: "auto"` with several processes (DeepSpeed
            asserts on it); a `scheduler` block other than WarmupLR, or WarmupLR with `lr_scheduler_type` other than
            constant_with_warmup; a `warmup_type` that differs from `train.warmup_shape`; `warmup_steps: 0` with
            WarmupLR (it always warms up ≥ 2 steps).
    """
    t = cfg.train
    if not t.deepspeed:
        return None
    path = Path(t.deepspeed)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed={t.deepspeed}: file not found from {Path.cwd()}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.deepspeed={t.deepspeed}: not JSON ({err})") from None
    if data.get("train_batch_size") == "auto" and t.world_size > 1:
        raise ConfigError(
            f"{path}: train_batch_size 'auto' fails DeepSpeed's batch assertion with {t.world_size} processes; remove "
            "the key (DeepSpeed derives it from train_micro_batch_size_per_gpu × gradient_accumulation_steps × world)"
        )
    scheduler = data.get("scheduler")
    if scheduler is not None:
        kind = scheduler.get("type")
        if kind != "WarmupLR":
            raise ConfigError(f"{path}: scheduler type {kind!r} is not supported; use WarmupLR or drop the block")
        if t.lr_scheduler_type != "constant_with_warmup":
            raise ConfigError(
                f"{path}: WarmupLR is warm-up then constant, but train.lr_scheduler_type={t.lr_scheduler_type}; "
                "drop the scheduler block to use params' schedule"
            )
        params = scheduler.setdefault("params", {})
        file_shape = params.get("warmup_type")
        if file_shape is not None and file_shape != t.warmup_shape:
            raise ConfigError(
                f"{path}: scheduler.params.warmup_type={file_shape!r} but train.warmup_shape={t.warmup_shape!r}; "
                "params decide the shape: remove warmup_type from the file"
            )
        params["warmup_type"] = t.warmup_shape
        if t.warmup_steps == 0:
            raise ConfigError(
                f"{path}: DeepSpeed's WarmupLR warms up at least 2 steps; train.warmup_steps=0 would mean something "
                "else without DeepSpeed. Set train.warmup_steps ≥ 1 or drop the scheduler block"
            )
    return data


def model_load_dtype(train: TrainConfig, ds_config: dict[str, Any] | None) -> str:
    """The dtype to load the weights in: fp32 (the Trainer's AMP keeps fp32 weights); under DeepSpeed with fp16/bf16
    the half dtype (DeepSpeed keeps fp32 master weights in the optimiser, so fp32 copies of a 13B model on every
    rank's CPU are not needed)."""
    precision = trainer_precision(train)
    return precision if ds_config is not None and precision != "fp32" else "fp32"


def check_precision(model_dtype: torch.dtype, train: TrainConfig, ds_config: dict[str, Any] | None, device_type: str) -> None:
    """Reject dtype mismatches between the model, the Trainer's flags and the DeepSpeed config, before step 0.

    Rules: the DeepSpeed config's `fp16.enabled` / `bf16.enabled`, when not "auto", must equal `train.fp16` /
    `train.bf16`. Without DeepSpeed the model must be fp32 (torch AMP casts per op and keeps fp32 weights; fp16
    weights break its gradient unscaling, bf16 weights would train without fp32 master weights). With DeepSpeed it
    may be fp32 or the Trainer's half dtype. fp16 needs CUDA.

    Args:
        model_dtype: dtype of the loaded model's parameters.
        train: `cfg.train`.
        ds_config: the DeepSpeed config dict, or None.
        device_type: "cuda" | "cpu" | ... (where training runs).

    Raises:
        TrainingError: listing every mismatch.
    """
    import torch

    precision = trainer_precision(train)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[precision]
    problems = []
    if ds_config is not None:
        for key in ("fp16", "bf16"):
            enabled = (ds_config.get(key) or {}).get("enabled", "auto")
            if isinstance(enabled, bool) and enabled != getattr(train, key):
                problems.append(f"DeepSpeed config {key}.enabled={enabled} but train.{key}={getattr(train, key)}")
        allowed = {torch.float32} | ({half} if half is not None else set())
    else:
        allowed = {torch.float32}
    if model_dtype not in allowed:
        where = "with DeepSpeed" if ds_config is not None else "without DeepSpeed (torch AMP keeps fp32 weights)"
        problems.append(
            f"model weights are {model_dtype} but train.fp16={train.fp16}, train.bf16={train.bf16} {where} allow "
            f"{sorted(str(d) for d in allowed)}"
        )
    if train.fp16 and device_type != "cuda":
        problems.append(f"train.fp16 needs a CUDA GPU (device: {device_type}); on CPU train in fp32")
    if problems:
        raise TrainingError("precision mismatch before step 0:\n  " + "\n  ".join(problems))


def training_arguments(cfg: Config, layout: Layout, ds_config: dict[str, Any] | None) -> TrainingArguments:
    """`TrainingArguments` from `cfg.train` under their HF names, plus the settings this project fixes.

    Fixed here: `seed` = `data_seed` = `cfg.seed`; steps-based eval/save/logging; `save_total_limit` is applied by
    `orca8k.training.checkpoints` (HF's own rotation deletes the last checkpoint when the limit is 1 and the best is older); the best checkpoint by `eval_loss`;
    gradient checkpointing without re-entrant autograd; loss normalised over the supervised tokens of the whole
    accumulated batch and all ranks (`average_tokens_across_devices`); no reporting integrations (MLflow goes
    through `orca8k.tracking`); logs on the main process only.
    """
    import torch
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=str(layout.checkpoints),
        seed=cfg.seed,
        data_seed=cfg.seed,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,  # the schedule itself: orca8k.training.schedule
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_epsilon=t.adam_epsilon,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,
        metric_for_best_model=BEST_METRIC,
        greater_is_better=False,
        load_best_model_at_end=False,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,
        # train.gradient_checkpointing is the seed's (and HF 4's) name; transformers 5 calls it activation_checkpointing
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        torch_compile=t.torch_compile,
        fp16=t.fp16,
        bf16=t.bf16,
        deepspeed=ds_config,
        dataloader_num_workers=t.dataloader_num_workers,
        average_tokens_across_devices=True,
        include_num_input_tokens_seen="no",  # counted by Orca8kTrainer (pad = eos: HF's count would drop </s>)
        remove_unused_columns=False,  # the collator reads what it needs; `source`/`sources` feed the per-source curves
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        disable_tqdm=True,
        log_level="warning",
        log_level_replica="error",
        log_on_each_node=False,
        ddp_find_unused_parameters=False,
        use_cache=False,
    )
