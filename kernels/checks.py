"""Argument checks of the kernels, shared by the dispatch (``dispatch.py``) and the Triton launchers.

Each ``check_<kernel>`` takes the kernel's arguments and raises ``ValueError`` naming the bad value; nothing here
reads a tensor's contents or synchronizes with the device.
"""

from __future__ import annotations

import torch

from .formats import Int8Format, StorageFormat
from .new_tokens import NewTokens
from .recent_window import RecentWindow

__all__ = [
    "check_scales",
    "check_caches",
    "check_quantize_append_kv",
    "check_dequantize_kv",
    "check_decode_attention",
    "check_decode_lengths",
    "check_append_position",
    "check_attention_options",
    "check_new_tokens",
    "check_query_quantization",
    "has_fp8_tensor_cores",
    "check_token_scales",
    "check_quantize_append_token_head",
    "check_dequantize_token_head",
]


def check_scales(name: str, first: torch.Tensor, second: torch.Tensor, heads: int) -> None:
    for scale in (first, second):
        if scale.dtype != torch.float32 or not scale.is_contiguous() or scale.numel() not in (1, heads):
            raise ValueError(
                f"{name} must be contiguous float32 with 1 or {heads} elements, got {scale.dtype} {tuple(scale.shape)}"
            )


def check_token_scales(key_scales: torch.Tensor, value_scales: torch.Tensor, key_cache: torch.Tensor) -> None:
    """Per-token-head scales: contiguous bf16 ``[B, H, capacity]``, one per cached (token, head) of ``key_cache``."""
    shape = tuple(key_cache.shape[:3])
    for scales in (key_scales, value_scales):
        if scales.dtype != torch.bfloat16 or tuple(scales.shape) != shape or not scales.is_contiguous():
            raise ValueError(f"per-token-head scales must be contiguous bfloat16 {shape} (the codes' [B, H, "
                             f"capacity]), got {scales.dtype} {tuple(scales.shape)}")  # fmt: skip
        if scales.device != key_cache.device:
            raise ValueError(f"per-token-head scales are on {scales.device}, the codes on {key_cache.device}")


def check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor, *, token_slices: bool = False) -> None:
    """Contiguous 4-D uint8 caches of one shape; with ``token_slices``, also a range of tokens of such caches (rows
    contiguous, the same strides for both: what a kernel addressing them by strides takes)."""
    for cache in (key_cache, value_cache):
        rows = cache.dim() == 4 and cache.stride(3) == 1 and cache.stride() == key_cache.stride()
        if cache.dtype != torch.uint8 or not (rows if token_slices else cache.dim() == 4 and cache.is_contiguous()):
            what = "(token ranges of) contiguous" if token_slices else "contiguous"
            raise ValueError(f"caches must be {what} 4-D uint8 views of fp8 buffers, got {cache.dtype} {cache.shape}")
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"key cache {tuple(key_cache.shape)} and value cache {tuple(value_cache.shape)} differ")


def check_quantize_append_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    start: int | torch.Tensor,
    key_inv_scale: torch.Tensor,
    value_inv_scale: torch.Tensor,
) -> None:
    """Validate the arguments of ``quantize_append_kv`` (a start tensor only by its form: it is read on the device)."""
    _check_append(key, value, key_cache, value_cache, start, "cache")
    check_scales("inverse scales", key_inv_scale, value_inv_scale, key.shape[1])


def check_quantize_append_token_head(
    key: torch.Tensor,
    value: torch.Tensor,
    key_codes: torch.Tensor,
    value_codes: torch.Tensor,
    key_scales: torch.Tensor,
    value_scales: torch.Tensor,
    start: int | torch.Tensor,
) -> None:
    """Validate the arguments of ``quantize_append_token_head`` (a start tensor only by its form: it is read on the
    device)."""
    _check_append(key, value, key_codes, value_codes, start, "codes")
    check_token_scales(key_scales, value_scales, key_codes)


def _check_append(
    key: torch.Tensor, value: torch.Tensor, key_buffer: torch.Tensor, value_buffer: torch.Tensor,
    start: int | torch.Tensor, what: str,
) -> None:  # fmt: skip
    """K/V ``[B, H, S, D]`` of one shape that fit contiguous 4-D uint8 buffers (``what``: their name in the error) at
    ``start``: what both quantize-and-append kernels take."""
    if key.dim() != 4 or value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must be the same [B, H, S, D] shape")
    check_caches(key_buffer, value_buffer)
    B, H, S, D = key.shape
    if key_buffer.shape[:2] != (B, H) or key_buffer.shape[3] != D:
        raise ValueError(f"{what} {tuple(key_buffer.shape)} cannot take {tuple(key.shape)} at position {start}")
    check_append_position(key, key_buffer, start, what)


def check_append_position(
    key: torch.Tensor, key_buffer: torch.Tensor, start: int | torch.Tensor, what: str = "cache"
) -> None:
    """What ``_check_append`` checks of the value that changes from call to call: K's ``S`` tokens fit the buffer at
    ``start`` (a start tensor by its form only)."""
    if not 0 <= _known_start(start, key_buffer.device) <= key_buffer.shape[2] - key.shape[2]:
        raise ValueError(f"{what} {tuple(key_buffer.shape)} cannot take {tuple(key.shape)} at position {start}")


def check_dequantize_token_head(
    key_codes: torch.Tensor,
    value_codes: torch.Tensor,
    key_scales: torch.Tensor,
    value_scales: torch.Tensor,
    length: int,
    key_out: torch.Tensor,
    value_out: torch.Tensor,
) -> None:
    """Validate the arguments of ``dequantize_token_head`` (whole buffers: the first ``length`` tokens are read)."""
    check_caches(key_codes, value_codes)
    _check_dequantized_outputs(key_codes, length, key_out, value_out)
    check_token_scales(key_scales, value_scales, key_codes)


def _known_start(start: int | torch.Tensor, device: torch.device) -> int:
    """A write position as far as the host knows it: an int, or 0 for a one-element int32/int64 tensor on ``device``
    (read there; the kernels write no position beyond the capacity)."""
    if isinstance(start, torch.Tensor):
        if start.dtype not in (torch.int32, torch.int64) or start.numel() != 1 or start.device != device:
            raise ValueError(f"a start tensor must be one int32/int64 element on {device}, got "
                             f"{start.dtype} {tuple(start.shape)} on {start.device}")  # fmt: skip
        return 0
    if isinstance(start, bool) or not isinstance(start, int):
        raise ValueError(f"start must be an int or a one-element tensor, got {type(start).__name__}")
    return start


def check_dequantize_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    length: int,
    key_scale: torch.Tensor,
    value_scale: torch.Tensor,
    key_out: torch.Tensor,
    value_out: torch.Tensor,
) -> None:
    """Validate the arguments of ``dequantize_kv`` (which also reads a range of tokens of the caches)."""
    check_caches(key_cache, value_cache, token_slices=True)
    _check_dequantized_outputs(key_cache, length, key_out, value_out)
    check_scales("scales", key_scale, value_scale, key_cache.shape[1])


def _check_dequantized_outputs(
    key_cache: torch.Tensor, length: int, key_out: torch.Tensor, value_out: torch.Tensor
) -> None:
    """A length within the cache's capacity, and contiguous ``[B, H, length, D]`` outputs."""
    B, H, capacity, D = key_cache.shape
    if not 0 <= length <= capacity:
        raise ValueError(f"length {length} is outside the cache capacity {capacity}")
    for out in (key_out, value_out):
        if tuple(out.shape) != (B, H, length, D) or not out.is_contiguous():
            raise ValueError(f"output {tuple(out.shape)} must be contiguous {(B, H, length, D)}")


def check_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_length: int | torch.Tensor,
    kv_start: torch.Tensor,
    key_scale: torch.Tensor,
    value_scale: torch.Tensor,
    fmt: StorageFormat,
    out: torch.Tensor | None,
    recent: RecentWindow | None,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    new: NewTokens | None = None,
    ring: bool = False,
    quantize_query: bool = False,
) -> None:
    """Validate the arguments of ``decode_attention`` (shared by the dispatch and the Triton launcher)."""
    if fmt.fnuz:
        raise ValueError(f"decode attention does not support the {fmt.name} format; use e4m3fn or e5m2")
    check_caches(key_cache, value_cache)
    if query.dim() != 4 or query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"query must be 4-D fp16 / bf16 / fp32 [B, Hq, Sq, D], got {query.dtype} {tuple(query.shape)}")
    B, Hq, Sq, D = query.shape
    _, H, capacity, _ = key_cache.shape
    if key_cache.shape[0] != B or key_cache.shape[3] != D or H == 0 or Hq % H != 0:
        raise ValueError(
            f"query {tuple(query.shape)} does not fit the cache {tuple(key_cache.shape)}: "
            "batch and head dim must match and the query heads must be a multiple of the KV heads"
        )
    if D > 256:
        raise ValueError(f"head dim {D} is larger than the supported 256")
    if ring:
        _check_ring(Sq, capacity, kv_length, recent, new, sliding_window)
    if isinstance(kv_length, torch.Tensor):  # read on the device: only its form and the capacity are checked here
        if kv_length.dtype not in (torch.int32, torch.int64) or kv_length.numel() != 1:
            raise ValueError(f"a kv_length tensor must be one int32/int64 element, got {kv_length.dtype} "
                             f"{tuple(kv_length.shape)}")  # fmt: skip
        if recent is not None:
            raise ValueError("an exact recent window needs a Python int kv_length")
        if not 1 <= Sq <= capacity:
            raise ValueError(f"need 1 <= query length {Sq} <= cache capacity {capacity}")
    if kv_start.dtype != torch.int32 or tuple(kv_start.shape) != (B,):
        raise ValueError(f"kv_start must be int32 of shape ({B},), got {kv_start.dtype} {tuple(kv_start.shape)}")
    if key_scale.dim() == 3:  # per token and head
        check_token_scales(key_scale, value_scale, key_cache)
    elif isinstance(fmt, Int8Format):
        raise ValueError(f"int8 codes need per-token-head scales (bf16 [B, H, capacity]), got {key_scale.dtype} "
                         f"{tuple(key_scale.shape)}")  # fmt: skip
    else:
        check_scales("scales", key_scale, value_scale, H)
    if out is not None and (tuple(out.shape) != (B, Sq, Hq, D) or out.dtype != query.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous {query.dtype} {(B, Sq, Hq, D)}, got {out.dtype} {tuple(out.shape)}")
    if new is not None:
        check_new_tokens(new, query, H, kv_length, recent)
    if quantize_query:
        check_query_quantization(query, fmt, recent)
    if recent is not None:
        exact_keys = recent.keys
        exact_shape = tuple(exact_keys.shape)
        if exact_keys.dim() != 4 or exact_shape[:2] != (B, H) or exact_shape[3] != D or exact_shape[2] == 0:
            raise ValueError(f"recent window buffers must be [{B}, {H}, R, {D}], got {tuple(exact_keys.shape)}")
        if recent.values.shape != exact_keys.shape or {exact_keys.dtype, recent.values.dtype} != {query.dtype}:
            raise ValueError(f"recent window keys and values must both be {query.dtype} {tuple(exact_keys.shape)}")
        if exact_keys.stride(3) != 1 or recent.values.stride() != exact_keys.stride():
            raise ValueError("recent window buffers must have the same strides, contiguous along the head dim")
    check_attention_options(Hq, sliding_window, sinks, softcap)
    tensors = (key_cache, value_cache, kv_start, key_scale, value_scale) + (() if out is None else (out,))
    tensors += () if sinks is None else (sinks,)
    tensors += (kv_length,) if isinstance(kv_length, torch.Tensor) else ()
    tensors += () if recent is None else tuple(recent[:2])
    if any(t.device != query.device for t in tensors):
        raise ValueError("query, caches, kv_start, kv_length, scales, sinks and out must be on one device")
    check_decode_lengths(query, key_cache, kv_length, recent)


def check_decode_lengths(
    query: torch.Tensor, key_cache: torch.Tensor, kv_length: int | torch.Tensor, recent: RecentWindow | None
) -> None:
    """What ``check_decode_attention`` checks of the values that change from step to step: an int ``kv_length`` between
    the query length and the capacity, and an exact window's start within its slots before it. The rest of a call
    (shapes, dtypes, devices, options) is what a ``LaunchMemo`` remembers as checked (``kernels/attention.py``)."""
    if isinstance(kv_length, torch.Tensor):
        return
    Sq, capacity = query.shape[2], key_cache.shape[2]
    if not 1 <= Sq <= kv_length <= capacity:
        raise ValueError(f"need 1 <= query length {Sq} <= kv_length {kv_length} <= cache capacity {capacity}")
    if recent is not None and not 0 <= kv_length - recent.start <= recent.keys.shape[2]:
        raise ValueError(
            f"recent window start {recent.start} must be in [{kv_length - recent.keys.shape[2]}, {kv_length}] "
            f"(kv_length {kv_length}, {recent.keys.shape[2]} slots)"
        )


def _check_ring(
    Sq: int, capacity: int, kv_length: int | torch.Tensor, recent: RecentWindow | None, new: NewTokens | None,
    sliding_window: int | None,
) -> None:  # fmt: skip
    """A ring of ``capacity`` slots (the static sliding layer's) is read for one query token whose window covers the
    whole ring, with the length on the device, and no exact window or new token."""
    if Sq != 1 or not isinstance(kv_length, torch.Tensor) or recent is not None or new is not None:
        raise ValueError(
            f"a ring is read for one query token with a device kv_length and no exact window or new tokens; got {Sq} "
            f"query tokens, kv_length {type(kv_length).__name__}, recent window {recent is not None}, new tokens "
            f"{new is not None}"
        )
    if sliding_window is None or sliding_window < capacity:
        raise ValueError(f"a ring of {capacity} slots needs a sliding window of at least {capacity}, got "
                         f"{sliding_window}")  # fmt: skip


def check_attention_options(
    query_heads: int, sliding_window: int | None, sinks: torch.Tensor | None, softcap: float | None
) -> None:
    """Validate decode attention's optional sliding window (an int >= 1), sinks (float32 ``[Hq]``) and softcap
    (a finite float > 0)."""
    if sliding_window is not None and (
        isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1
    ):
        raise ValueError(f"sliding_window must be an int >= 1 or None, got {sliding_window!r}")
    if sinks is not None and (
        sinks.dtype != torch.float32 or not sinks.is_contiguous() or tuple(sinks.shape) != (query_heads,)
    ):
        raise ValueError(
            f"sinks must be contiguous float32 of shape ({query_heads},), got {sinks.dtype} {tuple(sinks.shape)}"
        )
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < float("inf")):
        raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap!r}")


def check_query_quantization(query: torch.Tensor, fmt: StorageFormat, recent: RecentWindow | None) -> None:
    """FP8 queries (``quantize_query``): e4m3fn codes (Q @ K^T's operands are e4m3: the keys' codes as stored), no
    exact recent window (its bf16 keys are not FP8), and on a CUDA device FP8 tensor cores (compute capability 8.9 or
    later)."""
    if getattr(fmt, "name", None) != "e4m3fn":
        raise ValueError(f"quantize_query needs e4m3fn codes (kv_cache_dtype 'fp8_e4m3'), got {fmt.name}")
    if recent is not None:
        raise ValueError("quantize_query does not take an exact recent window (residual_length): its keys are bf16")
    if not has_fp8_tensor_cores(query.device):
        capability = ".".join(map(str, torch.cuda.get_device_capability(query.device)))
        raise ValueError(f"quantize_query needs FP8 tensor cores (compute capability 8.9 or later); "
                         f"{torch.cuda.get_device_name(query.device)} has {capability}")  # fmt: skip


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """Whether FP8 queries run on ``device``: a GPU of compute capability 8.9 or later, or the CPU (interpreter or
    torch twin)."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def check_new_tokens(
    new: NewTokens, query: torch.Tensor, heads: int, kv_length: int | torch.Tensor, recent: RecentWindow | None
) -> None:
    """The step's own K/V that ``decode_attention`` writes (``new_tokens.py``): one query token, an int length, no
    exact window, K/V ``[B, H, 1, D]`` in the query's dtype on its device."""
    B, _, Sq, D = query.shape
    if Sq != 1 or isinstance(kv_length, torch.Tensor) or recent is not None:
        raise ValueError(
            f"new tokens need one query token, an int kv_length and no exact window; got {Sq} query tokens, "
            f"kv_length {type(kv_length).__name__}, recent window {recent is not None}"
        )
    for name, x in (("new keys", new.keys), ("new values", new.values)):
        if tuple(x.shape) != (B, heads, 1, D) or x.dtype != query.dtype or x.device != query.device:
            raise ValueError(f"{name} must be {query.dtype} {(B, heads, 1, D)} on {query.device}, got {x.dtype} "
                             f"{tuple(x.shape)} on {x.device}")  # fmt: skip
    check_scales("new tokens' inverse scales", new.key_inv_scale, new.value_inv_scale, heads)
