"""RoPE scaling: the only module that knows transformers' RoPE config keys.

Convention (one, written into every saved config): `max_position_embeddings` stays the base's **native** context
(4096 for Llama-2), and `rope_parameters = {"rope_type": "linear", "factor": F, "rope_theta": θ}` carries the
scaling, so the effective context is native × F (8192). A server reading the config therefore scales exactly once
(the seed's release wrote 8192 *and* factor 2, which some servers double-scaled).

Linear scaling is position interpolation (Chen et al. 2023, arXiv:2306.15595): positions are divided by F, so
the rotary angle at position 2p with F = 2 equals the unscaled angle at p. transformers 5 stores RoPE settings in
`config.rope_parameters` (a legacy `rope_scaling={"type": ...}` is still read); scaling is set on the config
**before** the weights load, never patched onto a loaded model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from orca8k.config import RopeScalingConfig


def rope_parameters(rope: RopeScalingConfig | None, rope_theta: float) -> dict[str, Any]:
    """The `config.rope_parameters` dict for a scaling (None = the default, unscaled RoPE)."""
    if rope is None:
        return {"rope_type": "default", "rope_theta": float(rope_theta)}
    return {"rope_type": rope.type, "factor": float(rope.factor), "rope_theta": float(rope_theta)}


def rope_theta_of(config: PretrainedConfig) -> float:
    """θ of a loaded config, whichever spelling it uses (transformers 5 `rope_parameters` or legacy `rope_theta`)."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def apply_rope_scaling(config: PretrainedConfig, rope: RopeScalingConfig | None, native_context: int | None = None) -> PretrainedConfig:
    """Write the scaling into a config (in place, returned) before `from_pretrained(..., config=config)`.

    Args:
        config: the base model's config.
        rope: the scaling from params (`model.rope_scaling`), or None for plain RoPE.
        native_context: the base's native context; `max_position_embeddings` is set to it (the convention above).
            None keeps the config's value.

    Raises:
        ValueError: the config already carries a different RoPE scaling (scaling twice would compound).
    """
    current = getattr(config, "rope_parameters", None) or {}
    current_type = current.get("rope_type", current.get("type", "default")) if isinstance(current, dict) else "default"
    if current_type not in ("default", None) and rope is not None:
        if current_type != rope.type or float(current.get("factor", 1.0)) != float(rope.factor):
            raise ValueError(f"config already has RoPE scaling {current}; refusing to scale it again with {rope}")
    theta = rope_theta_of(config)
    config.rope_parameters = rope_parameters(rope, theta)
    if hasattr(config, "rope_scaling"):
        try:
            delattr(config, "rope_scaling")
        except AttributeError:
            pass
    if native_context is not None:
        config.max_position_embeddings = int(native_context)
    return config


def scaling_of(config: PretrainedConfig) -> dict[str, Any]:
    """The RoPE settings of a config as plain data (`rope_type`, `factor`, `rope_theta`), for reports and tags."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_type", "default")
    return params
