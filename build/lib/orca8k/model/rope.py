"""RoPE scaling: the only module that knows transformers' RoPE config keys.

Convention (one, written into every saved config): `max_position_embeddings` stays the base's **native** context
(4096 for Llama-2), and `rope_parameters = {"rope_type": "linear", "factor": F, "rope_theta": θ}` carries the
scaling, so the effective context is native × F (8192). A server reading the config therefore scales exactly once
(the seed's release wrote 8192 *and* factor 2, which some servers double-scaled).

Linear scaling is position interpolation (Chen et al. 2023, arXiv:2306.15595): positions are divided by F, so
the rotary angle at position 2p with F = 2 equals the unscaled angle at p. transformers 5 stores RoPE settings in
`config.rope_parameters` (a legacy `rope_scaling={"type": ...}` is still read and leaves a stray `type` key);
scaling is set on the config **before** the weights load, never patched onto a loaded model.

Spellings accepted from params and from saved configs: `{"type": "linear", "factor": 2}` (transformers 4) and
`{"rope_type": "linear", "factor": 2}` (transformers 5); both canonicalise to `RopeScalingConfig(type="linear",
factor=2.0)`. A missing factor, a factor below 1 and any type other than `linear` are rejected.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from orca8k.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from orca8k.config import RopeScalingConfig

DEFAULT_ROPE_THETA = 10000.0


def parse_rope_scaling(value: RopeScalingConfig | dict[str, Any] | None, where: str = "rope_scaling") -> RopeScalingConfig | None:
    """Canonicalise a RoPE scaling given in either spelling (`type` or `rope_type`).

    Args:
        value: a `RopeScalingConfig`, a dict such as `{"type": "linear", "factor": 2.0}` or
            `{"rope_type": "linear", "factor": 2.0}`, or None (no scaling). A dict from a transformers config may
            also carry `rope_theta` (ignored here: θ is a property of the base, see `rope_theta_of`);
            `{"rope_type": "default"}` means no scaling.
        where: name used in error messages (the params key or the config file).

    Returns:
        The validated `RopeScalingConfig`, or None for no scaling.

    Raises:
        ConfigError: missing factor, factor < 1, an unknown type, or `type` and `rope_type` that disagree.
    """
    from pydantic import ValidationError

    from orca8k.config import RopeScalingConfig

    if value is None or isinstance(value, RopeScalingConfig):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping like {{type: linear, factor: 2.0}}, got {value!r}")
    data = {k: v for k, v in value.items() if k != "rope_theta"}
    kind = data.get("rope_type", data.get("type"))
    if kind == "default" and "factor" not in data:
        return None
    try:
        return RopeScalingConfig.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'rope_scaling'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{where}: invalid RoPE scaling {value!r}: {problems}") from None


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
    return float(getattr(config, "rope_theta", None) or DEFAULT_ROPE_THETA)


def scaling_of(config: PretrainedConfig) -> dict[str, Any]:
    """The RoPE settings of a config as canonical plain data: `{"rope_type", "rope_theta"[, "factor"]}`.

    A legacy stray `type` key is folded into `rope_type`; no scaling reads as `rope_type: default`.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = params.pop("type", None)
    params.setdefault("rope_type", legacy or "default")
    params["rope_theta"] = rope_theta_of(config)
    return params


def rope_scaling_of(config: PretrainedConfig) -> RopeScalingConfig | None:
    """The scaling a config carries, canonicalised (None when it has plain RoPE).

    Raises:
        ConfigError: the config carries a RoPE type this project does not handle (anything but default/linear).
    """
    return parse_rope_scaling(scaling_of(config), where=f"{type(config).__name__}.rope_parameters")


def effective_context(config: PretrainedConfig) -> int:
    """Tokens the config supports under the convention above: `max_position_embeddings` × factor."""
    rope = rope_scaling_of(config)
    return int(config.max_position_embeddings * (rope.factor if rope is not None else 1.0))


def apply_rope_scaling(config: PretrainedConfig, rope: RopeScalingConfig | dict[str, Any] | None, native_context: int | None = None) -> PretrainedConfig:
    """Write the scaling into a config (in place, returned) before `from_pretrained(..., config=config)`.

    Args:
        config: the base model's config (plain RoPE, or already carrying this same scaling).
        rope: the scaling from params (`model.rope_scaling`, either spelling), or None for plain RoPE (this also
            removes a scaling, e.g. to compare a fine-tuned model with its unscaled self).
        native_context: the base's native context; `max_position_embeddings` is set to it (the convention above).
            None keeps the config's value.

    Returns:
        The same config, with canonical `rope_parameters` (no legacy `type` key).

    Raises:
        ConfigError: `rope` is invalid (see `parse_rope_scaling`).
        ValueError: the config already carries a different RoPE scaling (scaling twice would compound).
    """
    rope = parse_rope_scaling(rope)
    current = scaling_of(config)
    if rope is not None and current["rope_type"] != "default":
        if current["rope_type"] != rope.type or float(current.get("factor", 1.0)) != float(rope.factor):
            raise ValueError(f"config already has RoPE scaling {current}; refusing to scale it again with {rope.model_dump()}")
    config.rope_parameters = rope_parameters(rope, rope_theta_of(config))
    if native_context is not None:
        config.max_position_embeddings = int(native_context)
    return config
