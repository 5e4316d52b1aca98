"""Loading and saving causal LMs: safetensors only, never `trust_remote_code`, RoPE set before the weights load."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from orca8k.errors import StageInputMissing
from orca8k.model.rope import apply_rope_scaling, rope_scaling_of

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from orca8k.config import RopeScalingConfig

KEEP = "keep"  # sentinel: load with the RoPE settings saved in the checkpoint


def torch_dtype(name: str | None) -> torch.dtype:
    """`"fp32"|"fp16"|"bf16"|"float32"|...` → torch dtype (None → float32)."""
    import torch

    table = {
        None: torch.float32, "fp32": torch.float32, "float32": torch.float32,
        "fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    }
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use fp32, fp16 or bf16")
    return table[name]


def load_causal_lm(
    path: str | Path,
    *,
    rope_scaling: RopeScalingConfig | dict[str, Any] | None | str = KEEP,
    native_context: int | None = None,
    dtype: str | None = "fp32",
    attn_implementation: str = "sdpa",
    revision: str | None = None,
    device: str | None = None,
) -> PreTrainedModel:
    """Load a Llama-style causal LM with the RoPE scaling written into its config before the weights load.

    Args:
        path: a local model dir (safetensors) or a hub id.
        rope_scaling: `KEEP` (the saved settings), None (plain RoPE: the unscaled base), or the scaling to apply
            (a `RopeScalingConfig` or a dict in either spelling, `type` or `rope_type`). It is written into the
            config before the weights load (`orca8k.model.rope.apply_rope_scaling`).
        native_context: written to `max_position_embeddings` when scaling is applied (see `orca8k.model.rope`);
            None keeps the saved value, which is the native context under this project's convention.
        dtype: fp32 | fp16 | bf16.
        attn_implementation: sdpa | eager | flash_attention_2.
        revision: pinned hub revision.
        device: move the model there (None: leave on CPU).

    Returns:
        The model (eval mode, as `from_pretrained` leaves it), weights in `dtype`.

    Raises:
        StageInputMissing: a local path without `config.json`.
        ConfigError: an invalid `rope_scaling` (missing factor, factor < 1, unknown type).
        ValueError: `rope_scaling` differs from a scaling the saved config already carries (no double scaling).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    local = Path(path)
    if (local.is_absolute() or str(path).startswith(".")) and not (local / "config.json").is_file():
        raise StageInputMissing(f"{local}: no config.json (is the upstream stage done?)")
    config = AutoConfig.from_pretrained(str(path), revision=revision, trust_remote_code=False)
    if not (isinstance(rope_scaling, str) and rope_scaling == KEEP):
        apply_rope_scaling(config, rope_scaling, native_context)
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        config=config,
        revision=revision,
        dtype=torch_dtype(dtype),
        attn_implementation=attn_implementation,
        use_safetensors=True,
        trust_remote_code=False,
    )
    if device is not None:
        model = model.to(device)
    return model


def resize_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, multiple: int) -> int:
    """Resize input and output embeddings to `len(tokenizer)` rounded up to `multiple` (32,005 → 32,016).

    New rows are initialised to the mean of the old rows (transformers' `mean_resizing`), so a new special
    token starts near the average token instead of at random.

    Returns:
        The new vocabulary size (rows).
    """
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=multiple, mean_resizing=True)
    return model.get_input_embeddings().weight.shape[0]


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path) -> Path:
    """Save weights as safetensors (+ config, generation config) and the tokenizer into `out_dir`.

    The config's RoPE settings are written in the canonical form of `orca8k.model.rope` (`rope_parameters` with
    `rope_type`, no legacy `type` key), so the saved model reloads with the same scaling.

    Returns:
        `out_dir`.

    Raises:
        ConfigError: the model's config carries a RoPE type this project does not handle.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    apply_rope_scaling(model.config, rope_scaling_of(model.config))
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return share_like_other_files(out_dir)


def share_like_other_files(folder: str | Path) -> Path:
    """Give the files of `folder` the permissions a new file gets under the process umask (0644 under umask 022).

    safetensors writes its files owner-only (0600), unlike every other file of a saved model, so a server or a
    colleague running as another user could read the config but not the weights.

    Returns:
        `folder`.
    """
    import os

    umask = os.umask(0)
    os.umask(umask)
    for f in Path(folder).rglob("*"):
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~umask)
    return Path(folder)
