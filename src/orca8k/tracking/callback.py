"""The Trainer callback that logs training curves into the orca8k run (imports transformers: load it lazily)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from transformers import TrainerCallback

from orca8k.tracking.runs import RunHandle


class MlflowCurvesCallback(TrainerCallback):
    """Log the Trainer's curves to an orca8k run at `state.global_step`.

    Every numeric value of each log event is logged under its HF name (`loss`, `learning_rate`, `grad_norm`,
    `eval_loss`, `eval_<group>_loss`, ...), plus `tokens_per_second` (the change of `state.num_input_tokens_seen`
    between two log events over the wall-clock time between them: set `include_num_input_tokens_seen=True`) and
    whatever `extra_metrics()` returns at that moment, e.g. `{"supervised_tokens_seen/orca-chat": 123456}`.
    Only the world process zero logs, and a `NullRun` makes the callback a no-op. The Trainer's end-of-training
    summary (`train_runtime`, `train_loss`, ...) is not logged when the call trained no step (a finished run rerun):
    its averages over zero steps are 0, not this run's values.

    Args:
        run: the handle from `orca8k.tracking.train_run`.
        extra_metrics: optional callable returning more metrics to log with each log event.
    """

    def __init__(self, run: RunHandle, extra_metrics: Callable[[], Mapping[str, float]] | None = None):
        self.run = run
        self.extra_metrics = extra_metrics
        self._last: tuple[float, int] | None = None  # (perf_counter seconds, tokens seen) at the previous log
        self._start_step: int | None = None  # global step when this `train()` call began

    def on_train_begin(self, args, state, control, **kwargs):
        self._start_step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not self.run.active:
            return
        if "train_runtime" in (logs or {}) and state.global_step == self._start_step:
            return  # the summary of a call that trained no step
        metrics = {k: v for k, v in (logs or {}).items() if isinstance(v, int | float) and not isinstance(v, bool)}
        seen = getattr(state, "num_input_tokens_seen", None)
        now = time.perf_counter()
        if seen:
            if self._last is not None and now > self._last[0] and seen > self._last[1]:  # eval logs add no tokens
                metrics["tokens_per_second"] = (seen - self._last[1]) / (now - self._last[0])
            self._last = (now, int(seen))
        if self.extra_metrics is not None:
            metrics.update(self.extra_metrics())
        if metrics:
            self.run.log_metrics(metrics, step=state.global_step)
