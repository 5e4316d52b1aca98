"""RoPE scaling: spellings, rejection of bad settings, the cos/sin identity of position interpolation, and that the
scaling survives a save/reload with identical logits."""

from __future__ import annotations

import json

import pytest
import torch

from orca8k.config import RopeScalingConfig
from orca8k.errors import ConfigError
from orca8k.model.loading import KEEP, load_causal_lm, save_model
from orca8k.model.rope import (
    apply_rope_scaling,
    effective_context,
    parse_rope_scaling,
    rope_scaling_of,
    scaling_of,
)
from tests.fixtures.models import make_tiny_llama

NATIVE = 64


@pytest.mark.parametrize(
    "spelling",
    [
        {"type": "linear", "factor": 2},
        {"rope_type": "linear", "factor": 2.0},
        {"type": "linear", "rope_type": "linear", "factor": 2.0},
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},  # as read from a transformers 5 config
        RopeScalingConfig(type="linear", factor=2.0),
    ],
)
def test_both_spellings_canonicalise_to_the_same_scaling(spelling):
    rope = parse_rope_scaling(spelling)
    assert rope == RopeScalingConfig(type="linear", factor=2.0)
    assert rope.model_dump() == {"type": "linear", "factor": 2.0}


@pytest.mark.parametrize(
    ("spelling", "message"),
    [
        ({"type": "linear"}, "factor"),
        ({"rope_type": "linear"}, "factor"),
        ({"type": "linear", "factor": 0.5}, "factor"),
        ({"type": "dynamic", "factor": 2.0}, "type"),
        ({"rope_type": "yarn", "factor": 2.0}, "type"),
        ({"type": "linear", "rope_type": "dynamic", "factor": 2.0}, "disagree"),
        ({"type": "linear", "factor": 2.0, "original_max_position_embeddings": 4096}, "original_max_position_embeddings"),
        ("linear", "mapping"),
    ],
)
def test_bad_scalings_are_rejected_naming_the_problem(spelling, message):
    with pytest.raises(ConfigError, match=message):
        parse_rope_scaling(spelling, where="model.rope_scaling")


def test_default_rope_and_none_mean_no_scaling():
    assert parse_rope_scaling(None) is None
    assert parse_rope_scaling({"rope_type": "default", "rope_theta": 10000.0}) is None


def test_apply_writes_the_convention_and_refuses_to_scale_twice():
    model = make_tiny_llama(100, context=NATIVE)
    config = model.config
    apply_rope_scaling(config, {"type": "linear", "factor": 2.0}, native_context=NATIVE)
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert config.max_position_embeddings == NATIVE  # native, not native × factor
    assert effective_context(config) == 2 * NATIVE
    # the same scaling again is a no-op; a different one would compound and is refused
    apply_rope_scaling(config, RopeScalingConfig(type="linear", factor=2.0))
    assert config.rope_parameters["factor"] == 2.0
    with pytest.raises(ValueError, match="refusing to scale it again"):
        apply_rope_scaling(config, RopeScalingConfig(type="linear", factor=4.0))
    # removing the scaling is explicit and allowed
    apply_rope_scaling(config, None)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert effective_context(config) == NATIVE


def test_legacy_config_with_stray_type_key_reads_canonically():
    model = make_tiny_llama(100, context=NATIVE, rope_scaling={"type": "linear", "factor": 2.0})
    assert "type" in model.config.rope_parameters  # what transformers 5 leaves behind
    assert scaling_of(model.config) == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert rope_scaling_of(model.config) == RopeScalingConfig(type="linear", factor=2.0)


def _rotary(model, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[1, len(positions), head_dim]` of the model's own rotary module."""
    x = torch.zeros(1, len(positions), model.config.hidden_size)
    return model.model.rotary_emb(x, positions[None, :])


@pytest.fixture()
def saved_base(tmp_path):
    model = make_tiny_llama(120, context=NATIVE, seed=3)
    path = tmp_path / "base"
    save_model(model, None, path)
    return path


def test_scaled_rotary_at_2p_equals_unscaled_at_p_also_beyond_the_native_context(saved_base):
    unscaled = load_causal_lm(saved_base, rope_scaling=None)
    scaled = load_causal_lm(saved_base, rope_scaling=RopeScalingConfig(type="linear", factor=2.0), native_context=NATIVE)
    assert scaled.config.max_position_embeddings == NATIVE
    p = torch.arange(0, 3 * NATIVE)  # up to 3× the native context: 2p reaches 6× native
    cos_u, sin_u = _rotary(unscaled, p)
    cos_s, sin_s = _rotary(scaled, 2 * p)
    assert (p > NATIVE).sum() > 0
    torch.testing.assert_close(cos_s, cos_u, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin_s, sin_u, atol=1e-6, rtol=0)
    # and the identity is not vacuous: at the same position the two differ
    cos_same, _ = _rotary(scaled, p)
    assert (cos_same - cos_u).abs().max() > 0.1


def test_scaling_and_logits_survive_save_and_reload(saved_base, tmp_path):
    scaled = load_causal_lm(saved_base, rope_scaling={"rope_type": "linear", "factor": 2.0}, native_context=NATIVE)
    ids = torch.randint(3, 120, (2, 2 * NATIVE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = scaled(input_ids=ids).logits
    out = tmp_path / "scaled"
    save_model(scaled, None, out)
    on_disk = json.loads((out / "config.json").read_text())
    assert on_disk["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert on_disk["max_position_embeddings"] == NATIVE
    assert "rope_scaling" not in on_disk
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))

    reloaded = load_causal_lm(out, rope_scaling=KEEP)
    assert scaling_of(reloaded.config) == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with torch.no_grad():
        after = reloaded(input_ids=ids).logits
    assert torch.equal(before, after)
    # asking for the same scaling again is fine; a different one is refused (no double scaling)
    load_causal_lm(out, rope_scaling=RopeScalingConfig(type="linear", factor=2.0))
    with pytest.raises(ValueError, match="refusing"):
        load_causal_lm(out, rope_scaling=RopeScalingConfig(type="linear", factor=4.0))
    # the unscaled view of the same weights gives different logits at long positions
    plain = load_causal_lm(out, rope_scaling=None)
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, before)


def test_load_rejects_a_bad_scaling_before_loading_weights(saved_base):
    with pytest.raises(ConfigError, match="factor"):
        load_causal_lm(saved_base, rope_scaling={"type": "linear", "factor": 0.5})


def test_saved_weights_are_as_readable_as_the_config(saved_base):
    import os

    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in saved_base.iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~umask  # safetensors alone writes 0600
