"""FP8StaticSlidingLayer: the static FP8 layer of sliding-window and chunked attention layers, with the semantics of
transformers' ``StaticSlidingWindowLayer`` (``FP8StaticCache`` makes one per such model layer).

Storage: a ring of ``W = min(sliding_window, max_cache_len)`` slots per layer (two uint8 buffers
``[B, H, W, D]`` of fp8 codes, allocated at the first update, fixed addresses): absolute position ``p`` lives in
slot ``p % W``. A decode step writes its one token at slot ``cumulative_length % W``, the length held on the device
(``kernels.quantize_append_kv`` reads the start there), so nothing the graph depends on moves between steps and no
stored byte is copied. Memory is bounded by the window, whatever the sequence length.

Read paths. With ``attn_implementation="hf_fp8cache"`` a decode step (one token after the first update) hands
attention the ring itself: ``update`` returns the whole fp8 buffers and ``attention_inputs`` marks them as a ring
(``FP8AttentionInputs.ring``), which the decode kernel reads slot by slot, each slot's position worked out on the
device from the filled length (``kernels.decode_attention``), no byte copied or dequantized. Its row starts come
from the sliding mask, whose columns start at transformers' ``kv_offset`` = max(L - W, 0) (L the length after the
update, held on the device), so nothing on the host changes from step to step and ``generate`` compiles these
layers (``is_compileable``). Everything else -- other attention implementations, chunks of several tokens, chunked
layers (Llama 4: same-chunk masks the kernel does not compute) -- gets what transformers' static sliding layer
returns (and ``get_mask_sizes`` announces), dequantized into the model dtype, and runs the model's attention with
its mask; those are not compileable (under CUDA graphs a dequantized ring, a graph output, was overwritten by the
next replay before the next step read it: Mistral on the H200). With ``seen`` tokens before an update of ``q``
tokens:

- ``seen + q <= W`` (the ring has not wrapped, slot = position): all ``W`` slots, the unwritten ones masked;
  mask sizes ``(W, 0)``;
- a decode step on a full ring (``seen >= W``, ``q = 1``): the ``W`` slots rotated oldest first (one device-side
  gather of the fp8 bytes by ``(arange(W) + cumulative_length) % W``); mask sizes ``(W, seen - W + 1)``;
- otherwise (a chunk that crosses or starts past the window): the last ``min(seen, W - 1)`` stored tokens, oldest
  first, then the ``q`` new ones; mask sizes ``(kept + q, max(seen - W + 1, 0))``.

The first prefill of an empty layer returns its exact K/V (as ``FP8StaticLayer``); later chunks read back their
FP8 values. ``get_seq_length`` counts every token seen, as a host int (transformers' choice: the mask sizes must be
ints); it grows with the shapes of the updates and is never read back from the device.

``crop`` (a negative count; positive keeps that many, the transformers <= 5.19 meaning) is exact while the tokens the
next read needs are still in the ring: any crop before the ring wraps, one token after. Beyond that it raises, since
the evicted tokens cannot come back (transformers' layer then silently reads stale slots; ``is_croppable`` is its
flag, ``max_cache_len <= sliding_window``, kept here). The exact recent window (``residual_length``) is refused on
these layers, as on the dynamic sliding layer. Beam search reorders the rows in place; the batch is fixed.
"""

from __future__ import annotations

import torch

from .contract import FP8AttentionInputs, kv_start_from_mask
from .kernels import ops
from .sliding import is_chunked
from .static_cache import FP8StaticLayer, refuse_inner_padding

__all__ = ["FP8StaticSlidingLayer"]


class FP8StaticSlidingLayer(FP8StaticLayer):
    """One sliding-window (or chunked) attention layer's FP8 K/V in a fixed ring of the window's size (see the
    module docstring).

    Args:
        max_cache_len: the static cache's length; the ring holds ``min(sliding_window, max_cache_len)`` tokens.
        sliding_window: the layer's window (a chunked layer's chunk size).
        residual_length: must be 0 (the exact recent window is not supported on sliding layers).
        layer_kwargs: ``FP8StaticLayer``'s other arguments (format, strategy, scales, workspace, ...).
    """

    is_sliding = True
    even_capacity = False  # the ring has exactly W slots (slot = position % W, as the decode kernel reads it)

    def __init__(self, max_cache_len: int, sliding_window: int, *, residual_length: int = 0, **layer_kwargs) -> None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window must be an int >= 1, got {sliding_window!r}")
        if residual_length:
            raise ValueError(
                f"layer {layer_kwargs.get('layer_idx')}: residual_length is not supported on sliding-window layers "
                f"(window {sliding_window}); use it on models with full-attention layers only"
            )
        super().__init__(min(sliding_window, max_cache_len), **layer_kwargs)
        self.sliding_window = sliding_window
        self.cumulative_length_int = 0  # every token seen, on the host (mask sizes); the device twin places writes
        self._is_croppable = max_cache_len <= sliding_window
        self.chunked = is_chunked(self._attention_config, self.layer_idx)

    @property
    def is_croppable(self) -> bool:
        """transformers' flag: the cache never holds more than the window, so a crop never needs evicted tokens."""
        return self._is_croppable

    @property
    def is_compileable(self) -> bool:
        """Whether ``generate`` may compile steps through this layer: when our attention reads the ring (see the
        module docstring)."""
        return self._serves_fp8_attention()

    def _serves_fp8_attention(self) -> bool:
        return not self.chunked and super()._serves_fp8_attention()

    def attention_inputs(self, attention_mask: torch.Tensor | None) -> FP8AttentionInputs:
        """The ring for the decode kernel, with row starts in positions: the mask's first attended column plus
        transformers' ``kv_offset`` max(L - W, 0), computed on the device (``FP8StaticLayer`` shares its row starts
        between full layers, whose masks start at position 0; these are this layer's own)."""
        self._finish_pending_write(attention_mask)
        refuse_inner_padding(attention_mask, self.layer_idx)
        offset = (self.cumulative_length - self.max_cache_len).clamp(min=0)
        row_start = (kv_start_from_mask(attention_mask, self._key_bytes.shape[0], self.device) + offset).int()
        return FP8AttentionInputs(self._key_bytes, self._value_bytes, self.cumulative_length, row_start,
                                  *self._read_scales(), self.fmt, None, sliding_window=self.sliding_window,
                                  ring=True, quantize_query=self.quantize_query)  # fmt: skip

    # -- update ------------------------------------------------------------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store K/V ``[B, H, S, D]`` in the ring and return what transformers' static sliding layer returns."""
        self._begin_update(key_states, value_states)
        seen, new, window = self.cumulative_length_int, key_states.shape[2], self.max_cache_len
        if new == 1 and seen > 0 and self._serves_fp8_attention():  # our kernel reads the ring (attention_inputs)
            self._store(key_states, value_states)
            return self.keys, self.values
        if seen + new <= window:  # not wrapped: slot == position, the whole ring as transformers returns it
            self._store(key_states, value_states)
            return self._unwrapped_ring(key_states, value_states, exact=seen == 0)
        if new == 1:  # a decode step on a full ring
            self._store(key_states, value_states)
            return self._dequantize(*self._oldest_first())
        if seen == 0:  # a first prompt longer than the window attends over its exact K/V
            self._store(key_states, value_states)
            return key_states, value_states
        kept = self._last_stored(min(seen, window - 1))  # before the new tokens overwrite their slots
        self._store(key_states, value_states)
        fresh = self._quantized_copy(key_states, value_states)
        return self._dequantize(*(torch.cat((old, now), dim=2) for old, now in zip(kept, fresh)), workspace=False)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Quantize the last ``min(S, W)`` new tokens into their ring slots and advance both lengths. One token goes
        at the device position ``cumulative_length % W``; a longer chunk is split where it wraps."""
        self._warn_padding_counts(key_states)
        self._set_onthefly_scales_from(key_states, value_states, None)  # the first prefill's, over the whole chunk
        seen, new, window = self.cumulative_length_int, key_states.shape[2], self.max_cache_len
        if new == 1:
            self._write(key_states, value_states, self.cumulative_length % window, None)
        elif new > 1:
            first = seen + new - min(new, window)  # the first position that stays in the ring
            for start, stop in self._ring_runs(first, seen + new):
                tokens = slice(start - seen, stop - seen)
                slot = torch.full((), start % window, dtype=torch.int64, device=self.device)
                self._write(key_states[:, :, tokens], value_states[:, :, tokens], slot, None)
        self.cumulative_length.add_(new)
        self.cumulative_length_int += new

    def _ring_runs(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Positions ``[start, stop)`` (at most W of them) as runs that do not wrap around the ring's end."""
        window = self.max_cache_len
        wrap = (start // window + 1) * window
        return [(start, min(stop, wrap))] + ([(wrap, stop)] if stop > wrap else [])

    # -- reads -------------------------------------------------------------------------------------------------
    def _unwrapped_ring(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *, exact: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All W slots dequantized (unwritten ones stale or zero, masked); a first prefill's tokens exact."""
        key_out, value_out = super().dequantized()
        if exact:
            key_out[:, :, : key_states.shape[2]] = key_states
            value_out[:, :, : value_states.shape[2]] = value_states
        return key_out, value_out

    def _slots(self, order: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Copies of the ring's slots ``order`` (a device index): K's and V's codes, then, with per-token-head
        scales, K's and V's scales (what ``_dequantize`` takes)."""
        buffers = (self._key_bytes, self._value_bytes)
        if self._token_scales:
            buffers += (self._key_scales, self._value_scales)
        return tuple(buffer.index_select(2, order) for buffer in buffers)

    def _oldest_first(self) -> tuple[torch.Tensor, ...]:
        """The full ring rotated so the oldest token comes first (``_slots``: a gather indexed on the device)."""
        window = self.max_cache_len
        return self._slots((torch.arange(window, device=self.device) + self.cumulative_length) % window)

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What a decode step's ``update`` returns on the other read paths, for a call our attention's kernel does not
        serve: the W slots oldest first once the ring has wrapped, else all of them in slot order."""
        if self.cumulative_length_int > self.max_cache_len:
            return self._dequantize(*self._oldest_first())
        return super().dequantized()

    def _last_stored(self, tokens: int) -> tuple[torch.Tensor, ...]:
        """Copies of the last ``tokens`` stored tokens, oldest first (``_slots``)."""
        seen, window = self.cumulative_length_int, self.max_cache_len
        return self._slots(torch.arange(seen - tokens, seen, device=self.device) % window)

    def _quantized_copy(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """K/V quantized into new buffers, as ``_slots`` gives them (the same kernel and scales as the ring's
        writes)."""
        key_bytes = torch.empty(key_states.shape, dtype=torch.uint8, device=self.device)
        value_bytes = torch.empty_like(key_bytes)
        start = torch.zeros((), dtype=torch.int64, device=self.device)
        if self._token_scales:
            scales = self._new_token_scales(*key_states.shape[:3])
            ops.quantize_append_token_head(key_states, value_states, key_bytes, value_bytes, *scales, start,
                                           self.fmt.name)  # fmt: skip
            return key_bytes, value_bytes, *scales
        ops.quantize_append_kv(key_states, value_states, key_bytes, value_bytes, start,
                               self.key_inv_scale, self.value_inv_scale, self.fmt.name)  # fmt: skip
        return key_bytes, value_bytes

    def _dequantize(self, *slots: torch.Tensor, workspace: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes ``[B, H, n, D]`` (and per-token-head scales ``[B, H, n]``, as ``_slots`` gives them) in the model
        dtype: in the shared workspace (W tokens: a decode step), or in new tensors (a longer chunk: the fixed
        workspace keeps its size)."""
        key_bytes, value_bytes = slots[:2]
        shape = tuple(key_bytes.shape)
        if workspace:
            key_out, value_out = self._workspace.views(self.device, self.dtype, shape)
        else:
            key_out = torch.empty(shape, dtype=self.dtype, device=self.device)
            value_out = torch.empty_like(key_out)
        if self._token_scales:
            ops.dequantize_token_head(key_bytes, value_bytes, *slots[2:], shape[2], self.fmt.name, key_out,
                                      value_out)  # fmt: skip
        else:
            ops.dequantize_kv(key_bytes, value_bytes, shape[2], self.key_scale, self.value_scale, self.fmt.name,
                              key_out, value_out)  # fmt: skip
        return key_out, value_out

    # -- lengths and masks -------------------------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.cumulative_length_int

    def advance(self, tokens: int) -> None:
        """Count ``tokens`` more on the host, for a decode step a CUDA graph replayed: its ``update`` ran on the
        device only (``decode_graphs.py``), and the mask sizes read this count."""
        self.cumulative_length_int += tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """transformers' ``StaticSlidingWindowLayer.get_mask_sizes``: (length, first position) of what ``update``
        returns for ``query_length`` new tokens."""
        seen, window = self.cumulative_length_int, self.max_cache_len
        offset = max(seen - window + 1, 0)
        if seen >= window:
            return window + query_length - 1, offset
        if seen + query_length > window:
            return seen + query_length, offset
        return window, offset

    def check_capacity(self, new_tokens: int) -> None:
        """Nothing to check: the ring takes any number of tokens."""

    # -- state -------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.cumulative_length_int = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many tokens from the end; positive: keep that many. Raises when the tokens the next
        read needs were already evicted from the ring (see the module docstring)."""
        seen = self.cumulative_length_int
        remove = max(seen - tokens_to_remove, 0) if tokens_to_remove > 0 else min(-tokens_to_remove, seen)
        if seen > self.max_cache_len and remove > 1:
            raise RuntimeError(
                f"layer {self.layer_idx}: cannot crop {remove} tokens from a sliding-window layer that holds the last "
                f"{self.max_cache_len} of {seen} tokens; the tokens the next step would read were evicted"
            )
        self.cumulative_length_int -= remove
        if self.is_initialized:
            self.cumulative_length.sub_(remove)
        self._first_prefill = self.cumulative_length_int == 0
