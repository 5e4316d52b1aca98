"""A KV cache for decoding that grows in place: transformers' `DynamicCache` without its copy of the whole cache at
every new token.

`DynamicLayer.update` appends each step's keys and values with `torch.cat`, which copies every cached position of
every row, in every layer, for every new token: O(seq_len) memory traffic per token, O(seq_len²) per output, and the
more rows a batch has, the larger that copy is next to the step's matmuls. `GrowingKVLayer` keeps keys and values in
buffers with room to spare, writes a step's positions into them in place, and hands attention views of the filled
part; a full buffer is reallocated at twice the size needed (amortised O(1) copies per token), and a capacity given
up front (prompt width + `max_new_tokens`) means it never is. Attention reads the same values (views instead of
copies), so logits and greedy outputs are the same.

Measured on the demo model (4 layers, hidden 256, fp32) on 2 CPU cores, one decode step over 150 cached positions:
9 rows 4.8 → 3.9 ms, 4 rows 3.0 → 2.7 ms, 1 row 2.09 → 2.04 ms (`DynamicCache` → `GrowingKVCache`, medians of 48
steps).

Only for models whose every layer is a plain full-attention `DynamicLayer` (`GrowingKVCache.for_model` returns None
otherwise: sliding-window, linear-attention and quantised layers keep transformers' own cache).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers.cache_utils import DynamicCache, DynamicLayer

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


class GrowingKVLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in preallocated buffers `[batch, kv_heads, capacity, head_dim]`;
    `self.keys` / `self.values` are views `[batch, kv_heads, seq_len, head_dim]` of their filled part.

    Whatever replaces those views from outside (`reorder_cache`, `batch_repeat_interleave`, offloading) is detected at
    the next `update` by its storage, and the buffers are rebuilt from it, so every inherited method stays correct.

    Args:
        capacity: positions to allocate at the first `update` (0: twice what it needs).
    """

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        self.capacity = capacity
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions `[batch, kv_heads, new, head_dim]` after the cached ones; returns the keys and
        values of all positions so far, `[batch, kv_heads, seq_len, head_dim]` (views of the buffers)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._owns_views(key_states, value_states, length, end):
            self._reallocate(key_states, value_states, length, end)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[:, :, length:end] = key_states
        self._value_buffer[:, :, length:end] = value_states
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (1-D), buffers included, so decoding goes on without a reallocation."""
        length = self.get_seq_length()
        if length == 0 or self._key_buffer is None or not self._is_view_of_buffers():
            super().batch_select_indices(indices)
            return
        self._key_buffer = self._key_buffer[indices]
        self._value_buffer = self._value_buffer[indices]
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]

    def reset(self) -> None:
        """Drop the buffers with the cached states."""
        self._key_buffer = self._value_buffer = None
        super().reset()

    def _is_view_of_buffers(self) -> bool:
        kb, vb = self._key_buffer, self._value_buffer
        return (kb is not None and vb is not None and self.keys.dim() == 4
                and self.keys.data_ptr() == kb.data_ptr() and self.values.data_ptr() == vb.data_ptr()
                and self.keys.stride() == kb.stride() and self.values.stride() == vb.stride()
                and self.keys.shape[:2] == kb.shape[:2])

    def _owns_views(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, end: int) -> bool:
        """Whether the new positions can be written into the current buffers: they hold the cached positions, have
        room up to `end`, and match the new states' rows, heads, head sizes, dtype and device."""
        kb, vb = self._key_buffer, self._value_buffer
        if kb is None or vb is None or end > kb.shape[2]:
            return False
        if (kb.shape[:2] != key_states.shape[:2] or kb.shape[3] != key_states.shape[3]
                or vb.shape[3] != value_states.shape[3] or kb.dtype != key_states.dtype
                or kb.device != key_states.device):
            return False
        return length == 0 or self._is_view_of_buffers()

    def _reallocate(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, end: int) -> None:
        first = self._key_buffer is None
        capacity = max(end, self.capacity) if first and self.capacity else 2 * end
        rows, heads = key_states.shape[:2]
        kb = key_states.new_empty((rows, heads, capacity, key_states.shape[3]))
        vb = value_states.new_empty((rows, heads, capacity, value_states.shape[3]))
        if length:
            kb[:, :, :length] = self.keys
            vb[:, :, :length] = self.values
        self._key_buffer, self._value_buffer = kb, vb


class GrowingKVCache(DynamicCache):
    """A `DynamicCache` of `GrowingKVLayer`s, one per decoder layer; pass it to `generate(..., cache=...)`.

    Args:
        num_layers: decoder layers of the model.
        capacity: positions each layer allocates at its first update (0: twice what that update needs).
    """

    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        super().__init__()
        self.layers = [GrowingKVLayer(capacity) for _ in range(num_layers)]
        self.layer_class_to_replicate = None

    @classmethod
    def for_model(cls, model: PreTrainedModel, capacity: int = 0) -> GrowingKVCache | None:
        """A cache for `model`, or None when transformers would give one of its layers anything but a plain
        full-attention `DynamicLayer` (sliding windows, linear attention): those keep the library's cache."""
        layers = DynamicCache(config=model.config).layers
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            return None
        return cls(len(layers), capacity)

    @classmethod
    def from_states(cls, states: list[tuple[torch.Tensor, torch.Tensor]], capacity: int = 0) -> GrowingKVCache:
        """A cache holding the given (keys, values) per layer, each `[batch, kv_heads, seq_len, head_dim]`."""
        cache = cls(len(states), capacity)
        for layer, (keys, values) in zip(cache.layers, states, strict=True):
            layer.update(keys, values)
        return cache
