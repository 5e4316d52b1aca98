"""The in-place KV cache of sampling (`orca8k.sampling.kv_cache`): the same states as transformers' `torch.cat`
cache through every operation generation uses, no copy per token, the same logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from orca8k.sampling.kv_cache import GrowingKVCache, GrowingKVLayer
from tests.fixtures.models import make_tiny_llama


def _states(rows: int, new: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, new, 4, generator=g), torch.randn(rows, 2, new, 3, generator=g)  # value dim ≠ key dim


def test_updates_write_in_place_and_return_what_concatenation_would():
    layer = GrowingKVLayer(capacity=8)
    ref_k, ref_v = _states(3, 5, 0)  # a prefill of 5 positions
    keys, values = layer.update(ref_k, ref_v)
    assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
    buffer = layer._key_buffer.data_ptr()
    assert layer._key_buffer.shape == (3, 2, 8, 4) and layer._value_buffer.shape == (3, 2, 8, 3)
    for step in range(3):  # positions 6-8 fit the capacity: no reallocation, no copy of the cached positions
        k, v = _states(3, 1, step + 1)
        ref_k, ref_v = torch.cat([ref_k, k], dim=2), torch.cat([ref_v, v], dim=2)
        keys, values = layer.update(k, v)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        assert layer._key_buffer.data_ptr() == buffer and keys.data_ptr() == buffer
    assert layer.get_seq_length() == 8
    k, v = _states(3, 1, 9)  # the 9th position: the buffers double (2 × 9), the cached positions move along
    keys, values = layer.update(k, v)
    assert layer._key_buffer.shape[2] == 18 and layer._key_buffer.data_ptr() != buffer
    assert torch.equal(keys, torch.cat([ref_k, k], dim=2)) and torch.equal(values, torch.cat([ref_v, v], dim=2))


def test_without_a_capacity_the_first_update_allocates_twice_its_length():
    layer = GrowingKVLayer()
    layer.update(*_states(1, 6, 0))
    assert layer._key_buffer.shape[2] == 12 and layer.get_seq_length() == 6


def test_dropping_rows_cropping_and_reordering_keep_the_states_right():
    layer = GrowingKVLayer(capacity=32)
    ref_k, ref_v = _states(4, 6, 0)
    layer.update(ref_k, ref_v)
    keep = torch.tensor([0, 2, 3])
    layer.batch_select_indices(keep)  # compaction: the finished row 1 leaves, buffers included
    ref_k, ref_v = ref_k[keep], ref_v[keep]
    assert layer._key_buffer.shape == (3, 2, 32, 4)
    k, v = _states(3, 1, 1)
    keys, values = layer.update(k, v)
    ref_k, ref_v = torch.cat([ref_k, k], dim=2), torch.cat([ref_v, v], dim=2)
    assert torch.equal(keys, ref_k) and torch.equal(values, ref_v) and keys.data_ptr() == layer._key_buffer.data_ptr()
    layer.crop(-2)  # a view of the buffers: the next update overwrites the dropped positions
    ref_k, ref_v = ref_k[:, :, :-2], ref_v[:, :, :-2]
    k, v = _states(3, 1, 2)
    keys, values = layer.update(k, v)
    ref_k, ref_v = torch.cat([ref_k, k], dim=2), torch.cat([ref_v, v], dim=2)
    assert torch.equal(keys, ref_k) and torch.equal(values, ref_v) and layer.get_seq_length() == 6
    order = torch.tensor([2, 0, 1])
    layer.reorder_cache(order)  # inherited: replaces the views with new tensors; the next update rebuilds buffers
    ref_k, ref_v = ref_k[order], ref_v[order]
    k, v = _states(3, 1, 3)
    keys, values = layer.update(k, v)
    assert torch.equal(keys, torch.cat([ref_k, k], dim=2)) and torch.equal(values, torch.cat([ref_v, v], dim=2))
    assert keys.data_ptr() == layer._key_buffer.data_ptr()
    layer.reset()
    assert layer._key_buffer is None and layer.get_seq_length() == 0


def test_from_states_holds_the_given_states():
    states = [_states(2, 5, 0), _states(2, 5, 1)]
    cache = GrowingKVCache.from_states(states, capacity=9)
    assert cache.get_seq_length() == 5 and len(cache.layers) == 2
    for layer, (k, v) in zip(cache.layers, states, strict=True):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v) and layer._key_buffer.shape[2] == 9


def test_only_plain_full_attention_models_get_it():
    from transformers import MistralConfig

    model = make_tiny_llama(64, layers=3)
    cache = GrowingKVCache.for_model(model, capacity=16)
    assert len(cache.layers) == 3 and all(type(layer) is GrowingKVLayer for layer in cache.layers)

    class Sliding:
        config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, sliding_window=8)

    assert GrowingKVCache.for_model(Sliding()) is None  # transformers gives it sliding-window layers


@pytest.mark.parametrize("rows", [1, 3])
def test_generation_with_it_gives_the_same_scores_and_tokens(rows):
    from transformers.cache_utils import DynamicCache

    model = make_tiny_llama(96, hidden_size=32, layers=2)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 96, (rows, 7), generator=g)
    mask = torch.ones_like(input_ids)
    mask[-1, :3] = 0  # the last row left-padded
    kw = {"attention_mask": mask, "max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False,
          "return_dict_in_generate": True, "output_scores": True, "pad_token_id": 2, "eos_token_id": 2}
    with torch.inference_mode():
        plain = model.generate(input_ids=input_ids, cache=DynamicCache(), **kw)
        growing = model.generate(input_ids=input_ids, cache=GrowingKVCache.for_model(model, capacity=7 + 12), **kw)
    assert torch.equal(growing.sequences, plain.sequences)
    assert growing.sequences.shape == (rows, 19)
    for a, b in zip(growing.scores, plain.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    layer = growing.cache.layers[0]
    assert layer._key_buffer.shape[2] == 19 and layer.keys.data_ptr() == layer._key_buffer.data_ptr()
