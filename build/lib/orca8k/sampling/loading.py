"""Loading a model for sampling: a local model dir → (model, tokenizer), eval mode, on the asked device."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from orca8k.model.loading import KEEP, load_causal_lm
from orca8k.model.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def resolve_device(device: str) -> str:
    """`auto` → `cuda` when a GPU is visible, else `cpu`; anything else is returned as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_local_model(
    path: str | Path, *, dtype: str = "fp32", device: str = "auto", attn_implementation: str = "sdpa"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a saved model dir (safetensors + OA tokenizer) for generation, keeping its saved RoPE settings.

    Args:
        path: a model dir written by `train` (or any dir with `config.json`, safetensors and a tokenizer).
        dtype: fp32 | fp16 | bf16.
        device: `auto`, `cpu`, `cuda`, `cuda:N`.
        attn_implementation: sdpa | eager | flash_attention_2.

    Returns:
        (model in eval mode, tokenizer).

    Raises:
        orca8k.errors.StageInputMissing: no `config.json` or no tokenizer in `path`.
    """
    from orca8k.errors import StageInputMissing

    if not (Path(path) / "config.json").is_file():
        raise StageInputMissing(f"{path}: no model here (no config.json; run `orca8k train` first, or pass a model "
                                "folder written by it)")
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(
        Path(path).resolve(), rope_scaling=KEEP, dtype=dtype, attn_implementation=attn_implementation,
        device=resolve_device(device),
    )
    return model.eval(), tokenizer
