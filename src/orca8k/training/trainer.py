"""`Orca8kTrainer`: HF `Trainer` with three changes, each small and tested.

1. The LR schedule comes from `orca8k.training.schedule` (explicit warm-up shape, the same rate with or without
   DeepSpeed). With a DeepSpeed `scheduler` block, DeepSpeed's own `WarmupLR` runs instead (same formula).
2. A non-finite loss is recorded per micro-batch (`GuardCallback` stops the run naming the step), and the real
   (non-padding) tokens trained are counted into `state.num_input_tokens_seen` for packed rows too (HF's own
   "non_padding" count compares ids with the pad id, which is also `</s>`, a real token here).
3. `evaluate` computes each eval set's loss exactly per supervised token (sum of target log-losses / number of
   targets, gathered over ranks without the duplicates a distributed sampler adds) and logs
   `eval_<source>_loss`, `eval_<source>_supervised_tokens` and `eval_loss` (all sources, token-weighted). HF's own
   evaluation loop averages per-batch means weighted by rows, which is not a per-token loss when rows differ in
   length.
4. The logged `learning_rate` is the rate the logged step applied, with or without DeepSpeed (HF logs the next
   step's under DeepSpeed, whose engine steps the scheduler inside backward).
5. The supervised tokens trained per source (the collator's `supervised_tokens_by_source`, summed over ranks) add
   up in `source_tokens` (`SourceTokensSeen`, saved with each checkpoint's trainer state) for the MLflow curves
   `supervised_tokens_seen/<source>`.

The training loss itself is HF's: with `compute_loss_func` (the collator owner's `causal_lm_loss`) and
`average_tokens_across_devices`, the Trainer divides the summed log-loss of every micro-batch by the supervised
targets of the whole accumulated batch on all ranks (`num_items_in_batch`), so each token weighs the same whatever
micro-batch it sits in (the seed averaged per micro-batch).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState

from orca8k.data.chat_format import IGNORE_INDEX
from orca8k.data.collate import SOURCE_TOKENS_KEY
from orca8k.training.schedule import make_lr_scheduler

SOURCE_TOKENS_STATE = "SourceTokensSeen"  # its key in a checkpoint's trainer_state.json `stateful_callbacks`


class SourceTokensSeen(TrainerCallback, ExportableState):
    """Supervised tokens trained so far per source (all ranks), saved in each checkpoint's trainer state.

    Args:
        seen: the counts to start from (a resumed run: `from_trainer_state` of its checkpoint).
    """

    def __init__(self, seen: dict[str, int] | None = None):
        self.seen: dict[str, int] = dict(seen or {})

    def add(self, sources: tuple[str, ...], counts: list[int]) -> None:
        for name, n in zip(sources, counts, strict=True):
            self.seen[name] = self.seen.get(name, 0) + int(n)

    def metrics(self) -> dict[str, int]:
        """`{"supervised_tokens_seen/<source>": n}` for the MLflow curves."""
        return {f"supervised_tokens_seen/{name}": n for name, n in sorted(self.seen.items())}

    def state(self) -> dict:
        return {"args": {}, "attributes": {"seen": dict(self.seen)}}

    @classmethod
    def from_trainer_state(cls, trainer_state: dict) -> SourceTokensSeen:
        """The counts saved in a checkpoint's `trainer_state.json` (none saved: zero)."""
        saved = (trainer_state.get("stateful_callbacks") or {}).get(SOURCE_TOKENS_STATE) or {}
        return cls({str(k): int(v) for k, v in ((saved.get("attributes") or {}).get("seen") or {}).items()})


def real_token_count(inputs: dict[str, torch.Tensor], pad_token_id: int) -> torch.Tensor:
    """Tokens of a collated batch that are not batch padding (`orca8k.data.collate.CausalLMCollator`'s output).

    Examples carry an `attention_mask`: its sum. Packed rows carry none; their padding is a last pseudo-example that
    starts with the pad id where every real example starts with `<s>`: a row's real tokens end at its last
    `position_ids` restart when that restart holds the pad id (pad = eos is also a real token, so ids alone cannot
    tell).

    Args:
        inputs: `input_ids`, `position_ids` and optionally `attention_mask`, each `[batch, seq_len]`.
        pad_token_id: the collator's pad id.

    Returns:
        Scalar int64 tensor.
    """
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    ids, pos = inputs["input_ids"], inputs["position_ids"]
    seq_len = ids.shape[1]
    idx = torch.arange(seq_len, device=ids.device).expand_as(ids)
    last_restart = torch.where(pos == 0, idx, torch.zeros_like(idx)).max(dim=1).values  # [batch]
    padded = (ids.gather(1, last_restart[:, None])[:, 0] == pad_token_id) & (last_restart > 0)
    return torch.where(padded, last_restart, torch.full_like(last_restart, seq_len)).sum()


def supervised_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of next-token log-losses and number of supervised targets.

    Args:
        logits: `[batch, seq_len, vocab]`.
        labels: `[batch, seq_len]`, aligned to the inputs (shifted here), `IGNORE_INDEX` = no loss.

    Returns:
        (`[batch]` float32 sums of -log p(target), `[batch]` int64 target counts).
    """
    targets = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )  # [batch, seq_len - 1]
    mask = targets != IGNORE_INDEX
    return (losses * mask).sum(dim=1), mask.sum(dim=1)


class Orca8kTrainer(Trainer):
    """HF `Trainer` with the warm-up shape, the non-finite-loss record and exact per-token evaluation.

    Args:
        warmup_shape: "log" | "linear" (`train.warmup_shape`).
        *args, **kwargs: as for `transformers.Trainer`; `eval_dataset` should be a dict `{source: Dataset}`.
    """

    def __init__(self, *args: Any, warmup_shape: str, source_tokens: SourceTokensSeen | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warmup_shape = warmup_shape
        self.source_tokens = source_tokens if source_tokens is not None else SourceTokensSeen()
        self.add_callback(self.source_tokens)  # exported into every checkpoint's trainer state
        self.nonfinite_loss: float | None = None  # last non-finite micro-batch loss since the guard looked
        self.step_learning_rate: float | None = None  # the LR the current optimiser step uses
        self._step_starts = True  # the next micro-batch is the first of an optimiser step

    # -------------------------------------------------------------- schedule
    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:
            kind = getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type)
            self.lr_scheduler = make_lr_scheduler(
                optimizer if optimizer is not None else self.optimizer,
                warmup_steps=self.args.get_warmup_steps(num_training_steps),
                total_steps=num_training_steps,
                shape=self.warmup_shape,
                scheduler_type=kind,
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _get_learning_rate(self) -> float:
        # HF reads the scheduler after the step: without DeepSpeed that is the LR the step used, with DeepSpeed
        # (whose engine steps the scheduler inside backward) the next step's. Log the applied one in both cases.
        if self.step_learning_rate is not None:
            return self.step_learning_rate
        return super()._get_learning_rate()

    # -------------------------------------------------------------- resume
    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # transformers 5's loop checks `max_steps` only after an optimizer step: resumed from a checkpoint at
        # `max_steps` that falls mid-epoch (a finished run rerun with the same inputs), it would train one step past
        # the budget. A finished run trains no further; the weights stay the checkpoint's.
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    # -------------------------------------------------------------- guard
    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._step_starts:  # before any backward of this step: the LR the optimiser will apply
            self.step_learning_rate = float(self.optimizer.param_groups[0]["lr"])
        self._step_starts = self.accelerator.gradient_state.sync_gradients  # set by the loop before this call
        by_source = inputs.pop(SOURCE_TOKENS_KEY, None)
        if by_source is not None:  # [n_sources] on every rank, in the collator's `sources` order
            total = self.accelerator.gather(by_source.to(self.args.device)).reshape(-1, by_source.numel()).sum(0)
            self.source_tokens.add(self.data_collator.sources, total.tolist())
        tokens = real_token_count(inputs, self.processing_class.pad_token_id).to(self.args.device)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(tokens).sum())  # all ranks
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):
            self.nonfinite_loss = float(loss.float().mean())
        return loss

    # -------------------------------------------------------------- evaluation
    def _eval_model(self) -> torch.nn.Module:
        # DeepSpeed: the engine (ZeRO-3 gathers partitioned weights in its forward); otherwise the plain module
        # (accelerate has patched its forward with autocast; no DDP sync needed without gradients)
        return self.model_wrapped if self.is_deepspeed_enabled else self.model

    @torch.no_grad()
    def _token_loss(self, dataset) -> tuple[float, int]:
        loader = self.get_eval_dataloader(dataset)
        model = self._eval_model()
        total = torch.zeros((), dtype=torch.float64)
        count = torch.zeros((), dtype=torch.int64)
        for inputs in loader:
            inputs = self._prepare_inputs(inputs)
            inputs.pop(SOURCE_TOKENS_KEY, None)  # training curves only
            labels = inputs.pop("labels")
            logits = model(**inputs, use_cache=False).logits  # [batch, seq_len, vocab]
            sums, counts = supervised_loss_sums(logits, labels)
            sums, counts = self.accelerator.gather_for_metrics((sums, counts))
            total += sums.double().sum().cpu()
            count += counts.sum().cpu()
        return float(total), int(count)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Per-source loss per supervised token, plus the token-weighted `eval_loss` over all sources.

        Args:
            eval_dataset: a Dataset or `{name: Dataset}`; default: the Trainer's `eval_dataset`.
            ignore_keys: unused (kept for the Trainer's signature).
            metric_key_prefix: "eval".

        Returns:
            `{"eval_<name>_loss", "eval_<name>_supervised_tokens", ..., "eval_loss"}` (also logged and passed to
            the callbacks' `on_evaluate`).

        Raises:
            ValueError: an eval set has no supervised token.
        """
        datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not isinstance(datasets, dict):
            datasets = {"": datasets}
        model = self._eval_model()
        was_training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        grand_total, grand_count = 0.0, 0
        try:
            for name, dataset in datasets.items():
                total, count = self._token_loss(dataset)
                if count == 0:
                    raise ValueError(f"eval set {name!r}: no supervised token")
                key = f"{metric_key_prefix}_{name}" if name else metric_key_prefix
                metrics[f"{key}_loss"] = total / count
                metrics[f"{key}_supervised_tokens"] = count
                grand_total += total
                grand_count += count
        finally:
            model.train(was_training)
        metrics[f"{metric_key_prefix}_loss"] = grand_total / grand_count
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
