"""The demo base: a sentencepiece tokenizer and a tiny Llama pre-trained at the native context, on the mix's train split.

1. Text: every train row of the mix as plain text — text rows as they are, chat rows rendered as
   `{system}\\n\\nUser: {q}\\n\\nAssistant: {a}…` (no OA special tokens: those belong to fine-tuning).
2. Tokenizer: BPE with Llama-2's trainer settings (`orca8k.model.tokenizer.train_sentencepiece`) on those lines.
3. Blocks: each row `<s> text </s>`, rows concatenated in a seeded order and cut into `native_context`-token blocks
   (GPT-style packing, `group_texts` of HF's `run_clm.py`), so the model sees every position 0…context-1.
4. Pre-training: a `LlamaForCausalLM` from `base.architecture`, fp32, HF Trainer, seeded; `base.pretrain.max_steps`
   is the budget (reruns with the same thread count give the same weights) and `max_seconds` only a safety cap.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca8k.config import Config
from orca8k.errors import StageInputMissing, TrainingError
from orca8k.layout import Layout
from orca8k.model.loading import save_model
from orca8k.model.tokenizer import load_base_tokenizer, train_sentencepiece

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

ROLE_NAMES = {"user": "User", "assistant": "Assistant"}


def plain_text(row: dict[str, Any]) -> str:
    """A mix row as plain pre-training text: the text itself, or the chat rendered without special tokens."""
    if row["kind"] == "text":
        return row["text"]
    parts = []
    for m in row["messages"]:
        if m["role"] == "system":
            if m["content"]:
                parts.append(m["content"])
        else:
            parts.append(f"{ROLE_NAMES[m['role']]}: {m['content']}")
    return "\n\n".join(parts)


def read_train_texts(layout: Layout) -> list[str]:
    """Plain texts of every row of `layout.mix_train`, in file order.

    Raises:
        StageInputMissing: the mix's train file does not exist.
    """
    import pyarrow.parquet as pq

    if not layout.mix_train.is_file():
        raise StageInputMissing(f"{layout.mix_train}: no mix (run `orca8k mix` first)")
    table = pq.read_table(layout.mix_train, columns=["kind", "messages", "text"])
    return [plain_text(row) for row in table.to_pylist()]


def pretraining_blocks(tok: PreTrainedTokenizerBase, texts: list[str], context: int, seed: int) -> torch.Tensor:
    """Token blocks for causal-LM pre-training: `<s> text </s>` per row, rows in a seeded order, cut every `context`.

    The last partial block is dropped.

    Returns:
        Int64 tensor `[n_blocks, context]`.

    Raises:
        TrainingError: fewer tokens than one block.
    """
    import torch

    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    encoded = tok([texts[i] for i in order], add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for row in encoded:
        ids.append(tok.bos_token_id)
        ids.extend(row)
        ids.append(tok.eos_token_id)
    n = len(ids) // context
    if n == 0:
        raise TrainingError(f"base: {len(ids)} train tokens, fewer than one block of {context}")
    return torch.tensor(ids[: n * context], dtype=torch.long).view(n, context)  # [n_blocks, context]


class _Blocks:
    """A map-style dataset over the block tensor: item i is `{"input_ids", "labels"}` (labels = inputs; the model shifts)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def _time_cap_callback(max_seconds: float | None):
    from transformers import TrainerCallback

    class TimeCap(TrainerCallback):
        """Stops training once `max_seconds` of wall-clock have passed (a safety cap; `max_steps` is the budget)."""

        def __init__(self) -> None:
            self.start = 0.0
            self.stopped_at: int | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.monotonic()

        def on_step_end(self, args, state, control, **kwargs):
            if max_seconds is not None and time.monotonic() - self.start >= max_seconds and state.global_step < state.max_steps:
                self.stopped_at = state.global_step
                control.should_training_stop = True
                print(f"[base] max_seconds={max_seconds:g} reached: stopping at step {state.global_step} of "
                      f"{state.max_steps} (weights will differ from a full run)", flush=True)
            return control

    return TimeCap()


def build_model(cfg: Config):
    """A freshly initialised fp32 `LlamaForCausalLM` from `base.architecture` (seeded by `cfg.seed`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    a = cfg.base.architecture
    config = LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads, max_position_embeddings=a.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(a.rope_theta)}, rms_norm_eps=a.rms_norm_eps,
        tie_word_embeddings=a.tie_word_embeddings, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config).to(torch.float32)


def pretrain(cfg: Config, model, blocks: torch.Tensor, work_dir: Path) -> dict[str, Any]:
    """Pre-train `model` on `blocks` with HF Trainer (fp32 on CPU, seeded, full determinism).

    Returns:
        `{"steps", "max_steps", "stopped_by_max_seconds", "final_loss", "tokens_seen", "train_seconds", "loss_curve"}`
        (`final_loss`: mean training loss of the last logging window; the mean over all steps when no window
        completed, i.e. `max_steps` < `logging_steps`).

    Raises:
        TrainingError: the loss is not finite.
    """
    import torch
    from transformers import Trainer, TrainingArguments, default_data_collator

    p = cfg.base.pretrain
    assert p is not None
    args = TrainingArguments(
        output_dir=str(work_dir), max_steps=p.max_steps, per_device_train_batch_size=p.per_device_train_batch_size,
        learning_rate=p.learning_rate, lr_scheduler_type=p.lr_scheduler_type, warmup_steps=p.warmup_steps,
        weight_decay=p.weight_decay, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        logging_steps=p.logging_steps, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
        seed=cfg.seed, data_seed=cfg.seed, full_determinism=True, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False,
    )
    cap = _time_cap_callback(p.max_seconds)
    trainer = Trainer(model=model, args=args, train_dataset=_Blocks(blocks), data_collator=default_data_collator,
                      callbacks=[cap])
    start = time.monotonic()
    output = trainer.train()
    seconds = time.monotonic() - start
    curve = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    # no logging window completed (max_steps < logging_steps, or the time cap stopped it first): the run's mean
    final = curve[-1][1] if curve else float(output.training_loss)
    if not math.isfinite(final):
        raise TrainingError(f"base: non-finite training loss {final} at step {trainer.state.global_step}")
    torch.set_grad_enabled(True)
    steps = trainer.state.global_step
    return {
        "steps": steps, "max_steps": p.max_steps, "stopped_by_max_seconds": cap.stopped_at is not None,
        "final_loss": round(final, 4), "tokens_seen": steps * p.per_device_train_batch_size * blocks.shape[1],
        "train_seconds": round(seconds, 1), "loss_curve": [[s, round(v, 4)] for s, v in curve],
    }


def build_demo_base(cfg: Config, layout: Layout, out_dir: Path) -> dict[str, Any]:
    """Train the demo tokenizer and pre-train the tiny base into `out_dir` (a fresh, empty folder).

    Writes `tokenizer.model` (+ the HF tokenizer files), `config.json`, `generation_config.json`,
    `model.safetensors`. The caller writes `base_info.json` from the returned dict.

    Returns:
        Info for `base_info.json`: tokenizer and model sizes, block counts, and `pretrain`'s figures.

    Raises:
        StageInputMissing: no mix train file.
        TrainingError: too little data, or a non-finite loss.
    """
    import torch

    assert cfg.base.tokenizer is not None and cfg.base.pretrain is not None
    start = time.monotonic()
    texts = read_train_texts(layout)
    lines = [line for text in texts for line in text.split("\n")]
    train_sentencepiece(lines, out_dir, vocab_size=cfg.base.tokenizer.vocab_size,
                        input_sentence_size=cfg.base.tokenizer.input_sentence_size, seed=cfg.seed)
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    tok = load_base_tokenizer(out_dir)
    if len(tok) != cfg.base.architecture.vocab_size:
        raise TrainingError(f"base: the tokenizer has {len(tok)} pieces, base.architecture.vocab_size asks for "
                            f"{cfg.base.architecture.vocab_size}")
    tokenizer_seconds = time.monotonic() - start

    context = cfg.base.native_context
    blocks = pretraining_blocks(tok, texts, context, cfg.seed)  # [n_blocks, context]
    model = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    p = cfg.base.pretrain
    print(f"[base] tokenizer: {len(tok)} pieces from {len(lines)} lines ({tokenizer_seconds:.1f} s); "
          f"train: {len(texts)} rows -> {blocks.shape[0]} blocks x {context} tokens = {blocks.numel():,} tokens", flush=True)
    print(f"[base] model: {n_params:,} parameters; {p.max_steps} steps x {p.per_device_train_batch_size} x "
          f"{context} = {p.max_steps * p.per_device_train_batch_size * context:,} tokens "
          f"({p.max_steps * p.per_device_train_batch_size / blocks.shape[0]:.2f} epochs), "
          f"torch threads {torch.get_num_threads()}", flush=True)
    work = out_dir / ".trainer"
    stats = pretrain(cfg, model, blocks, work)
    shutil.rmtree(work, ignore_errors=True)
    model.config.use_cache = True
    save_model(model, tok, out_dir)
    return {
        "tokenizer": {"vocab_size": len(tok), "lines": len(lines), "seconds": round(tokenizer_seconds, 1)},
        "parameters": n_params, "native_context": context, "train_rows": len(texts),
        "train_blocks": int(blocks.shape[0]), "train_tokens": int(blocks.numel()),
        "torch_threads": torch.get_num_threads(), "pretrain": stats,
    }


def write_info(path: Path, info: dict[str, Any]) -> None:
    """`base_info.json`, keys sorted, indented."""
    path.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
