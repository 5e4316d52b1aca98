"""Stage `train`: full fine-tuning with linear RoPE scaling (HF Trainer, optionally DeepSpeed), resumable.

Reads `layout.tokenized_train` / `layout.tokenized_val` / `layout.tokenizer` (stage tokenize) and the base model
(`orca8k.model.base.resolve_base`). Writes `layout.model` (safetensors + the OA tokenizer + a config with
`rope_parameters` linear × factor and `max_position_embeddings` = the native context), `layout.checkpoints`,
`layout.train_metrics` (DVC metrics) and `layout.train_run` (the MLflow run, via `orca8k.tracking`).

When several processes are asked for, the stage relaunches itself under torchrun or the deepspeed launcher
(`orca8k.training.launch`). Before step 0 it checks the setup and prints the derived facts
(`orca8k.training.setup`); it evaluates each source every `eval_steps`, saves every `save_steps`, stops on a
non-finite loss or repeated skipped steps (naming the step) and at `train.max_seconds` (saving). Rerunning after
an interruption resumes from the last complete checkpoint (weights, optimiser, scheduler, RNG, data position) and
re-attaches the same MLflow run; a rerun with other params or inputs starts fresh.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca8k.layout import Layout
from orca8k.stages import StageResult
from orca8k.training import launch
from orca8k.training.distributed import barrier, is_main, launched

if TYPE_CHECKING:
    from orca8k.config import Config

SUMMARY_KEYS = ("global_step", "train_loss", "eval_loss", "tokens", "tokens_per_second", "stopped_by_max_seconds")


def run(cfg: Config) -> StageResult:
    """Fine-tune the base with RoPE scaling; see the module docstring.

    Returns:
        `StageResult` with outputs model, checkpoints, train_metrics, train_run and a summary (steps, losses,
        tokens/s). On ranks other than 0 the outputs are empty (they write nothing).

    Raises:
        StageInputMissing: tokenized data, its token validation result, tokenizer or base missing.
        ValidationFailed: the token validation result of `orca8k tokenize` is not a success.
        ConfigError: a DeepSpeed config that contradicts params, or launcher settings that cannot work.
        TrainingError: a dtype mismatch before step 0; a non-finite loss or repeated skipped steps (naming the
            step); a launched process that failed.
    """
    layout = Layout.from_config(cfg)
    outputs = {"model": layout.model, "checkpoints": layout.checkpoints, "train_metrics": layout.train_metrics,
               "train_run": layout.train_run}
    if launch.needs_relaunch(cfg):
        cmd = launch.relaunch(cfg, layout.launch_params)
        metrics = json.loads(layout.train_metrics.read_text())
        return StageResult("train", outputs, {"launcher": cfg.train.launcher, "command": " ".join(cmd[:4]) + " ...",
                                              **{k: metrics.get(k) for k in SUMMARY_KEYS}})
    if launched() and not is_main():
        # ranks > 0 write no logs: their stdout (DeepSpeed's and HF's prints included) goes nowhere; errors still
        # reach stderr
        sys.stdout.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    metrics = train(cfg, layout)
    if not is_main():
        return StageResult("train", {}, {})
    return StageResult("train", outputs, {k: metrics.get(k) for k in SUMMARY_KEYS})


def _atomic_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _last(log_history: list[dict[str, Any]], key: str, step: int | None = None) -> dict[str, Any] | None:
    for entry in reversed(log_history):
        if key in entry and (step is None or entry.get("step") == step):
            return entry
    return None


def train(cfg: Config, layout: Layout) -> dict[str, Any]:
    """Build, train, evaluate, save; write `layout.train_metrics` (rank 0). Returns the metrics."""
    from orca8k import tracking
    from orca8k.training.setup import build_trainer, save_final_model

    setup = build_trainer(cfg, layout)
    trainer, resume = setup.trainer, setup.resume
    tokens_before = 0
    if resume is not None:
        tokens_before = int(json.loads((resume / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0))
    with tracking.train_run(cfg, layout, resume=resume is not None) as run:
        trainer.add_callback(tracking.MlflowCurvesCallback(run, extra_metrics=trainer.source_tokens.metrics))
        output = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        train_seconds = float(output.metrics["train_runtime"])  # the training loop, evals included, setup not
        state = trainer.state
        final_eval = _last(state.log_history, "eval_loss", state.global_step) or trainer.evaluate()
        save_final_model(trainer, layout.model)
        train_entry = _last(state.log_history, "loss")
        tokens = int(state.num_input_tokens_seen)
        # a finished run rerun (resumed at max_steps) trains no step: the Trainer's averages over it are 0, not values
        trained = state.global_step > (setup.resumed_from or 0)
        metrics = {
            "global_step": state.global_step,
            "max_steps": state.max_steps,
            "epoch": round(float(state.epoch or 0.0), 4),
            "train_loss": float(train_entry["loss"]) if train_entry else None,
            "train_loss_mean": round(float(output.training_loss), 6) if trained else None,
            "eval_loss": final_eval["eval_loss"],
            "eval": {name: {"eval_loss": final_eval[f"eval_{name}_loss"],
                            "supervised_tokens": int(final_eval[f"eval_{name}_supervised_tokens"])}
                     for name in setup.eval_names},
            "tokens": tokens,
            "tokens_this_run": tokens - tokens_before,
            "train_seconds": round(train_seconds, 2),
            "tokens_per_second": (round((tokens - tokens_before) / train_seconds, 1) if trained and train_seconds > 0
                                  else None),
            "stopped_by_max_seconds": setup.guard.stopped_by_budget_at is not None,
            "resumed_from_step": setup.resumed_from or 0,
            "parameters": setup.facts.get("parameters"),
            "supervised_token_share": setup.facts.get("supervised_token_share"),
        }
        if is_main():
            _atomic_json(layout.train_metrics, metrics)
            run.log_metrics({k: v for k, v in metrics.items() if k != "eval"}, step=state.global_step)
            run.log_artifact(layout.train_metrics)
    barrier()
    return metrics
