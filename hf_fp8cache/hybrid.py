"""Models whose layers are not all attention: how a cache is built from any config, and the hybrid layer.

``build_layers`` makes one cache layer per decoder layer exactly as transformers' caches do: the caller's FP8 layer
for every layer holding K/V (full, sliding, chunked attention), transformers' own classes for layers that keep only
states or nothing -- linear-attention, SSM and conv states (``LinearAttentionLayer``: Qwen3-Next, Qwen3.5, Jamba,
Granite 4, LFM2), layers sharing another layer's K/V or without a cache (``DummyLayer``, Gemma 3n / Gemma 4) -- and
``FP8HybridLayer`` for layers holding both (Falcon-H1). Both caches build their layers through it, and read a
checkpoint's scales for such models through ``model_checkpoint_scales``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, CacheLayerMixin, LinearAttentionLayer

from .cache_base import (
    HYBRID_LAYER_TYPES,
    KV_LAYER_TYPES,
    check_token_head_options,
    checkpoint_scales,
    decoder_layer_types,
    kv_layer_indices,
    model_layer_types,
    state_layer_types,
    with_state_layer_placeholders,
)
from .formats import TOKEN_HEAD, FP8Format, resolve_fp8_format, resolve_kv_cache_dtype
from .scales import KVScales

__all__ = ["FP8HybridLayer", "build_layers", "model_checkpoint_scales"]


class FP8HybridLayer(LinearAttentionLayer, CacheLayerMixin):
    """A layer holding linear-attention / SSM states and K/V (transformers' ``hybrid`` and ``hybrid_sliding``
    types, e.g. Falcon-H1). The states are transformers' own ``LinearAttentionLayer`` code and fields, untouched; K/V
    live in ``attention`` (an FP8 layer, or any cache layer), which attention reads as usual. Every operation does
    what transformers' ``LinearAttentionAndFullAttentionLayer`` / ``...SlidingWindowAttentionLayer`` do: reset,
    reorder and crop both parts; batch repeat / select and the maximum length as transformers' hybrid layers (K/V
    only; -1)."""

    def __init__(self, attention: CacheLayerMixin, number_of_states: int = 1, **kwargs) -> None:
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)
        self.attention = attention

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.attention.update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        return self.attention.get_seq_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.attention.get_mask_sizes(query_length)

    @property
    def is_compileable(self) -> bool:
        return self.attention.is_compileable  # as transformers: its dynamic hybrid layers are not, its static ones are

    @property
    def is_sliding(self) -> bool:
        return self.attention.is_sliding

    @property
    def is_initialized(self) -> bool:
        return self.attention.is_initialized

    @property
    def is_croppable(self) -> bool:
        return LinearAttentionLayer.is_croppable.fget(self) and self.attention.is_croppable

    @property
    def keys(self):
        return self.attention.keys

    @property
    def values(self):
        return self.attention.values

    @property
    def nbytes(self) -> int:
        return self.attention.nbytes

    @property
    def allocated_nbytes(self) -> int:
        return self.attention.allocated_nbytes

    def reset(self) -> None:
        LinearAttentionLayer.reset(self)
        self.attention.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        LinearAttentionLayer.reorder_cache(self, beam_idx)
        self.attention.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        LinearAttentionLayer.crop(self, tokens_to_remove)
        self.attention.crop(tokens_to_remove)

    def activate_past_recording(self) -> None:
        LinearAttentionLayer.activate_past_recording(self)
        if hasattr(self.attention, "activate_past_recording"):
            self.attention.activate_past_recording()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.attention.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices) -> None:
        self.attention.batch_select_indices(indices)

    def offload(self) -> None:
        self.attention.offload()

    def prefetch(self) -> None:
        self.attention.prefetch()


def build_layers(config, kv_layer) -> list:
    """One cache layer per decoder layer of ``config``, as transformers' ``DynamicCache`` builds them, with K/V in
    ``kv_layer(layer_idx, layer_type, sliding_window)`` (``layer_type``: ``"full_attention"`` or a sliding type):

    - full, sliding and chunked attention: ``kv_layer``;
    - hybrid (states and K/V): ``FP8HybridLayer`` around ``kv_layer``;
    - linear attention, conv, KV-shared and cache-less layers: transformers' own class for that type.

    Other types (e.g. the indexed sparse attention of DeepSeek V3.2) are refused, naming them."""
    states = state_layer_types()
    layers = []
    for i, (layer_type, kwargs) in enumerate(model_layer_types(config, supported=(*KV_LAYER_TYPES, *states))):
        if layer_type in states:
            layers.append(DYNAMIC_LAYER_TYPE_MAPPING[layer_type](**kwargs))
        elif layer_type in HYBRID_LAYER_TYPES:
            attention = kv_layer(i, HYBRID_LAYER_TYPES[layer_type], kwargs.get("sliding_window"))
            layers.append(FP8HybridLayer(attention, **kwargs))
        else:
            layers.append(kv_layer(i, layer_type, kwargs.get("sliding_window")))
    return layers


def _has_state_layers(config) -> bool:
    """Whether some decoder layer of ``config`` holds no K/V of its own (linear attention, SSM, conv, KV sharing)."""
    return len(kv_layer_indices(config)) < config.get_text_config(decoder=True).num_hidden_layers


def model_checkpoint_scales(
    name_or_path, config, kv_cache_dtype: str | torch.dtype, *, missing: str = "error", strategy: str | None = None,
    **options,
) -> tuple[FP8Format, KVScales]:  # fmt: skip
    """``cache_base.checkpoint_scales`` for ``config``'s model (``from_pretrained`` of both caches). A model with
    layers that hold no K/V needs scales on its K/V layers only (matched by layer index); the others get 1.0, never
    read. ``options``: ``checkpoint.load_kv_scales``'s ``revision``, ``token``, ``cache_dir``, ``local_files_only``.
    Per-token-head scales (``strategy``, or a ``kv_cache_dtype`` that implies it) are refused before anything loads:
    checkpoints hold per-tensor / per-head scales."""
    if TOKEN_HEAD in (strategy, resolve_kv_cache_dtype(kv_cache_dtype)[1]):
        check_token_head_options(False, True, what="a checkpoint's scales (from_pretrained)")
    if config is None or not _has_state_layers(config):
        return checkpoint_scales(name_or_path, kv_cache_dtype, missing=missing, **options)
    from .checkpoint import read_checkpoint_scales, to_kv_scales

    fmt = resolve_fp8_format(kv_cache_dtype, "a checkpoint's scales (from_pretrained)")
    found = read_checkpoint_scales(name_or_path, **options)
    found = with_state_layer_placeholders(found, decoder_layer_types(config))
    scales = to_kv_scales(found, missing=missing)
    return fmt, scales.scaled(2.0) if fmt.name == "e4m3fnuz" else scales  # as checkpoint_scales: vLLM's ROCm rule
