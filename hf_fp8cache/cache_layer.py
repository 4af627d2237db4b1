"""FP8CacheLayer: one full-attention layer of ``QuantizedFP8Cache``, keeping K and V as FP8 bytes.

Storage: per layer two contiguous fp8 buffers ``[B, H, capacity, D]`` that grow amortized (by at least 1/16 of
their capacity, in steps of 256 tokens), written in place by one fused Triton launch per update
(``kernels.quantize_append_kv``). Nothing copies the history per step. With ``strategy="token_head"`` two bf16
scale buffers ``[B, H, capacity]`` sit beside them, grown, cropped and batch-mapped with them, written by the same
launch as the codes (``kernels.quantize_append_token_head``; a decode step's token by our attention's launch, which
computes its scales too); the codes are then int8 or fp8.

Two read paths, chosen per update from the model config's attention implementation (the ``config`` given to the
cache): with ``attn_implementation="hf_fp8cache"`` (``attention.py``), ``update`` returns fp8 views of the whole
buffers (not sliced to the filled length: that attention asks the layer for ``attention_inputs`` and reads the
bytes directly; fresh views each step, since a tag on a view the layer kept would tie the layer and the view in a
reference cycle that only Python's garbage collector frees); with any other implementation, ``update`` returns K/V
dequantized by one Triton launch into a workspace shared by all layers of the cache (one layer's K/V in the model
dtype, reused and grown amortized) -- valid until the next ``update`` of any layer, exactly how attention uses them.
A cache made without ``config`` always dequantizes.

First prefill: by default (``exact_prefill=True``) the first update of an empty layer returns the K/V it was
given, so the prompt attends over exact values (as transformers' own fp8 layer does); its FP8 copy is what later
tokens read. ``exact_prefill=False`` makes the prompt attend over the quantized values too.

On-the-fly scales (``calculate_kv_scales=True``) with our attention: the first prefill's FP8 write waits for the
attention call, which brings the padding mask, so padded positions never enter the scales (``cache_base.py``).
"""

from __future__ import annotations

import weakref

import torch

from .cache_base import DequantWorkspace, FP8LayerBase, RowStarts
from .contract import LAYER_ATTRIBUTE, FP8AttentionInputs, PendingWrite, layer_of
from .formats import StorageFormat
from .kernels import (
    LaunchMemo,
    NewTokens,
    RecentWindow,
    dequantize_kv,
    dequantize_token_head,
    quantize_append_kv,
    quantize_append_token_head,
)
from .kernels.recent_window import ring_read, ring_write

__all__ = ["FP8CacheLayer"]

_GROWTH_STEP = 256  # tokens; capacity is always a multiple of it
_GROWTH_FRACTION = 16  # grow by at least capacity / 16: amortized O(1) copies per token, <= ~6 % spare bytes


class FP8CacheLayer(FP8LayerBase):
    """One attention layer's FP8 K/V storage (see the module docstring). ``QuantizedFP8Cache`` makes its layers.

    Args:
        fmt: the storage format (an fp8 format, or int8 under ``"token_head"``).
        strategy: ``"tensor"``, ``"attn_head"`` or ``"token_head"`` (a scale per token and head, as it is written).
        scales: this layer's (key, value) scales, float32 ``[1]`` or ``[H_kv]``; None: unit or on-the-fly scales.
        calculate_kv_scales: set the scales from the first prefill (``scales.onthefly_scale``).
        exact_prefill: the first prefill attends over the exact K/V it was given.
        workspace: the dequantization workspace shared by the cache's layers.
        layer_idx: the layer's index in the model (for error messages).
        attention_config: the model config whose attention implementation picks the read path (None: dequantize).
        residual_length: the most recent tokens also kept exactly, in a ring buffer (0: none).
        row_starts: the per-step row starts shared by the cache's layers (None: this layer's own).
        quantize_query: our attention quantizes the queries to e4m3 for Q @ K^T (``QuantizedFP8Cache``).
    """

    is_compileable = False

    def __init__(
        self,
        fmt: StorageFormat,
        strategy: str,
        scales: tuple[torch.Tensor, torch.Tensor] | None,
        *,
        calculate_kv_scales: bool,
        exact_prefill: bool,
        workspace: DequantWorkspace,
        layer_idx: int,
        attention_config=None,
        residual_length: int = 0,
        row_starts: RowStarts | None = None,
        quantize_query: bool = False,
    ) -> None:
        super().__init__(fmt, strategy, scales, calculate_kv_scales, workspace, layer_idx, attention_config,
                         quantize_query)  # fmt: skip
        self.exact_prefill = exact_prefill
        self.residual_length = residual_length
        self._key_bytes: torch.Tensor | None = None  # uint8 [B, H, capacity, D]
        self._value_bytes: torch.Tensor | None = None
        self._launches = LaunchMemo()  # this layer's kernel launches, relaunched step after step (kernels/launch.py)
        self._views: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (key buffer, fp8 K, fp8 V)
        self._recent_keys: torch.Tensor | None = None  # model dtype [B, H, residual_length, D], a ring buffer
        self._recent_values: torch.Tensor | None = None
        self.recent_start = 0  # positions [recent_start, length) are also held exactly in the ring
        self.key_scale = self.value_scale = self.key_inv_scale = self.value_inv_scale = None
        self.length = 0
        self.is_initialized = False
        self._row_starts = row_starts if row_starts is not None else RowStarts()

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        """The cached keys as fp8 ``[B, H, S, D]`` (a view; multiply by ``key_scale`` to dequantize)."""
        self._finish_pending_write(None)
        return None if self._key_bytes is None else self._key_bytes[:, :, : self.length].view(self.fmt.dtype)

    @property
    def values(self) -> torch.Tensor | None:
        self._finish_pending_write(None)
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
        return 2 * B * H * self.length * D + self._ring_nbytes + self._scale_nbytes(self.length)

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of the FP8 buffers including spare capacity, the exact recent window and the scales."""
        if self._key_bytes is None:
            return 0
        return 2 * self._key_bytes.numel() + self._ring_nbytes + self._scale_nbytes(self.capacity)

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
            self._key_bytes = self._value_bytes = self._views = None  # reused after reset() only when the shape fits
            self._key_scales = self._value_scales = None
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
        self._key_bytes, self._value_bytes, self._views = key_bytes, value_bytes, None
        if self._token_scales:
            scales = self._new_token_scales(B, H, capacity)
            if self.length > 0:
                scales[0][:, :, : self.length] = self._key_scales[:, :, : self.length]
                scales[1][:, :, : self.length] = self._value_scales[:, :, : self.length]
            self._key_scales, self._value_scales = scales

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append K/V ``[B, H, S, D]`` as FP8 and return what attention reads (see the module docstring)."""
        self._begin_update(key_states, value_states)
        start = self.length
        self._reserve(start + key_states.shape[2], key_states)
        serves_fp8_attention = self._serves_fp8_attention()  # (read once: a config attribute, every step)
        if serves_fp8_attention and self._decode_write_waits(key_states, start):  # the kernel writes it as it attends
            tokens = NewTokens(key_states, value_states, self.key_inv_scale, self.value_inv_scale)
            self._pending_write, waits = PendingWrite(tokens, start, claimable=True), False
        else:
            waits = self._write_or_defer(key_states, value_states, start)
        self.length = start + key_states.shape[2]
        if self._recent_keys is not None:
            ring_write(self._recent_keys, key_states, start)
            ring_write(self._recent_values, value_states, start)
        self.recent_start = max(self.recent_start, self.length - self.residual_length)
        if start == 0 and self.exact_prefill:
            return self._tagged(key_states, value_states) if waits else (key_states, value_states)
        if serves_fp8_attention:  # the whole buffers: that attention reads attention_inputs(), not the shape
            return self._fp8_views()
        return self.dequantized()

    def _decode_write_waits(self, key_states: torch.Tensor, start: int) -> bool:
        """Whether a decode step's token is left to our attention's kernel to write (``contract.PendingWrite``), on
        that attention's path: one token after a prefill, scales set, no exact window (per-token-head scales too: the
        kernel computes and writes the token's own)."""
        return key_states.shape[2] == 1 and start > 0 and self._recent_keys is None and not self._scales_pending

    def _fp8_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole buffers as fp8 tensors naming this layer, for our attention: made once per pair of buffers and
        handed out step after step (no tensor made on the hot path). They name the layer through a weak reference, so
        the layer and its views form no reference cycle: a dropped cache is freed at once."""
        views = self._views
        # (a deepcopy copies the views with the weak reference to the original layer: made anew for the copy)
        if views is None or views[0] is not self._key_bytes or layer_of(views[1]) is not self:
            key, value = self._key_bytes.view(self.fmt.dtype), self._value_bytes.view(self.fmt.dtype)
            setattr(key, LAYER_ATTRIBUTE, weakref.ref(self))
            setattr(value, LAYER_ATTRIBUTE, weakref.ref(self))
            views = self._views = (self._key_bytes, key, value)
        return views[1], views[2]

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor, start: int, valid) -> None:
        """Quantize K/V into the buffers at ``start`` (setting on-the-fly scales first, over ``valid`` positions)."""
        if self._token_scales:
            quantize_append_token_head(key_states, value_states, self._key_bytes, self._value_bytes, self._key_scales,
                                       self._value_scales, start, self.fmt, memo=self._launches)  # fmt: skip
            return
        self._set_onthefly_scales_from(key_states, value_states, valid)
        quantize_append_kv(
            key_states, value_states, self._key_bytes, self._value_bytes, start,
            self.key_inv_scale, self.value_inv_scale, self.fmt, memo=self._launches,
        )  # fmt: skip

    def attention_inputs(self, attention_mask: torch.Tensor | None) -> FP8AttentionInputs:
        """What the FP8 attention reads (``contract.py``); finishes a write that waited for the mask, and offers a
        decode step's token to the kernel (``new_tokens``)."""
        pending = self._pending_write
        if pending is None or not pending.claimable:
            self._finish_pending_write(attention_mask)
            pending = None
        kv_start = self._row_starts(attention_mask, self._key_bytes.shape[0], self.device)
        key_scale, value_scale = self._read_scales()
        return FP8AttentionInputs(self._key_bytes, self._value_bytes, self.length, kv_start, key_scale, value_scale,
                                  self.fmt, self.recent_window, launches=self._launches, new_tokens=pending,
                                  inner_padding=self._row_starts.inner_padding(attention_mask),
                                  quantize_query=self.quantize_query)  # fmt: skip

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the cached tokens in the model dtype, in the cache's shared workspace (valid until the next
        update of any layer)."""
        return self._dequantized_from(0)

    def _dequantized_from(self, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``dequantized`` of the cached tokens from position ``first`` on (the kernel reads that range in place)."""
        self._finish_pending_write(None)
        B, H, _, D = self._key_bytes.shape
        if self._token_scales:  # the kernel reads whole buffers from position 0: the tokens before first too
            key_out, value_out = self._workspace.views(self.device, self.dtype, (B, H, self.length, D))
            dequantize_token_head(self._key_bytes, self._value_bytes, self._key_scales, self._value_scales,
                                  self.length, self.fmt, key_out, value_out, memo=self._launches)  # fmt: skip
            key_out, value_out = key_out[:, :, first:], value_out[:, :, first:]
        else:
            key_out, value_out = self._workspace.views(self.device, self.dtype, (B, H, self.length - first, D))
            key_bytes, value_bytes = self._key_bytes, self._value_bytes
            if first:  # (no view to make for the usual whole history: two torch ops a layer and step fewer)
                key_bytes, value_bytes = key_bytes[:, :, first:], value_bytes[:, :, first:]
            dequantize_kv(key_bytes, value_bytes, self.length - first, self.key_scale, self.value_scale, self.fmt,
                          key_out, value_out, memo=self._launches)  # fmt: skip
        exact = max(self.recent_start, first)
        if exact < self.length:  # the exact window replaces its dequantized tokens
            ring_read(self._recent_keys, exact, self.length, out=key_out[:, :, exact - first :])
            ring_read(self._recent_values, exact, self.length, out=value_out[:, :, exact - first :])
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
        self._pending_write = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many tokens from the end. Positive: keep that many (transformers <= 5.19 meaning)."""
        self._finish_pending_write(None)
        if tokens_to_remove > 0:
            self.length = min(self.length, tokens_to_remove)
        else:
            self.length = max(0, self.length + tokens_to_remove)
        self.recent_start = min(self.recent_start, self.length)  # the ring still holds what remains of the window

    def _map_batch(self, select) -> None:
        """Apply a batch-dim selection to the filled part of both buffers (capacity is kept) and to the ring."""
        self._finish_pending_write(None)
        if self._key_bytes is None or self.length == 0:
            return
        if self._recent_keys is not None:
            self._recent_keys, self._recent_values = select(self._recent_keys), select(self._recent_values)
        buffers = []
        scales = (self._key_scales, self._value_scales) if self._token_scales else ()
        for old in (self._key_bytes, self._value_bytes, *scales):
            chosen = select(old[:, :, : self.length])
            new = torch.empty((chosen.shape[0], *old.shape[1:]), dtype=old.dtype, device=old.device)
            new[:, :, : self.length] = chosen
            buffers.append(new)
        self._key_bytes, self._value_bytes, self._views = (*buffers[:2], None)
        if scales:
            self._key_scales, self._value_scales = buffers[2:]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        """Keep the batch rows ``indices`` names: any index form ``DynamicCache`` takes (a slice, a list or tuple of
        rows, an integer tensor, a bool mask), always along the batch dim."""
        if isinstance(indices, slice):
            self._map_batch(lambda t: t[indices])
        else:
            index = torch.as_tensor(indices)
            self._map_batch(lambda t: t[index.to(t.device)])
