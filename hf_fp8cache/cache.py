"""QuantizedFP8Cache: a transformers ``Cache`` whose layers keep K and V as FP8 bytes.

Storage: per layer two contiguous fp8 buffers ``[B, H, capacity, D]`` that grow amortized (by at least 1/16 of
their capacity, in steps of 256 tokens), written in place by one fused Triton launch per update
(``kernels.quantize_append_kv``). Nothing copies the history per step.

Two read paths, chosen per update from the model config's attention implementation (the ``config`` given to the
cache): with ``attn_implementation="hf_fp8cache"`` (``attention.py``), ``update`` returns fp8 views of the buffers
and that attention reads the bytes directly; with any other implementation, ``update`` returns K/V dequantized by
one Triton launch into a workspace shared by all layers of the cache (one layer's K/V in the model dtype, reused
and grown amortized) -- valid until the next ``update`` of any layer, exactly how attention uses them. A cache
made without ``config`` always dequantizes.

First prefill: by default (``exact_prefill=True``) the first update of an empty layer returns the K/V it was
given, so the prompt attends over exact values (as transformers' own fp8 layer does); its FP8 copy is what later
tokens read. ``exact_prefill=False`` makes the prompt attend over the quantized values too.

This module and ``static_cache.py`` (its compileable twin) are the only ones coupled to transformers' Cache
internals.
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import ATTENTION_NAME
from .calibration import ONTHEFLY_HEADROOM, onthefly_scale
from .formats import FP8Format, resolve_format
from .kernels import RecentWindow, dequantize_kv, quantize_append_kv
from .kernels.reference import ring_read, ring_write
from .scales import KVScales, check_strategy

__all__ = [
    "QuantizedFP8Cache", "FP8Cache", "FP8CacheLayer", "check_full_attention", "resolve_cache_options",
    "model_layer_count", "layer_scales", "DequantWorkspace", "FP8LayerBase",
]  # fmt: skip

_GROWTH_STEP = 256  # tokens; capacity is always a multiple of it
_GROWTH_FRACTION = 16  # grow by at least capacity / 16: amortized O(1) copies per token, <= ~6 % spare bytes


class DequantWorkspace:
    """One reused K/V buffer per (device, dtype), shared by every layer of one cache. ``static=True`` marks each
    buffer as a fixed address for torch.compile / CUDA graphs (the static cache asks one size, so it never grows)."""

    def __init__(self, static: bool = False) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._static = static

    def views(
        self, device: torch.device, dtype: torch.dtype, shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = math.prod(shape)
        buffer = self._buffers.get((device, dtype))
        if buffer is None or buffer.numel() < 2 * n:
            old = 0 if buffer is None else buffer.numel()
            buffer = torch.empty(max(2 * n, old + old // 8), dtype=dtype, device=device)
            self._buffers[(device, dtype)] = buffer
            if self._static and not torch.compiler.is_compiling():
                torch._dynamo.mark_static_address(buffer)
        return buffer[:n].view(shape), buffer[n : 2 * n].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def __deepcopy__(self, memo: dict) -> DequantWorkspace:
        return DequantWorkspace(self._static)  # a scratch area: a copy of the cache gets its own, empty


class FP8LayerBase(CacheLayerMixin):
    """What the dynamic and the static FP8 layer share: settings, first scales, the read path they serve."""

    is_sliding = False
    is_croppable = True

    def __init__(
        self,
        fmt: FP8Format,
        strategy: str,
        scales: tuple[torch.Tensor, torch.Tensor] | None,
        calculate_kv_scales: bool,
        workspace: DequantWorkspace,
        layer_idx: int,
        attention_config=None,
    ) -> None:  # CacheLayerMixin.__init__ is not called: it assigns ``keys``, a property of the dynamic layer
        self.fmt = fmt
        self._attention_config = attention_config  # the model config whose attention implementation we serve
        self.strategy = strategy
        self.calculate_kv_scales = calculate_kv_scales
        self.layer_idx = layer_idx
        self._given_scales = scales
        self._workspace = workspace
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None

    def _first_scales(self, key_states: torch.Tensor, unit_heads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Take dtype and device from the first K; return the given scales there (checked against its heads), or
        unit scales of ``unit_heads`` elements."""
        if not key_states.is_floating_point() or key_states.element_size() == 1:
            raise TypeError(f"layer {self.layer_idx}: key_states must be fp16/bf16/fp32, got {key_states.dtype}")
        self.dtype, self.device = key_states.dtype, key_states.device
        heads = key_states.shape[1]
        if self._given_scales is None:
            unit = torch.ones(unit_heads, dtype=torch.float32, device=self.device)
            return unit, unit.clone()
        key_scale, value_scale = (s.to(self.device, torch.float32).contiguous() for s in self._given_scales)
        if key_scale.numel() not in (1, heads):
            raise ValueError(
                f"layer {self.layer_idx}: per-head scales are for {key_scale.numel()} KV heads "
                f"but key_states has {heads}"
            )
        return key_scale, value_scale

    def _onthefly_scales(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """vLLM's first-prefill rule (``calibration.onthefly_scale``) for K and V of this layer's strategy."""
        return (
            onthefly_scale(key_states, self.fmt, self.strategy, ONTHEFLY_HEADROOM["key"]),
            onthefly_scale(value_states, self.fmt, self.strategy, ONTHEFLY_HEADROOM["value"]),
        )

    def _serves_fp8_attention(self) -> bool:
        return getattr(self._attention_config, "_attn_implementation", None) == ATTENTION_NAME

    def offload(self) -> None:
        raise NotImplementedError("the FP8 cache does not support offloading to CPU")

    def prefetch(self) -> None:
        raise NotImplementedError("the FP8 cache does not support offloading to CPU")


class FP8CacheLayer(FP8LayerBase):
    """One attention layer's FP8 K/V storage (see the module docstring)."""

    is_compileable = False

    def __init__(
        self,
        fmt: FP8Format,
        strategy: str,
        scales: tuple[torch.Tensor, torch.Tensor] | None,
        calculate_kv_scales: bool,
        exact_prefill: bool,
        workspace: DequantWorkspace,
        layer_idx: int,
        attention_config=None,
        residual_length: int = 0,
    ) -> None:
        super().__init__(fmt, strategy, scales, calculate_kv_scales, workspace, layer_idx, attention_config)
        self.exact_prefill = exact_prefill
        self.residual_length = residual_length
        self._key_bytes: torch.Tensor | None = None  # uint8 [B, H, capacity, D]
        self._value_bytes: torch.Tensor | None = None
        self._recent_keys: torch.Tensor | None = None  # model dtype [B, H, residual_length, D], a ring buffer
        self._recent_values: torch.Tensor | None = None
        self.recent_start = 0  # positions [recent_start, length) are also held exactly in the ring
        self.key_scale = self.value_scale = self.key_inv_scale = self.value_inv_scale = None
        self._scales_pending = False
        self.length = 0
        self.is_initialized = False

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        """The cached keys as fp8 ``[B, H, S, D]`` (a view; multiply by ``key_scale`` to dequantize)."""
        return None if self._key_bytes is None else self._key_bytes[:, :, : self.length].view(self.fmt.dtype)

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._value_bytes is None else self._value_bytes[:, :, : self.length].view(self.fmt.dtype)

    @property
    def key_bytes(self) -> torch.Tensor | None:
        """The whole key buffer, uint8 ``[B, H, capacity, D]`` (the first ``length`` tokens are valid)."""
        return self._key_bytes

    @property
    def value_bytes(self) -> torch.Tensor | None:
        return self._value_bytes

    @property
    def capacity(self) -> int:
        return 0 if self._key_bytes is None else self._key_bytes.shape[2]

    @property
    def recent_window(self) -> RecentWindow | None:
        """The exact K/V of the most recent tokens (``residual_length`` > 0), as the decode kernel takes them."""
        if self._recent_keys is None:
            return None
        return RecentWindow(self._recent_keys, self._recent_values, self.recent_start)

    @property
    def _ring_nbytes(self) -> int:
        return 0 if self._recent_keys is None else 2 * self._recent_keys.numel() * self._recent_keys.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes holding cached tokens (FP8 K and V), the exact recent window and the scales."""
        if self._key_bytes is None:
            return 0
        B, H, _, D = self._key_bytes.shape
        return 2 * B * H * self.length * D + self._ring_nbytes + 2 * self.key_scale.numel() * 4

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of the FP8 buffers including spare capacity, the exact recent window and the scales."""
        if self._key_bytes is None:
            return 0
        return 2 * self._key_bytes.numel() + self._ring_nbytes + 2 * self.key_scale.numel() * 4

    def _set_scales(self, key_scale: torch.Tensor, value_scale: torch.Tensor) -> None:
        self.key_scale, self.value_scale = key_scale, value_scale
        self.key_inv_scale, self.value_inv_scale = 1.0 / key_scale, 1.0 / value_scale

    # -- Cache layer API -------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._set_scales(*self._first_scales(key_states))
        B, H, _, D = key_states.shape
        self._scales_pending = self.calculate_kv_scales
        if self._key_bytes is not None and (
            self._key_bytes.device != self.device
            or self._key_bytes.shape[:2] != (B, H)
            or self._key_bytes.shape[3] != D
        ):
            self._key_bytes = self._value_bytes = None  # reused after reset() only when the shape still fits
        ring_shape = (B, H, self.residual_length, D)
        if self.residual_length and (
            self._recent_keys is None
            or self._recent_keys.shape != ring_shape
            or (self._recent_keys.dtype, self._recent_keys.device) != (self.dtype, self.device)
        ):
            self._recent_keys = torch.empty(ring_shape, dtype=self.dtype, device=self.device)
            self._recent_values = torch.empty_like(self._recent_keys)
        self.length = self.recent_start = 0
        self.is_initialized = True

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.dim() != 4 or value_states.shape != key_states.shape:
            raise ValueError(
                f"layer {self.layer_idx}: key_states {tuple(key_states.shape)} and value_states "
                f"{tuple(value_states.shape)} must have the same [B, H, S, D] shape"
            )
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if t.dtype != self.dtype or t.device != self.device:
                raise ValueError(
                    f"layer {self.layer_idx}: {name} is {t.dtype} on {t.device} but this cache holds {self.dtype} on "
                    f"{self.device}; call reset() before changing dtype or device"
                )
        if self._key_bytes is not None and self.length > 0:
            B, H, _, D = self._key_bytes.shape
            if (key_states.shape[0], key_states.shape[1], key_states.shape[3]) != (B, H, D):
                raise ValueError(
                    f"layer {self.layer_idx}: key_states {tuple(key_states.shape)} does not continue a cache of batch "
                    f"{B}, {H} heads, head dim {D}"
                )

    def _reserve(self, needed: int, like: torch.Tensor) -> None:
        if self._key_bytes is not None and needed <= self.capacity:
            return
        capacity = max(needed, self.capacity + self.capacity // _GROWTH_FRACTION)
        capacity = -(-capacity // _GROWTH_STEP) * _GROWTH_STEP
        B, H, _, D = like.shape
        key_bytes = torch.empty(B, H, capacity, D, dtype=torch.uint8, device=self.device)
        value_bytes = torch.empty_like(key_bytes)
        if self.length > 0:
            key_bytes[:, :, : self.length] = self._key_bytes[:, :, : self.length]
            value_bytes[:, :, : self.length] = self._value_bytes[:, :, : self.length]
        self._key_bytes, self._value_bytes = key_bytes, value_bytes

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append K/V ``[B, H, S, D]`` as FP8 and return what attention reads (see the module docstring)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_states(key_states, value_states)
        new_tokens = key_states.shape[2]
        if self._scales_pending and new_tokens > 0:
            self._set_scales(*self._onthefly_scales(key_states, value_states))
            self._scales_pending = False
        start = self.length
        self._reserve(start + new_tokens, key_states)
        quantize_append_kv(
            key_states, value_states, self._key_bytes, self._value_bytes, start,
            self.key_inv_scale, self.value_inv_scale, self.fmt,
        )  # fmt: skip
        self.length = start + new_tokens
        if self._recent_keys is not None:
            ring_write(self._recent_keys, key_states, start)
            ring_write(self._recent_values, value_states, start)
        self.recent_start = max(self.recent_start, self.length - self.residual_length)
        if start == 0 and self.exact_prefill:
            return key_states, value_states
        if self._serves_fp8_attention():
            return self._fp8_views()
        return self.dequantized()

    def _fp8_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fp8 ``[B, H, length, D]`` views of the buffers, tagged with this layer for the FP8 attention."""
        keys, values = self.keys, self.values
        keys.hf_fp8cache_layer = values.hf_fp8cache_layer = self
        return keys, values

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the cached tokens in the model dtype, in the cache's shared workspace (valid until the next
        update of any layer)."""
        B, H, _, D = self._key_bytes.shape
        key_out, value_out = self._workspace.views(self.device, self.dtype, (B, H, self.length, D))
        dequantize_kv(
            self._key_bytes, self._value_bytes, self.length, self.key_scale, self.value_scale, self.fmt,
            key_out, value_out,
        )  # fmt: skip
        if self.recent_start < self.length:  # the exact window replaces its dequantized tokens
            ring_read(self._recent_keys, self.recent_start, self.length, out=key_out[:, :, self.recent_start :])
            ring_read(self._recent_values, self.recent_start, self.length, out=value_out[:, :, self.recent_start :])
        return key_out, value_out

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Forget the tokens (buffers are kept for reuse); on-the-fly scales are recomputed at the next prefill."""
        self.length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many tokens from the end. Positive: keep that many (transformers <= 5.19 meaning)."""
        if tokens_to_remove > 0:
            self.length = min(self.length, tokens_to_remove)
        else:
            self.length = max(0, self.length + tokens_to_remove)
        self.recent_start = min(self.recent_start, self.length)  # the ring still holds what remains of the window

    def _map_batch(self, select) -> None:
        """Apply a batch-dim selection to the filled part of both buffers (capacity is kept) and to the ring."""
        if self._key_bytes is None or self.length == 0:
            return
        if self._recent_keys is not None:
            self._recent_keys, self._recent_values = select(self._recent_keys), select(self._recent_values)
        buffers = []
        for old in (self._key_bytes, self._value_bytes):
            chosen = select(old[:, :, : self.length])
            new = torch.empty((chosen.shape[0], *old.shape[1:]), dtype=old.dtype, device=old.device)
            new[:, :, : self.length] = chosen
            buffers.append(new)
        self._key_bytes, self._value_bytes = buffers

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])


def check_full_attention(config) -> None:
    """Raise for models with sliding-window, chunked or other non-full attention layers (not supported yet)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
            layer_types = ["sliding_attention"]
        elif getattr(config, "attention_chunk_size", None) is not None:
            layer_types = ["chunked_attention"]
        else:
            layer_types = ["full_attention"]
    unsupported = sorted(set(layer_types) - {"full_attention"})
    if unsupported:
        raise NotImplementedError(
            f"{type(config).__name__} has {unsupported} layers; the FP8 caches support only full-attention "
            "layers for now"
        )


def resolve_cache_options(
    kv_cache_dtype: str | torch.dtype | FP8Format,
    calculate_kv_scales: bool,
    strategy: str | None,
    scales: KVScales | None,
) -> tuple[FP8Format, str]:
    """The format and strategy of a cache from its constructor arguments, refusing conflicting ones."""
    fmt = resolve_format(kv_cache_dtype)
    if scales is not None and not isinstance(scales, KVScales):
        raise TypeError(f"scales must be a KVScales, got {type(scales).__name__}")
    if scales is not None and calculate_kv_scales:
        raise ValueError("give either scales or calculate_kv_scales=True, not both")
    if scales is not None and strategy is not None and strategy != scales.strategy:
        raise ValueError(f"strategy={strategy!r} conflicts with the scales' strategy {scales.strategy!r}")
    return fmt, check_strategy(strategy or (scales.strategy if scales is not None else "tensor"))


def model_layer_count(config, scales: KVScales | None) -> int:
    """The decoder's number of layers, after refusing layer types we do not support and scales that do not fit."""
    text_config = config.get_text_config(decoder=True)
    check_full_attention(text_config)
    if scales is not None:
        scales.check_model(text_config.num_hidden_layers, text_config.num_key_value_heads)
    return text_config.num_hidden_layers


def checkpoint_scales(
    name_or_path, kv_cache_dtype: str | torch.dtype | FP8Format, **loader_options
) -> tuple[FP8Format, KVScales]:
    """The storage format and a checkpoint's KV scales for it (``from_pretrained`` of both caches).
    ``loader_options`` go to ``checkpoint.load_kv_scales`` (``missing``, ``revision``, ``token``, ``cache_dir``,
    ``local_files_only``). Checkpoint scales are calibrated for e4m3fn; stored as ROCm e4m3fnuz (max 240) they are
    doubled, as vLLM does."""
    from .checkpoint import load_kv_scales

    fmt = resolve_format(kv_cache_dtype)
    scales = load_kv_scales(name_or_path, **loader_options)
    return fmt, scales.scaled(2.0) if fmt.name == "e4m3fnuz" else scales


def layer_scales(scales: KVScales | None, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One layer's (key, value) scales from ``scales``, or None without scales."""
    if scales is None:
        return None
    if layer_idx >= scales.num_layers:
        raise ValueError(f"scales cover {scales.num_layers} layers but the model updates layer {layer_idx}")
    return scales.key[layer_idx], scales.value[layer_idx]


class QuantizedFP8Cache(Cache):
    """A transformers Cache that stores K and V in FP8 (half the bytes of bf16).

    Args:
        config: the model's config (optional). With it, layers are created up front, unsupported layer types
            (sliding window, chunked, linear attention) are refused, and ``scales`` are checked against the model.
            Without it, layers are created on first use.
        kv_cache_dtype: ``"fp8"`` / ``"fp8_e4m3"`` (e4m3fn, default), ``"fp8_e5m2"``, or see ``formats.py``.
        calculate_kv_scales: compute scales from each layer's first prefill (``calibration.onthefly_scale``).
        strategy: ``"tensor"`` or ``"attn_head"`` (per KV head). Defaults to the scales' own, else ``"tensor"``.
        scales: a ``KVScales`` (e.g. from a checkpoint or calibration). Without scales and without
            ``calculate_kv_scales`` every scale is 1.0 (vLLM's default).
        exact_prefill: the first prefill attends over the exact K/V it was given (default) rather than FP8.
        residual_length: also keep the K/V of the most recent ``residual_length`` tokens in the model dtype (a ring
            buffer per layer), and let attention read those exactly; older tokens are read from FP8. Costs
            ``residual_length`` tokens in the model dtype per layer (e.g. 16 tokens: 1.6 % of the FP8 bytes at
            2K tokens). 0 (default) is pure FP8, like vLLM; transformers' ``QuantizedCache`` uses the same name.
    """

    def __init__(
        self,
        config=None,
        kv_cache_dtype: str | torch.dtype = "fp8",
        calculate_kv_scales: bool = False,
        strategy: str | None = None,
        scales: KVScales | None = None,
        exact_prefill: bool = True,
        residual_length: int = 0,
    ) -> None:
        self.format, self.strategy = resolve_cache_options(kv_cache_dtype, calculate_kv_scales, strategy, scales)
        if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length must be an int >= 0, got {residual_length!r}")
        self.residual_length = residual_length
        self.scales = scales
        self.calculate_kv_scales = calculate_kv_scales
        self.exact_prefill = exact_prefill
        self._workspace = DequantWorkspace()
        self._attention_config = config
        layers = []
        if config is not None:
            layers = [self._new_layer(i) for i in range(model_layer_count(config, scales))]
        super().__init__(layers=layers)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path,
        config=None,
        kv_cache_dtype: str | torch.dtype = "fp8",
        missing: str = "error",
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir=None,
        local_files_only: bool = False,
        **kwargs,
    ) -> QuantizedFP8Cache:
        """A cache with the KV scales of a checkpoint (local directory or Hub id; see ``checkpoint_scales``). Other
        keyword arguments go to the constructor (``exact_prefill``, ``residual_length``)."""
        fmt, scales = checkpoint_scales(name_or_path, kv_cache_dtype, missing=missing, revision=revision, token=token,
                                        cache_dir=cache_dir, local_files_only=local_files_only)  # fmt: skip
        return cls(config=config, kv_cache_dtype=fmt, scales=scales, **kwargs)

    def _new_layer(self, layer_idx: int) -> FP8CacheLayer:
        return FP8CacheLayer(self.format, self.strategy, layer_scales(self.scales, layer_idx), self.calculate_kv_scales,
                             self.exact_prefill, self._workspace, layer_idx, self._attention_config,
                             self.residual_length)  # fmt: skip

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(self._new_layer(len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    @property
    def nbytes(self) -> int:
        """Bytes holding cached tokens in every layer (FP8 K and V, the exact recent windows, scales)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of all FP8 buffers including spare capacity, plus the exact recent windows and scales."""
        return sum(layer.allocated_nbytes for layer in self.layers)

    @property
    def workspace_nbytes(self) -> int:
        """Bytes of the shared dequantization workspace (one layer's K/V in the model dtype)."""
        return self._workspace.nbytes

    def __repr__(self) -> str:
        return (
            f"QuantizedFP8Cache(format={self.format.name}, strategy={self.strategy!r}, layers={len(self.layers)}, "
            f"tokens={self.get_seq_length()}, nbytes={self.nbytes})"
        )


FP8Cache = QuantizedFP8Cache
