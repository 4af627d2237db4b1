"""What the dynamic (``cache.py``) and the static (``static_cache.py``) FP8 caches share: the layer base with its
scale handling and read-path choice, the dequantization workspace, the per-step row starts, option resolution.

This module, ``cache.py`` and ``static_cache.py`` are the only ones coupled to transformers' Cache internals.
"""

from __future__ import annotations

import math
import warnings
import weakref

import torch
from transformers.cache_utils import CacheLayerMixin

from .contract import (
    ATTENTION_NAME,
    LAYER_ATTRIBUTE,
    PendingWrite,
    attended_positions,
    kv_start_from_mask,
    rows_with_inner_padding,
)
from .formats import INT8, TOKEN_HEAD, FP8Format, StorageFormat, resolve_fp8_format, resolve_kv_cache_dtype
from .kernels import NewTokens
from .scales import ONTHEFLY_HEADROOM, KVScales, check_scale_range, check_strategy, onthefly_scale, outlier_warning
from .sharding import agree_across_ranks, local_head_scales

__all__ = ["FP8LayerBase"]


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


class RowStarts:
    """The first attended position of each batch row, computed once per attention mask and device and shared by the
    layers of a dynamic cache: every layer of one forward gets the same mask object (a new one each forward, so a
    batch that changes between steps is always seen). An in-place change of the mask is seen through its version.
    The mask is held weakly: a prefill's ``[B, 1, L, L]`` mask must not outlive its forward. ``inner_padding`` says
    whether some row's mask skips positions inside it (``rows_with_inner_padding``)."""

    def __init__(self) -> None:
        self._mask: weakref.ref | str | None = None  # a weak reference to the last mask, "none" for no mask
        self._version = -1
        self._starts: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._inner_padding: bool | None = None  # of the last mask
        self._checked_padding: bool | None = None  # of the last mask of several queries (a prefill, a chunk)

    def _seen(self, attention_mask: torch.Tensor | None) -> bool:
        if attention_mask is None:
            return self._mask == "none"
        return (
            isinstance(self._mask, weakref.ref)
            and self._mask() is attention_mask
            and attention_mask._version == self._version
        )

    def __call__(self, attention_mask: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if not self._seen(attention_mask):
            self._mask = "none" if attention_mask is None else weakref.ref(attention_mask)
            self._version = -1 if attention_mask is None else attention_mask._version
            self._starts, self._inner_padding = {}, None
        starts = self._starts.get((batch, device))
        if starts is None:
            starts = self._starts[(batch, device)] = kv_start_from_mask(attention_mask, batch, device)
        return starts

    def inner_padding(self, attention_mask: torch.Tensor | None) -> bool:
        """Whether some row of ``attention_mask`` (the mask of the last ``__call__``) has padding inside it. Padding
        enters a row with several new tokens at once (a prefill, a chunk, a next turn): such a mask is read (one host
        sync); a one-token step's mask, which ``generate`` extends by the new position, takes the last such answer,
        so decode steps never sync."""
        if self._inner_padding is None:
            if attention_mask is None:  # every position attended
                self._inner_padding = False
            else:
                if attention_mask.shape[-2] > 1 or self._checked_padding is None:
                    self._checked_padding = bool(rows_with_inner_padding(attention_mask))
                self._inner_padding = self._checked_padding
        return self._inner_padding

    def __deepcopy__(self, memo: dict) -> RowStarts:
        return RowStarts()  # derived state: a copy recomputes it


class FP8LayerBase(CacheLayerMixin):
    """What the dynamic and the static FP8 layer share: settings, first scales, the read path they serve, and the
    first prefill's write, which waits for the padding mask when on-the-fly scales are computed for our attention.

    Subclasses write with ``_write(key_states, value_states, start, valid)`` and hand attention
    ``attention_inputs(attention_mask)`` (``contract.py``)."""

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
        quantize_query: bool = False,
    ) -> None:  # CacheLayerMixin.__init__ is not called: it assigns ``keys``, a property of the dynamic layer
        self.fmt = fmt
        self.quantize_query = quantize_query  # our attention's products on e4m3 operands (``FP8AttentionInputs``)
        self._attention_config = attention_config  # the model config whose attention implementation we serve
        self.strategy = strategy
        self.calculate_kv_scales = calculate_kv_scales
        self.layer_idx = layer_idx
        self._given_scales = scales
        self._workspace = workspace
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None
        self._scales_pending = False  # on-the-fly scales come from the next prefill
        self._pending_write: PendingWrite | None = None  # K/V an update kept back
        self._key_scales: torch.Tensor | None = None  # bf16 [B, H, capacity] under strategy="token_head"
        self._value_scales: torch.Tensor | None = None

    # -- per-token-head scales (strategy="token_head") ----------------------------------------------------------
    @property
    def _token_scales(self) -> bool:
        return self.strategy == TOKEN_HEAD

    def _new_token_scales(self, B: int, H: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed bf16 ``[B, H, capacity]`` buffers for K's and V's per-token-head scales."""
        return (torch.zeros(B, H, capacity, dtype=torch.bfloat16, device=self.device),
                torch.zeros(B, H, capacity, dtype=torch.bfloat16, device=self.device))  # fmt: skip

    def _scale_nbytes(self, tokens: int) -> int:
        """Bytes of K's and V's scales: per token and head (bf16) for ``tokens`` tokens, or the fp32 scales."""
        if self._key_scales is not None:  # (strategy="token_head", initialized)
            return 2 * self._key_scales[:, :, :tokens].numel() * self._key_scales.element_size()
        return 2 * self.key_scale.numel() * 4

    def _read_scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The dequantization scales readers take: the per-token-head buffers, or the fp32 per-tensor / head scales."""
        if self._token_scales:
            return self._key_scales, self._value_scales
        return self.key_scale, self.value_scale

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
        model_heads, what = self._model_kv_heads(), f"layer {self.layer_idx}"
        # under tensor parallelism: the scales of this rank's heads (sharding.py)
        return (local_head_scales(key_scale, heads, model_heads, what),
                local_head_scales(value_scale, heads, model_heads, what))  # fmt: skip

    def _model_kv_heads(self) -> int | None:
        """The model's KV heads by its config (a tensor-parallel rank holds fewer), None without a config."""
        if self._attention_config is None:
            return None
        return getattr(self._attention_config.get_text_config(decoder=True), "num_key_value_heads", None)

    def _onthefly_scales(
        self, key_states: torch.Tensor, value_states: torch.Tensor, valid: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """vLLM's first-prefill rule (``scales.onthefly_scale``) for K and V over the ``valid`` positions (bool
        ``[B, S]``, None: all), with a warning when an outlier leaves most values below the smallest normal."""
        scales = []
        for kind, states in (("key", key_states), ("value", value_states)):
            scale = onthefly_scale(states, self.fmt, self.strategy, ONTHEFLY_HEADROOM[kind], valid)
            scale = agree_across_ranks(scale, self.strategy, states.shape[1], self._model_kv_heads())
            if not torch.compiler.is_compiling():  # one number read back, once per layer and prefill
                message = outlier_warning(states, scale, self.fmt, valid, f"layer {self.layer_idx} {kind}s")
                if message is not None:
                    warnings.warn(message, stacklevel=5)
            scales.append(scale)
        return scales[0], scales[1]

    def _serves_fp8_attention(self) -> bool:
        return getattr(self._attention_config, "_attn_implementation", None) == ATTENTION_NAME

    # -- the write of each update ------------------------------------------------------------------------------
    def _write_or_defer(self, key_states: torch.Tensor, value_states: torch.Tensor, start: int) -> bool:
        """Write K/V at ``start`` now, or -- for a prefill that sets on-the-fly scales while our attention runs --
        keep them until ``attention_inputs`` brings the padding mask, so padded positions stay out of the scales.
        Returns whether the write waits. The dequantize path never sees the mask: its scales include any padding
        (a warning says so for batches of more than one row)."""
        if self._scales_pending and key_states.shape[2] > 0 and self._serves_fp8_attention():
            frozen_start = start.clone() if isinstance(start, torch.Tensor) else start  # the caller advances its own
            tokens = NewTokens(key_states, value_states, self.key_inv_scale, self.value_inv_scale)
            self._pending_write = PendingWrite(tokens, frozen_start, claimable=False)
            return True
        self._warn_padding_counts(key_states)
        self._write(key_states, value_states, start, None)
        return False

    def _warn_padding_counts(self, key_states: torch.Tensor) -> None:
        """Say so when on-the-fly scales are about to come from a batch whose padding this layer cannot see."""
        if self._scales_pending and key_states.shape[2] > 0 and key_states.shape[0] > 1:
            warnings.warn(  # the same text for every layer, so Python shows it once
                "calculate_kv_scales with a batch of several rows, on a path that does not "
                "hand the cache the padding mask (an attention implementation other than "
                f"{ATTENTION_NAME!r}, or a sliding-window layer): the cache cannot see the padding mask, so the "
                f"on-the-fly scales include any padded positions. Use attn_implementation={ATTENTION_NAME!r} on "
                "full-attention layers to leave them out",
                stacklevel=5,
            )

    def _begin_update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """What every layer's ``update`` does first: write a prefill whose attention never came (over all
        positions), initialize the layer on its first K/V, and check the states against it (``_check_states``)."""
        self._finish_pending_write(None)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_states(key_states, value_states)

    def _finish_pending_write(self, attention_mask: torch.Tensor | None) -> None:
        """Do the write an update kept back (``contract.PendingWrite``) unless the decode kernel claimed it, leaving
        out positions ``attention_mask`` does not attend (they matter to on-the-fly scales only)."""
        pending, self._pending_write = self._pending_write, None
        if pending is None or pending.claimed:
            return
        key_states, value_states, start = pending.tokens.keys, pending.tokens.values, pending.start
        attended = attended_positions(attention_mask)
        valid = None if attended is None else attended[:, start : start + key_states.shape[2]].to(key_states.device)
        self._write(key_states, value_states, start, valid)

    def _set_onthefly_scales_from(
        self, key_states: torch.Tensor, value_states: torch.Tensor, valid: torch.Tensor | None
    ) -> None:
        """Set this layer's scales by the on-the-fly rule once (the first prefill after construction or reset)."""
        if self._scales_pending:
            self._set_scales(*self._onthefly_scales(key_states, value_states, valid))
            self._scales_pending = False

    def _tagged(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``key`` and ``value`` marked as this layer's, for the FP8 attention (``contract.LAYER_ATTRIBUTE``)."""
        setattr(key, LAYER_ATTRIBUTE, self)
        setattr(value, LAYER_ATTRIBUTE, self)
        return key, value

    def offload(self) -> None:
        raise NotImplementedError("the FP8 cache does not support offloading to CPU")

    def prefetch(self) -> None:
        raise NotImplementedError("the FP8 cache does not support offloading to CPU")


SLIDING_LAYER_TYPES = ("sliding_attention", "chunked_attention")  # transformers keeps both in a sliding layer
# transformers' layers holding linear-attention / SSM states and K/V together -> the attention type of their K/V
HYBRID_LAYER_TYPES = {"hybrid": "full_attention", "hybrid_sliding": "sliding_attention"}
# the layer types that hold their own K/V: the FP8 bytes of a cache (all other types keep states or nothing)
KV_LAYER_TYPES = ("full_attention", *SLIDING_LAYER_TYPES, *HYBRID_LAYER_TYPES)
# which layer types take each constructor argument (transformers <= 5.22 gives one dict for every layer)
_LAYER_ARGUMENT_TYPES = {
    "sliding_window": (*SLIDING_LAYER_TYPES, "hybrid_sliding"),
    "number_of_states": ("conv", "linear_attention", "hybrid", "hybrid_sliding"),
}


def state_layer_types() -> tuple[str, ...]:
    """The layer types transformers' ``DynamicCache`` builds with a class that keeps no K/V: linear attention and
    conv states (``LinearAttentionLayer``), layers without a cache or sharing another's K/V (``DummyLayer``, 5.23+;
    ``moe`` / ``mlp`` before). The FP8 cache builds these with transformers' own classes."""
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, CacheLayerMixin

    return tuple(t for t, cls in DYNAMIC_LAYER_TYPE_MAPPING.items() if not issubclass(cls, CacheLayerMixin))


def model_layer_types(config, *, supported: tuple[str, ...]) -> list[tuple[str, dict]]:
    """(layer type, its cache layer's keyword arguments) for every decoder layer, exactly as transformers' own
    caches build them (``cache_utils.get_layer_types_and_kwargs``: ``layer_types``, or ``sliding_window`` /
    ``attention_chunk_size`` when absent; chunked layers get the chunk size as their window). Each layer gets only
    the arguments of its type (transformers <= 5.22 gives every layer one dict: a full layer of a model with sliding
    layers would see a window). Types outside ``supported`` are refused, naming them."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text_config = config.get_text_config(decoder=True)
    layer_types, kwargs = get_layer_types_and_kwargs(text_config)
    per_layer = kwargs if isinstance(kwargs, list) else [kwargs] * len(layer_types)
    per_layer = [_arguments_of(layer_type, arguments) for layer_type, arguments in zip(layer_types, per_layer)]
    unsupported = sorted(set(layer_types) - set(supported))
    if unsupported:
        raise NotImplementedError(
            f"{type(text_config).__name__} has {unsupported} layers; this FP8 cache supports "
            f"{', '.join(supported)} layers for now"
        )
    return list(zip(layer_types, per_layer))


def _arguments_of(layer_type: str, arguments: dict) -> dict:
    """The constructor arguments in ``arguments`` that a layer of ``layer_type`` takes."""
    takes = lambda name: layer_type in _LAYER_ARGUMENT_TYPES.get(name, (layer_type,))
    return {name: value for name, value in arguments.items() if takes(name)}


def decoder_layer_types(config) -> list[str]:
    """Each decoder layer's cache layer type as transformers builds it (``cache_utils.get_layer_types_and_kwargs``),
    one per ``num_hidden_layers``: layers sharing another's K/V are ``"dummy"`` (5.23+; before, transformers leaves
    them out at the end)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text_config = config.get_text_config(decoder=True)
    layer_types, _ = get_layer_types_and_kwargs(text_config)
    return list(layer_types) + ["dummy"] * (text_config.num_hidden_layers - len(layer_types))


def kv_layer_indices(config) -> list[int]:
    """Indices of the decoder layers that keep their own K/V (full, sliding, chunked, hybrid): the layers that have
    KV scales. Layers of linear attention, SSM or conv states, layers sharing another's K/V and layers without a
    cache have none."""
    return [i for i, layer_type in enumerate(decoder_layer_types(config)) if layer_type in KV_LAYER_TYPES]


def shared_kv_layers(config) -> set[int]:
    """Indices of the layers whose K/V later layers read too (KV sharing, Gemma 3n / Gemma 4): what their ``update``
    returns must outlive the next layer's update. transformers 5.23+ marks them ``"store"`` in ``kv_sharing_modes``;
    before, they are the last layer of each type before the ``num_kv_shared_layers`` consumers (the models' rule)."""
    text_config = config.get_text_config(decoder=True)
    modes = getattr(text_config, "kv_sharing_modes", None)
    if modes is not None:
        return {i for i, mode in enumerate(modes) if mode == "store"}
    shared = getattr(text_config, "num_kv_shared_layers", 0) or 0
    layer_types = getattr(text_config, "layer_types", None)
    if shared <= 0 or layer_types is None:
        return set()
    first_consumer = text_config.num_hidden_layers - shared
    producers = {layer_type: i for i, layer_type in enumerate(layer_types[:first_consumer])}  # the last of each type
    return set(producers.values())


def with_state_layer_placeholders(found, layer_types: list[str]):
    """A checkpoint's scales (``checkpoint.CheckpointScales``) with 1.0 at the decoder layers whose type
    (``layer_types``, from ``decoder_layer_types``) holds no K/V (linear attention, SSM, conv, KV sharing): a hybrid
    model's checkpoint has scales on its attention layers only (llm-compressor's and vLLM's layout) and still loads
    by layer index. Those placeholders are never read."""
    import dataclasses

    tensors = {kind: dict(per_layer) for kind, per_layer in found.tensors.items()}
    for kind in ("k", "v"):
        for i, layer_type in enumerate(layer_types):
            if layer_type not in KV_LAYER_TYPES:
                tensors.setdefault(kind, {}).setdefault(i, (f"layers.{i} (no K/V)", torch.ones(1)))
    return dataclasses.replace(found, tensors=tensors, num_layers=len(layer_types))


def check_query_quantization_option(quantize_query: bool, fmt: StorageFormat, residual_length: int = 0) -> None:
    """A cache's ``quantize_query``: a bool, and FP8 queries need e4m3fn codes and no exact recent window (the kernel
    checks the GPU when it runs: ``kernels.checks.check_query_quantization``)."""
    if not isinstance(quantize_query, bool):
        raise ValueError(f"quantize_query must be True or False, got {quantize_query!r}")
    if quantize_query and (fmt.name != "e4m3fn" or residual_length):
        raise ValueError(f"quantize_query needs e4m3fn codes and no residual_length, got kv_cache_dtype "
                         f"{fmt.name} and residual_length {residual_length}")  # fmt: skip


def resolve_cache_options(
    kv_cache_dtype: str | torch.dtype | StorageFormat,
    calculate_kv_scales: bool,
    strategy: str | None,
    scales: KVScales | None,
) -> tuple[StorageFormat, str]:
    """The format and strategy of a cache from its constructor arguments, refusing conflicting ones (and warning
    about scales the format cannot use, ``scales.check_scale_range``). vLLM's ``"fp8_per_token_head"`` /
    ``"int8_per_token_head"`` set ``strategy="token_head"``; under it the scales come from each token as it is
    written, so given scales and ``calculate_kv_scales`` are refused; int8 needs it."""
    fmt, implied = resolve_kv_cache_dtype(kv_cache_dtype)
    if implied is not None and strategy not in (None, implied):
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} means strategy={implied!r}, got strategy={strategy!r}")
    strategy = strategy or implied
    if scales is not None and not isinstance(scales, KVScales):
        raise TypeError(f"scales must be a KVScales, got {type(scales).__name__}")
    if strategy == TOKEN_HEAD:
        check_token_head_options(calculate_kv_scales, scales is not None)
        return fmt, strategy
    if fmt is INT8:
        given = "no strategy" if strategy is None else f"strategy={strategy!r}"
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r} (int8 codes) needs strategy={TOKEN_HEAD!r}: with one scale for a "
            f"layer or head, int8 leaves small values few levels; got {given}"
        )
    if scales is not None and calculate_kv_scales:
        raise ValueError("give either scales or calculate_kv_scales=True, not both")
    if scales is not None and strategy is not None and strategy != scales.strategy:
        raise ValueError(f"strategy={strategy!r} conflicts with the scales' strategy {scales.strategy!r}")
    if scales is not None:
        check_scale_range(scales, fmt)
    return fmt, check_strategy(strategy or (scales.strategy if scales is not None else "tensor"))


def check_token_head_options(calculate_kv_scales: bool, has_scales: bool, what: str = "scales") -> None:
    """Refuse scales from elsewhere (a ``KVScales``, a checkpoint: ``what``) or ``calculate_kv_scales`` under
    ``strategy="token_head"``, whose scales come from each token as it is written."""
    if has_scales:
        raise ValueError(f"strategy={TOKEN_HEAD!r} computes a scale per token and head as each token is written; it "
                         f"cannot use {what} (per-tensor / per-head scales): give one or the other")  # fmt: skip
    if calculate_kv_scales:
        raise ValueError(f"strategy={TOKEN_HEAD!r} computes a scale per token and head as each token is written; "
                         "calculate_kv_scales=True (scales from the first prefill) conflicts with it")  # fmt: skip


def check_model_scales(config, scales: KVScales | None) -> None:
    """Refuse scales that do not fit the model's layers and KV heads. Scales are indexed by decoder layer, as in
    checkpoints: a model whose layers are not all attention (linear attention, SSM, conv, KV sharing) has one for every
    layer index, and only those of ``kv_layer_indices`` are read."""
    if scales is not None:
        text_config = config.get_text_config(decoder=True)
        scales.check_model(text_config.num_hidden_layers, text_config.num_key_value_heads)


def checkpoint_scales(
    name_or_path, kv_cache_dtype: str | torch.dtype | FP8Format, **loader_options
) -> tuple[FP8Format, KVScales]:
    """The storage format and a checkpoint's KV scales for it (``from_pretrained`` of both caches).
    ``loader_options`` go to ``checkpoint.load_kv_scales`` (``missing``, ``revision``, ``token``, ``cache_dir``,
    ``local_files_only``). Checkpoint scales are calibrated for e4m3fn; stored as ROCm e4m3fnuz (max 240) they are
    doubled, as vLLM does."""
    from .checkpoint import load_kv_scales

    fmt = resolve_fp8_format(kv_cache_dtype, "a checkpoint's scales (from_pretrained)")
    scales = load_kv_scales(name_or_path, **loader_options)
    return fmt, scales.scaled(2.0) if fmt.name == "e4m3fnuz" else scales


def layer_scales(scales: KVScales | None, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One layer's (key, value) scales from ``scales``, or None without scales."""
    if scales is None:
        return None
    if layer_idx >= scales.num_layers:
        raise ValueError(f"scales cover {scales.num_layers} layers but the model updates layer {layer_idx}")
    return scales.key[layer_idx], scales.value[layer_idx]
