"""Everything the `train` stage does before step 0, as one function tests can call: `build_trainer(cfg, layout)`.

Order (all before any weight moves): read the inputs; read and check the DeepSpeed config; build
`TrainingArguments` (this sets up the process group under a launcher, and must precede loading for ZeRO-3); find the
last complete checkpoint of this configuration; load the base with the RoPE scaling written into its config; check
dtypes; resize the embeddings; build the trainer with its callbacks. `save_final_model` writes the result.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca8k.errors import TrainingError
from orca8k.training import checkpoints as ckpt
from orca8k.training.distributed import barrier, is_main, launched

if TYPE_CHECKING:
    from orca8k.config import Config
    from orca8k.layout import Layout
    from orca8k.training.callbacks import GuardCallback
    from orca8k.training.trainer import Orca8kTrainer


@dataclass
class TrainSetup:
    """A trainer ready for `train(resume_from_checkpoint=...)` and what the stage reports about it."""

    trainer: Orca8kTrainer
    guard: GuardCallback
    resume: Path | None
    fingerprint: str
    eval_names: list[str]
    facts: dict[str, Any] = field(default_factory=dict)  # filled when training begins

    @property
    def resumed_from(self) -> int | None:
        return ckpt.checkpoint_step(self.resume) if self.resume is not None else None


def attn_implementation(requested: str) -> tuple[str, str | None]:
    """flash_attention_2 only where it can run (CUDA and the flash_attn package); else sdpa, with a note."""
    import torch

    if requested != "flash_attention_2":
        return requested, None
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return requested, None
    return "sdpa", "model.attn_implementation=flash_attention_2 needs CUDA and flash-attn; using sdpa"


def zero_stage(ds_config: dict[str, Any] | None) -> int | None:
    """ZeRO stage of a DeepSpeed config (0 without `zero_optimization`), None without DeepSpeed."""
    return int((ds_config.get("zero_optimization") or {}).get("stage", 0)) if ds_config is not None else None


def single_process_distributed_env() -> dict[str, str]:
    """Set `RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR MASTER_PORT` when no launcher did: DeepSpeed in a plain
    `python` process otherwise falls back to MPI discovery and fails (`No module named 'mpi4py'`).

    Returns:
        The variables set (empty under a launcher).
    """
    if launched():
        return {}
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return env


def train_sources(train_ds) -> tuple[str, ...] | None:
    """The sources named by the train rows (`source` of examples, `sources` of packed rows), sorted; None when the
    rows name none (data tokenized before packed rows carried their sources)."""
    import pyarrow.compute as pc

    if "source" in train_ds.column_names:
        column = train_ds.data.column("source")
    elif "sources" in train_ds.column_names:
        column = pc.list_flatten(train_ds.data.column("sources"))
    else:
        return None
    return tuple(sorted(str(v) for v in pc.unique(column).to_pylist() if v is not None))


def build_trainer(cfg: Config, layout: Layout) -> TrainSetup:
    """Load inputs, check the setup and build the trainer with its callbacks (see the module docstring).

    Raises:
        StageInputMissing: tokenized data, its token validation result, tokenizer or base missing.
        ValidationFailed: the token validation result is not a success.
        DataError: tokenized data without the required columns.
        ConfigError: a DeepSpeed config that contradicts params.
        TrainingError: a dtype mismatch between model, Trainer flags and DeepSpeed config.
    """
    from transformers import PrinterCallback, set_seed
    from transformers.utils import logging as hf_logging

    from orca8k.data.collate import CausalLMCollator, training_loss
    from orca8k.model.base import resolve_base
    from orca8k.model.loading import load_causal_lm, resize_embeddings
    from orca8k.model.tokenizer import load_tokenizer
    from orca8k.training.arguments import (
        check_precision,
        load_deepspeed_config,
        model_load_dtype,
        trainer_precision,
        training_arguments,
    )
    from orca8k.training.callbacks import CheckpointCallback, FactsCallback, GuardCallback, LogPrinterCallback
    from orca8k.training.data import eval_sets_by_source, load_tokenized
    from orca8k.training.facts import count_tokens, counts_from_metrics, derived_facts, format_facts
    from orca8k.training.trainer import Orca8kTrainer, SourceTokensSeen
    from orca8k.validation.report import require_passed

    hf_logging.disable_progress_bar()
    t = cfg.train
    # never train on tokens the token suite did not pass (an interrupted tokenize leaves no result)
    require_passed(layout.token_validation_result,
                   "no token validation result: the tokenized data was never checked (run `orca8k tokenize`)",
                   "the tokenized data failed its token-level checks; fix them and rerun `orca8k tokenize`")
    train_ds = load_tokenized(layout.tokenized_train, "train")
    eval_sets = eval_sets_by_source(load_tokenized(layout.tokenized_val, "val"))
    tokenizer = load_tokenizer(layout.tokenizer)
    base_dir = resolve_base(cfg)

    ds_config = load_deepspeed_config(cfg)
    if ds_config is not None:
        single_process_distributed_env()
    args = training_arguments(cfg, layout, ds_config)
    fingerprint = ckpt.training_fingerprint(cfg, layout, base_dir)
    if is_main():
        _, notes = ckpt.prepare_checkpoints(layout.checkpoints, fingerprint, layout.checkpoint_run)
        for note in notes:
            print(f"[train] checkpoints: {note}", flush=True)
    barrier()
    resume = ckpt.last_complete_checkpoint(layout.checkpoints)

    set_seed(cfg.seed)  # before loading: new embedding rows are drawn around the mean of the old ones
    attn, attn_note = attn_implementation(cfg.model.attn_implementation)
    if attn_note and is_main():
        print(f"[train] {attn_note}", flush=True)
    model = load_causal_lm(base_dir, rope_scaling=cfg.model.rope_scaling, dtype=model_load_dtype(t, ds_config),
                           attn_implementation=attn)
    check_precision(model.dtype, t, ds_config, args.device.type)
    resize_embeddings(model, tokenizer, cfg.model.pad_vocab_size_multiple)
    for config in (model.config, model.generation_config):
        config.pad_token_id, config.bos_token_id, config.eos_token_id = (
            tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)

    sources = train_sources(train_ds)
    if sources is None and is_main():
        print("[train] the train rows name no source (tokenized before per-source counts): no "
              "supervised_tokens_seen/<source> curves", flush=True)
    seen = (SourceTokensSeen.from_trainer_state(json.loads((resume / "trainer_state.json").read_text()))
            if resume is not None else SourceTokensSeen())  # a resumed run counts on from its checkpoint
    loss = training_loss(args.torch_compile, args.torch_compile_backend or "inductor", args.torch_compile_mode)
    trainer = Orca8kTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_sets,
        data_collator=CausalLMCollator(pad_token_id=tokenizer.pad_token_id, max_length=cfg.tokenize.max_length,
                                       sources=sources),
        processing_class=tokenizer, compute_loss_func=loss, warmup_shape=t.warmup_shape,
        source_tokens=seen,
    )
    trainer.remove_callback(PrinterCallback)  # replaced by LogPrinterCallback (one line per log, rank 0)
    guard = GuardCallback(trainer, t.max_seconds)
    setup = TrainSetup(trainer, guard, resume, fingerprint, list(eval_sets))
    counts = counts_from_metrics(layout.tokenize_metrics)
    if counts is None or counts.rows != len(train_ds):
        counts = count_tokens(train_ds)

    def describe(state) -> list[str]:
        setup.facts.update(derived_facts(
            cfg, model, counts, packing="position_ids" in train_ds.column_names, max_steps=state.max_steps,
            world_size=args.world_size,
            precision=trainer_precision(t), zero_stage=zero_stage(ds_config), attn_implementation=attn,
            resumed_from=setup.resumed_from,
        ))
        return format_facts(setup.facts)

    for cb in (FactsCallback(describe), guard, CheckpointCallback(t.save_total_limit, {"fingerprint": fingerprint}),
               LogPrinterCallback()):
        trainer.add_callback(cb)
    return setup


def save_final_model(trainer: Orca8kTrainer, out_dir: Path) -> Path:
    """Save the final weights (safetensors), config and tokenizer into `out_dir`.

    Every rank takes part (DeepSpeed gathers the weights); rank 0 writes into `<out_dir>.tmp`, checks it, then
    replaces `out_dir`, so an interruption never leaves a half-written model where the next stage looks. The
    Trainer's pickled `training_args.bin` is not kept (the model folder holds no pickles).

    Raises:
        TrainingError: the saved folder has no safetensors weights or lost the RoPE settings.
    """
    from orca8k.model.loading import share_like_other_files
    from orca8k.model.rope import scaling_of

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if is_main() and tmp.exists():
        shutil.rmtree(tmp)
    barrier()
    trainer.model.config.use_cache = True  # trained without a KV cache; generation wants it
    trainer.save_model(str(tmp))
    barrier()
    if is_main():
        (tmp / "training_args.bin").unlink(missing_ok=True)
        share_like_other_files(tmp)
        saved = json.loads((tmp / "config.json").read_text())
        if saved.get("rope_parameters") != scaling_of(trainer.model.config) or not list(tmp.glob("*.safetensors")):
            raise TrainingError(f"{tmp}: the saved model lacks safetensors weights or its RoPE settings")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    barrier()
    return out_dir
