"""An independent oracle for the FP8 caches: transformers' own ``DynamicCache`` storing fake-quantized K/V.

It shares no code with ``hf_fp8cache`` (not even its reference kernels): values are encoded by torch's own cast,
``(x / scale).clamp(-fmax, fmax).to(float8).to(x.dtype) * scale`` (torch 2.13 CPU casts round to nearest even; the
clamp makes saturation explicit on older torch, which gives NaN above 464). Everything else -- growth, crop,
reorder, batch selection, deepcopy, reset -- is ``DynamicLayer``'s, so the FP8 caches must behave like it.

Semantics mirrored from the FP8 caches' defaults: unit scales, and ``exact_prefill``: the first update of an empty
layer returns the exact K/V it was given (the FP8 copy is what later tokens read). ``onthefly_mask`` gives
vLLM's first-prefill scales (``amax / 200`` for K, ``amax / 100`` for V, per tensor) taken over the positions the
mask marks as real tokens only (left padding excluded); 1.0 where the amax is 0.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import (
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndFullAttentionLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0
KEY_SCALE_DIVISOR, VALUE_SCALE_DIVISOR = 200.0, 100.0  # vLLM's K_SCALE_CONSTANT, V_SCALE_CONSTANT


def fake_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x stored as e4m3fn with a per-tensor or per-head ``scale`` and read back in x's dtype."""
    s = scale.to(x.device, torch.float32).reshape(1, -1, 1, 1)
    return ((x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).float() * s).to(x.dtype)  # fp32 math, like the caches


def masked_amax_scale(x: torch.Tensor, mask: torch.Tensor, divisor: float) -> torch.Tensor:
    """vLLM's on-the-fly scale ``amax / divisor`` of ``x`` ``[B, H, S, D]`` over the positions where ``mask``
    ``[B, S]`` is 1 (the last S columns of the mask, as a prompt's K/V)."""
    real = mask[:, -x.shape[2] :].bool().to(x.device)[:, None, :, None]
    amax = x.detach().abs().masked_fill(~real, 0).amax().float()
    return torch.where(amax > 0, amax / divisor, torch.ones_like(amax)).reshape(1)


class FakeFP8Layer(DynamicLayer):
    """A ``DynamicLayer`` holding fake-quantized K/V (see the module docstring)."""

    def __init__(self, exact_prefill: bool = True, onthefly_mask: torch.Tensor | None = None) -> None:
        super().__init__()
        self.exact_prefill = exact_prefill
        self.onthefly_mask = onthefly_mask
        self.key_scale = self.value_scale = torch.ones(1)
        self._scales_pending = onthefly_mask is not None

    def update(self, key_states, value_states, *args, **kwargs):
        empty = self.get_seq_length() == 0
        if self._scales_pending and key_states.shape[2] > 0:
            self.key_scale = masked_amax_scale(key_states, self.onthefly_mask, KEY_SCALE_DIVISOR)
            self.value_scale = masked_amax_scale(value_states, self.onthefly_mask, VALUE_SCALE_DIVISOR)
            self._scales_pending = False
        keys, values = super().update(fake_fp8(key_states, self.key_scale), fake_fp8(value_states, self.value_scale))
        if empty and self.exact_prefill:
            return key_states, value_states
        return keys, values


class UnitFakeFP8:
    """Mixed into one of transformers' K/V layer classes: its K/V stored fake-quantized with unit scales; it keeps
    and returns what that class does, except that the first update of an empty layer returns the exact K/V."""

    def update(self, key_states, value_states, *args, **kwargs):
        empty = self.get_seq_length() == 0
        one = torch.ones(1)
        keys, values = super().update(fake_fp8(key_states, one), fake_fp8(value_states, one))
        if empty:
            return key_states, value_states
        return keys, values


class FakeFP8SlidingLayer(UnitFakeFP8, DynamicSlidingWindowLayer):
    """transformers' sliding-window layer holding fake-quantized K/V with unit scales (``UnitFakeFP8``)."""


def fake_fp8_cache(config, exact_prefill: bool = True, onthefly_mask: torch.Tensor | None = None) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers are ``FakeFP8Layer`` and whose sliding-window
    layers (as transformers built them from the config) are ``FakeFP8SlidingLayer``."""
    cache = DynamicCache(config=config)
    cache.layers = [
        FakeFP8SlidingLayer(layer.sliding_window) if isinstance(layer, DynamicSlidingWindowLayer)
        else FakeFP8Layer(exact_prefill, onthefly_mask)
        for layer in cache.layers
    ]  # fmt: skip
    return cache


def _exact_where_written(returned: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """What a static layer returns from its first update with that update's positions (its first S) made exact."""
    returned = returned.clone()
    returned[:, :, : exact.shape[2]] = exact
    return returned


class FakeFP8StaticLayer(StaticLayer):
    """transformers' static full-attention layer holding fake-quantized K/V with unit scales; the first update of an
    empty layer returns the exact K/V in the positions it wrote."""

    def update(self, key_states, value_states, *args, **kwargs):
        empty = int(self.get_seq_length()) == 0
        one = torch.ones(1)
        keys, values = super().update(fake_fp8(key_states, one), fake_fp8(value_states, one))
        if empty:
            return _exact_where_written(keys, key_states), _exact_where_written(values, value_states)
        return keys, values


class FakeFP8StaticSlidingLayer(StaticSlidingWindowLayer):
    """transformers' static sliding-window layer holding fake-quantized K/V with unit scales: it keeps, returns and
    masks what its parent does; the first update of an empty layer returns the exact K/V in the positions it wrote
    (the first S of what it returns: the buffer when the prompt fits the window, else the prompt itself)."""

    def update(self, key_states, value_states, *args, **kwargs):
        empty = self.get_seq_length() == 0
        one = torch.ones(1)
        keys, values = super().update(fake_fp8(key_states, one), fake_fp8(value_states, one))
        if empty:
            return _exact_where_written(keys, key_states), _exact_where_written(values, value_states)
        return keys, values


def fake_fp8_static_cache(config, max_cache_len: int) -> StaticCache:
    """A ``StaticCache`` for ``config`` whose layers (as transformers built them from the config) are
    ``FakeFP8StaticLayer`` and ``FakeFP8StaticSlidingLayer``."""
    cache = StaticCache(config=config, max_cache_len=max_cache_len)
    cache.layers = [
        # a sliding layer keeps min(window, max_cache_len) tokens as its max_cache_len: that min again is itself
        FakeFP8StaticSlidingLayer(max_cache_len=layer.max_cache_len, sliding_window=layer.max_cache_len)
        if isinstance(layer, StaticSlidingWindowLayer)
        else FakeFP8StaticLayer(max_cache_len=max_cache_len)
        for layer in cache.layers
    ]  # fmt: skip
    return cache


class FakeFP8HybridLayer(UnitFakeFP8, LinearAttentionAndFullAttentionLayer):
    """transformers' hybrid layer (linear-attention / SSM states and full-attention K/V, e.g. Falcon-H1) whose K/V
    are fake-quantized with unit scales (``UnitFakeFP8``); its states are transformers' own, untouched."""


def fake_fp8_hybrid_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` (unit scales, exact first prefill) in which only the layers holding K/V are
    replaced: full attention by ``FakeFP8Layer``, sliding by ``FakeFP8SlidingLayer``, full-attention hybrids by
    ``FakeFP8HybridLayer``. Linear-attention, conv, KV-shared and cache-less layers stay as transformers built them."""
    cache = DynamicCache(config=config)
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            cache.layers[i] = FakeFP8Layer()
        elif type(layer) is DynamicSlidingWindowLayer:
            cache.layers[i] = FakeFP8SlidingLayer(layer.sliding_window)
        elif type(layer) is LinearAttentionAndFullAttentionLayer:
            cache.layers[i] = FakeFP8HybridLayer(number_of_states=layer.number_of_states)
        elif isinstance(layer, DynamicLayer):
            raise NotImplementedError(f"the oracle has no fake-quantized twin of {type(layer).__name__}")
    return cache
