"""FP8StaticCache: the FP8 cache in preallocated buffers of ``max_cache_len`` tokens, for torch.compile and CUDA graphs.

Every layer is ``is_compileable``, so ``generate`` compiles its decode steps on CUDA (as with transformers'
``StaticCache``) and ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`` runs without graph
breaks or recompiles from step to step. What makes that possible:

- Fixed storage: per layer two uint8 buffers ``[B, H, max_cache_len, D]`` holding fp8 codes, fp32 scale tensors
  (with ``strategy="token_head"``: int8 or fp8 codes and two bf16 scale buffers ``[B, H, capacity]``, the capacity
  ``max_cache_len`` rounded up to even so the attention reads the scales two to a 32-bit word),
  and the filled length ``cumulative_length`` as a device tensor, all allocated at the first update and marked as
  static addresses. ``reset()`` keeps them, so the next prompt of the same shape reuses buffers and graphs.
- The kernels run as ``torch.library`` operators (``kernels/ops.py``) that take the length as a tensor: the write
  position and the attended length are read on the device, so nothing on the host changes between steps.
- The attention finds its layer through the fp8 buffer views that ``update`` returns (made once, carrying the
  layer as an attribute), which dynamo follows like any attribute of a graph input, and reads what
  ``attention_inputs`` returns (``contract.py``).
- The padding start of each row is reduced from the mask once a step per device: the first layer on each device
  writes it into a buffer (``StaticRowStarts``) the other layers there read.

Read paths, as in ``QuantizedFP8Cache``: with ``attn_implementation="hf_fp8cache"``, decode reads the fp8 bytes
with work proportional to the tokens written (the kernel reads the length and divides the filled key blocks among
its splits); with any other attention implementation, ``update`` dequantizes the whole buffer into a workspace
shared by the layers and the model's attention masks the unwritten positions (as bf16 ``StaticCache`` attends
over its whole length).

First prefill: the prompt attends over its exact K/V (written into the dequantized workspace over their FP8
copies), as in ``QuantizedFP8Cache``; on-the-fly scales are computed from it into the fixed scale tensors (with
our attention, over its unpadded positions: the write waits for the attention call, which brings the mask).

Capacity: a prompt longer than ``max_cache_len`` raises at once; a decode step past it fails a device-side check
(``torch._assert_async``, as transformers' StaticCache fails its index copy), and the kernel never writes outside
the buffers. Size ``max_cache_len`` for prompt + new tokens.

Sliding-window and chunked layers (Mistral, Gemma 2/3, GPT-OSS, Llama 4) are ``FP8StaticSlidingLayer`` rings of the
window's size (``static_sliding.py``), built from the config's layer types as transformers' ``StaticCache`` does.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache

from .cache_base import (
    DequantWorkspace,
    FP8LayerBase,
    check_model_scales,
    check_query_quantization_option,
    layer_scales,
    resolve_cache_options,
    shared_kv_layers,
)
from .contract import FP8AttentionInputs, kv_start_from_mask, rows_with_inner_padding
from .formats import StorageFormat
from .hybrid import FP8HybridLayer, build_layers, model_checkpoint_scales
from .kernels import ops
from .scales import KVScales

__all__ = ["FP8StaticCache"]


def _mark_static(*tensors: torch.Tensor) -> None:
    """Tell torch.compile that these tensors keep their address (CUDA graphs then take them as fixed inputs)."""
    if not torch.compiler.is_compiling():
        for t in tensors:
            torch._dynamo.mark_static_address(t)


def refuse_inner_padding(attention_mask: torch.Tensor | None, layer_idx: int | None) -> None:
    """Raise for a mask with padding inside a row (``rows_with_inner_padding``), which the decode kernel cannot serve
    and a compiled step could not fall back from. Checked on masks of several queries in eager calls only: padding
    enters a row with a prefill, a chunk or a next turn, which run eagerly (a compiled or captured step cannot read
    the mask on the host), and a decode step's mask only adds its new position (no host sync a step)."""
    if attention_mask is None or attention_mask.shape[-2] == 1:
        return
    if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return
    rows = rows_with_inner_padding(attention_mask)
    if rows:
        raise ValueError(
            f"layer {layer_idx}: rows {rows} of the attention mask have padding inside them (a batch's next turn "
            "left-padded after its history?), which FP8StaticCache's attention cannot read (one start position a "
            "row); use FP8Cache (it runs such calls through the model's attention) or pad rows at their start only"
        )


class StaticRowStarts:
    """One int32 ``[B]`` row-start buffer per device, shared by a static cache's layers: the first layer to claim a
    device (the lowest index there, as layers initialize in order) writes it each step, the others read it (8x32768
    on the H200: the reduction took ~5.6 us in each of the 32 layers before it was shared)."""

    def __init__(self) -> None:
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def claim(self, device: torch.device, batch: int) -> tuple[torch.Tensor, bool]:
        """The buffer of ``device`` and whether the caller (the first to claim it) writes it."""
        buffer = self._buffers.get(device)
        if buffer is not None and buffer.shape[0] == batch:
            return buffer, False
        buffer = self._buffers[device] = torch.zeros(batch, dtype=torch.int32, device=device)
        return buffer, True


class FP8StaticLayer(FP8LayerBase):
    """One attention layer's FP8 K/V in buffers of ``max_cache_len`` tokens (see the module docstring).
    ``FP8StaticCache`` makes its layers.

    Args:
        max_cache_len: tokens per sequence the buffers hold.
        fmt: the storage format (an fp8 format, or int8 under ``"token_head"``).
        strategy: ``"tensor"``, ``"attn_head"`` or ``"token_head"`` (bf16 scale buffers ``[B, H, capacity]``
            beside the codes, written by the same launch).
        scales: this layer's (key, value) scales, float32 ``[1]`` or ``[H_kv]``; None: unit or on-the-fly scales.
        calculate_kv_scales: set the scales from the first prefill after construction or ``reset()``.
        workspace: the dequantization workspace shared by the cache's layers (``static=True``).
        layer_idx: the layer's index in the model (for error messages).
        attention_config: the model config whose attention implementation picks the read path (None: dequantize).
        max_batch_size: the largest batch the first update may bring (None: no limit).
        row_starts: the per-device row-start buffers shared by the cache's layers (None: this layer's own).
        quantize_query: our attention quantizes the queries to e4m3 for Q @ K^T (``QuantizedFP8Cache``).
    """

    is_compileable = True
    # per-token-head scales: buffers of max_cache_len rounded up to even tokens (lazy_initialization); a ring's slots
    # are its positions modulo their count, which must stay the window
    even_capacity = True

    def __init__(
        self,
        max_cache_len: int,
        fmt: StorageFormat,
        strategy: str,
        *,
        scales: tuple[torch.Tensor, torch.Tensor] | None,
        calculate_kv_scales: bool,
        workspace: DequantWorkspace,
        layer_idx: int,
        attention_config=None,
        max_batch_size: int | None = None,
        row_starts: StaticRowStarts | None = None,
        quantize_query: bool = False,
    ) -> None:
        super().__init__(fmt, strategy, scales, calculate_kv_scales, workspace, layer_idx, attention_config,
                         quantize_query)  # fmt: skip
        self.max_cache_len = max_cache_len
        self.max_batch_size = max_batch_size
        # fp8 views of the whole buffers, made once at the first update (so the attribute naming the layer is there
        # when dynamo traces): what attention receives
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = torch.zeros((), dtype=torch.int64)  # tokens written; on the device once initialized
        self._row_starts = row_starts if row_starts is not None else StaticRowStarts()
        self.row_start: torch.Tensor | None = None  # int32 [B]: this device's buffer, once initialized
        self.writes_row_start = False  # whether this layer reduces the mask into it each step
        self._first_prefill = True  # the next update is a prompt into an empty layer (a host flag: no sync)
        self._scales_pending = calculate_kv_scales  # again after reset(), not after a crop (as the dynamic cache)

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def key_bytes(self) -> torch.Tensor | None:
        """The whole key buffer, uint8 ``[B, H, capacity, D]`` (the first ``cumulative_length`` are valid): capacity is
        ``max_cache_len``, rounded up to even with per-token-head scales."""
        return self._key_bytes if self.is_initialized else None

    @property
    def value_bytes(self) -> torch.Tensor | None:
        return self._value_bytes if self.is_initialized else None

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of the FP8 buffers (all ``max_cache_len`` tokens, one more with per-token-head scales where it is odd)
        and the scales."""
        if not self.is_initialized:
            return 0
        return 2 * self._key_bytes.numel() + self._scale_nbytes(self._key_bytes.shape[2])

    # -- Cache layer API -------------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, D = key_states.shape
        if self.max_batch_size is not None and B > self.max_batch_size:
            raise ValueError(
                f"layer {self.layer_idx}: batch {B} (beams included) exceeds max_batch_size={self.max_batch_size}"
            )
        heads = H if self.calculate_kv_scales and self.strategy == "attn_head" else 1
        key_scale, value_scale = self._first_scales(key_states, unit_heads=heads)
        # per-token-head scales are read two to a 32-bit word only where every row starts on one: an even capacity
        # (the attention kernel's PAIRED_SCALES; an odd one cost 1.3x per tensor through generate at 8x32833 tokens).
        # Rounding here costs one token; reading any row's parity in the kernel cost ~5 % more key-loop instructions
        # (1001 against 949 a block, sm_90a, triton 3.6), every decode step.
        capacity = self.max_cache_len + (self.max_cache_len % 2 if self._token_scales and self.even_capacity else 0)
        self._key_bytes = torch.zeros(B, H, capacity, D, dtype=torch.uint8, device=self.device)
        self._value_bytes = torch.zeros_like(self._key_bytes)
        self.key_scale, self.value_scale = key_scale.clone(), value_scale.clone()
        self.key_inv_scale, self.value_inv_scale = 1.0 / self.key_scale, 1.0 / self.value_scale
        if self._token_scales:
            self._key_scales, self._value_scales = self._new_token_scales(B, H, capacity)
        self.cumulative_length = torch.zeros((), dtype=torch.int64, device=self.device)
        self.row_start, self.writes_row_start = self._row_starts.claim(self.device, B)
        self._publish_buffers()
        self.is_initialized = True

    def _publish_buffers(self) -> None:
        """Make the fp8 views attention receives (tagged with this layer) and mark the fixed tensors static."""
        self.keys, self.values = self._tagged(
            self._key_bytes.view(self.fmt.dtype), self._value_bytes.view(self.fmt.dtype)
        )
        _mark_static(self._key_bytes, self._value_bytes, self.cumulative_length, self.key_scale, self.value_scale,
                     self.key_inv_scale, self.value_inv_scale, self.row_start,
                     *(() if self._key_scales is None else (self._key_scales, self._value_scales)))  # fmt: skip

    def __deepcopy__(self, memo: dict) -> FP8StaticLayer:
        """An independent copy whose attention views alias its own buffers (a plain deepcopy would copy the views
        apart from the buffers); it follows the same model config, and shares the row starts of the copied cache
        when the whole cache is copied (the cache copies them before its layers), else this layer's (a layer copied
        alone reads what the original first layer writes)."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        shared = ("keys", "values", "_attention_config", "_row_starts", "row_start")
        for name, value in self.__dict__.items():
            if name not in shared:
                setattr(copied, name, copy.deepcopy(value, memo))
        copied._attention_config = self._attention_config
        copied._row_starts = memo.get(id(self._row_starts), self._row_starts)
        copied.row_start = memo.get(id(self.row_start), self.row_start)
        if self.is_initialized:
            copied._publish_buffers()
        return copied

    def _set_scales(self, key_scale: torch.Tensor, value_scale: torch.Tensor) -> None:
        """On-the-fly scales, written into the fixed scale tensors (their addresses never change)."""
        for scale, inv_scale, new in ((self.key_scale, self.key_inv_scale, key_scale),
                                      (self.value_scale, self.value_inv_scale, value_scale)):  # fmt: skip
            scale.copy_(new)
            inv_scale.copy_(1.0 / scale)  # the dynamic cache's division (torch.reciprocal can differ by an ulp)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write K/V ``[B, H, S, D]`` as FP8 at the filled length and return what attention reads."""
        self._begin_update(key_states, value_states)
        new_tokens = key_states.shape[2]
        if new_tokens > self.max_cache_len:
            raise ValueError(f"layer {self.layer_idx}: {new_tokens} tokens exceed max_cache_len={self.max_cache_len}")
        first_prefill = self._first_prefill and new_tokens > 0
        waits = self._write_or_defer(key_states, value_states, self.cumulative_length)
        self.cumulative_length.add_(new_tokens)
        self._first_prefill = self._first_prefill and new_tokens == 0
        if not first_prefill and self._serves_fp8_attention():
            return self.keys, self.values
        key_out, value_out = self.dequantized()
        if first_prefill:  # the prompt attends over its exact K/V
            key_out[:, :, :new_tokens] = key_states
            value_out[:, :, :new_tokens] = value_states
        return (
            self._tagged(key_out.view(key_out.shape), value_out.view(value_out.shape))
            if waits
            else (key_out, value_out)
        )

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Refuse K/V whose batch, heads, head size, dtype or device differ from the buffers'."""
        new_tokens = key_states.shape[2]
        if tuple(key_states.shape) != (*self._key_bytes.shape[:2], new_tokens, self._key_bytes.shape[3]) or (
            value_states.shape != key_states.shape
        ):
            raise ValueError(
                f"layer {self.layer_idx}: key_states {tuple(key_states.shape)} / value_states "
                f"{tuple(value_states.shape)} do not fit this static cache {tuple(self._key_bytes.shape)}; "
                "a new batch shape needs a new cache"
            )
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if (t.dtype, t.device) != (self.dtype, self.device):
                raise ValueError(
                    f"layer {self.layer_idx}: {name} is {t.dtype} on {t.device} but this static cache holds "
                    f"{self.dtype} on {self.device}"
                )

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor, start: torch.Tensor, valid) -> None:
        """Quantize K/V into the buffers at the device position ``start`` (on-the-fly scales first, over ``valid``;
        per-token-head scales into their buffers by the same launch)."""
        if self._token_scales:
            ops.quantize_append_token_head(key_states, value_states, self._key_bytes, self._value_bytes,
                                           self._key_scales, self._value_scales, start, self.fmt.name)  # fmt: skip
            return
        self._set_onthefly_scales_from(key_states, value_states, valid)
        ops.quantize_append_kv(key_states, value_states, self._key_bytes, self._value_bytes, start,
                                  self.key_inv_scale, self.value_inv_scale, self.fmt.name)  # fmt: skip

    def attention_inputs(self, attention_mask: torch.Tensor | None) -> FP8AttentionInputs:
        """What the FP8 attention reads (``contract.py``); the device's first layer reduces the mask into the shared
        row-start buffer, the others read it (no host sync, a fixed address for CUDA graphs)."""
        self._finish_pending_write(attention_mask)
        if self.writes_row_start:
            refuse_inner_padding(attention_mask, self.layer_idx)
            self.row_start.copy_(kv_start_from_mask(attention_mask, self.row_start.shape[0], self.device))
        return FP8AttentionInputs(self._key_bytes, self._value_bytes, self.cumulative_length, self.row_start,
                                  *self._read_scales(), self.fmt, None,
                                  quantize_query=self.quantize_query)  # fmt: skip

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``max_cache_len`` positions in the model dtype (unwritten ones are stale or zero; the mask hides
        them), in the workspace shared by the cache's layers (valid until the next update of any layer)."""
        B, H, _, D = self._key_bytes.shape
        key_out, value_out = self._workspace.views(self.device, self.dtype, (B, H, self.max_cache_len, D))
        if self._token_scales:
            ops.dequantize_token_head(self._key_bytes, self._value_bytes, self._key_scales, self._value_scales,
                                      self.max_cache_len, self.fmt.name, key_out, value_out)  # fmt: skip
        else:
            ops.dequantize_kv(self._key_bytes, self._value_bytes, self.max_cache_len, self.key_scale,
                              self.value_scale, self.fmt.name, key_out, value_out)  # fmt: skip
        return key_out, value_out

    def check_capacity(self, new_tokens: int) -> None:
        """A device-side check that ``new_tokens`` more fit (no host sync; fails the step when they do not)."""
        torch._assert_async(
            self.cumulative_length + new_tokens <= self.max_cache_len,
            f"FP8StaticCache: more tokens than max_cache_len={self.max_cache_len}",
        )

    def get_seq_length(self) -> torch.Tensor | int:
        return self.cumulative_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Forget the tokens, keeping every buffer (and so every compiled graph); on-the-fly scales are recomputed
        at the next prefill."""
        if self.is_initialized:
            self.cumulative_length.zero_()
        self._first_prefill = True
        self._scales_pending = self.calculate_kv_scales
        self._pending_write = None

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many tokens from the end. Positive: keep that many (transformers <= 5.19 meaning)."""
        if tokens_to_remove > 0:
            self.cumulative_length.clamp_(max=tokens_to_remove)
        else:
            self.cumulative_length.sub_(-tokens_to_remove).clamp_(min=0)
        # an emptied layer takes its next prompt as a first prefill (exact K/V), as the dynamic cache does; crop runs
        # outside compiled steps (assisted decoding), so reading the length back costs one sync there
        self._first_prefill = int(self.cumulative_length) == 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the batch rows in place (the buffers keep their addresses)."""
        scales = (self._key_scales, self._value_scales) if self._token_scales else ()
        for buffer in (self._key_bytes, self._value_bytes, *scales):
            buffer.copy_(buffer.index_select(0, beam_idx.to(buffer.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("FP8StaticCache has a fixed batch; use QuantizedFP8Cache to grow the batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("FP8StaticCache has a fixed batch; use QuantizedFP8Cache to select rows")


class FP8StaticCache(Cache):
    """A compileable transformers Cache that stores K and V in FP8 in buffers of ``max_cache_len`` tokens. Every
    argument after ``max_cache_len`` is keyword-only.

    Args:
        config: the model's config; one layer per decoder layer, built from the config's layer types as
            transformers' ``StaticCache`` builds them: full attention ``FP8StaticLayer``, sliding-window and
            chunked attention ``FP8StaticSlidingLayer`` (``static_sliding.py``, a ring of the window's size), layers
            keeping only states (linear attention, SSM, conv) or nothing (KV sharing) transformers' own classes,
            hybrid layers (states and K/V) ``FP8HybridLayer`` around an FP8 static layer (``hybrid.py``).
        max_cache_len: tokens per sequence the full-attention buffers hold (prompt plus new tokens); sliding layers
            hold ``min(sliding_window, max_cache_len)``.
        max_batch_size: the largest batch (times beams) it accepts; the buffers are made for the batch of the
            first update. None: no limit.
        kv_cache_dtype, calculate_kv_scales, strategy, scales: as for ``QuantizedFP8Cache``.
        quantize_query: FP8 queries where our attention reads the cache, as for ``QuantizedFP8Cache`` (e4m3 codes; on
            CUDA compute capability 8.9+). The first prefill attends over its exact K/V, as always in this cache.
    """

    def __init__(
        self,
        config,
        max_cache_len: int,
        *,
        max_batch_size: int | None = None,
        kv_cache_dtype: str | torch.dtype = "fp8",
        scales: KVScales | None = None,
        strategy: str | None = None,
        calculate_kv_scales: bool = False,
        quantize_query: bool = False,
    ) -> None:
        if isinstance(max_cache_len, bool) or not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"max_cache_len must be an int >= 1, got {max_cache_len!r}")
        if max_batch_size is not None and (
            isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1
        ):
            raise ValueError(f"max_batch_size must be None or an int >= 1, got {max_batch_size!r}")
        self.format, self.strategy = resolve_cache_options(kv_cache_dtype, calculate_kv_scales, strategy, scales)
        check_query_quantization_option(quantize_query, self.format)
        self.quantize_query = quantize_query
        self._max_cache_len = max_cache_len
        self.scales = scales
        self._workspace = DequantWorkspace(static=True)
        self._row_starts = StaticRowStarts()  # before the layers: a deepcopy of the cache copies it first
        check_model_scales(config, scales)
        settings = dict(fmt=self.format, strategy=self.strategy, calculate_kv_scales=calculate_kv_scales,
                        attention_config=config, max_batch_size=max_batch_size,
                        quantize_query=quantize_query)  # fmt: skip
        shared = shared_kv_layers(config)  # their dequantized K/V must outlive the next layer's update: own workspace

        def kv_layer(i: int, layer_type: str, window: int | None) -> FP8StaticLayer:
            workspace = DequantWorkspace(static=True) if i in shared else self._workspace
            return self._new_layer(i, window, scales=layer_scales(scales, i), workspace=workspace, **settings)

        layers = build_layers(config, kv_layer)
        # the layer whose length bounds the step: the first full-attention one (sliding layers take any number of
        # tokens; state layers hold no tokens)
        self._capacity_layer = next(
            (i for i, layer in enumerate(layers) if getattr(layer, "is_sliding", True) is False), None
        )
        super().__init__(layers=layers)

    def _new_layer(self, layer_idx: int, sliding_window: int | None, **settings) -> FP8StaticLayer:
        """Layer ``layer_idx``: full attention (sharing the cache's row starts) or a sliding-window ring."""
        if sliding_window is None:
            return FP8StaticLayer(self._max_cache_len, layer_idx=layer_idx, row_starts=self._row_starts, **settings)
        from .static_sliding import FP8StaticSlidingLayer  # it imports this module

        return FP8StaticSlidingLayer(self._max_cache_len, sliding_window, layer_idx=layer_idx, **settings)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path,
        config,
        max_cache_len: int,
        *,
        kv_cache_dtype: str | torch.dtype = "fp8",
        max_batch_size: int | None = None,
        quantize_query: bool = False,
        **loader_options,
    ) -> FP8StaticCache:
        """A static cache with the KV scales of a checkpoint (local directory or Hub id), as
        ``QuantizedFP8Cache.from_pretrained``.

        Args:
            name_or_path: a local directory or a Hub repo id (``checkpoint.load_kv_scales``).
            config, max_cache_len, max_batch_size, quantize_query: as for the constructor.
            kv_cache_dtype: the storage format; scales stored as ROCm e4m3fnuz are doubled, as vLLM does.
            loader_options: ``checkpoint.load_kv_scales``'s ``missing``, ``revision``, ``token``, ``cache_dir``,
                ``local_files_only``.
        """
        fmt, scales = model_checkpoint_scales(name_or_path, config, kv_cache_dtype, **loader_options)
        return cls(
            config,
            max_cache_len,
            max_batch_size=max_batch_size,
            kv_cache_dtype=fmt,
            scales=scales,
            quantize_query=quantize_query,
        )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"layer {layer_idx} is outside this cache's {len(self.layers)} layers")
        layer = self.layers[layer_idx]
        if layer_idx == self._capacity_layer and layer.is_initialized:  # once per forward: all full layers agree
            getattr(layer, "attention", layer).check_capacity(key_states.shape[2])  # (a hybrid layer's K/V part)
        return layer.update(key_states, value_states)

    @property
    def max_cache_len(self) -> int:  # transformers <= 5.23 has a read-only property of this name on Cache
        return self._max_cache_len

    @property
    def kv_layers(self) -> list:
        """The layers holding FP8 K/V (hybrid layers included); the others keep transformers' states or nothing."""
        return [layer for layer in self.layers if isinstance(layer, (FP8StaticLayer, FP8HybridLayer))]

    @property
    def allocated_nbytes(self) -> int:
        """Bytes of all FP8 buffers (``max_cache_len`` tokens each, one more where per-token-head scales round an odd
        length up) and scales."""
        return sum(layer.allocated_nbytes for layer in self.kv_layers)

    def __repr__(self) -> str:
        return (
            f"FP8StaticCache(format={self.format.name}, strategy={self.strategy!r}, layers={len(self.layers)}, "
            f"max_cache_len={self.max_cache_len})"
        )
