"""Triton kernels of hf_fp8cache and their dispatch (installed as ``hf_fp8cache.kernels``; never imports transformers).

Each public function validates its arguments once, then runs the Triton kernel for CUDA tensors (and for CPU
tensors when ``TRITON_INTERPRET=1`` is set, as the tests do), and the torch twin in ``reference.py`` otherwise.
Both paths write the same bytes.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch

from hf_fp8cache.formats import FP8Format

from . import reference

__all__ = ["RecentWindow", "quantize_append_kv", "dequantize_kv", "decode_attention", "uses_triton"]

_HAS_TRITON = importlib.util.find_spec("triton") is not None


class RecentWindow(NamedTuple):
    """The exact K/V of the most recent cached positions ``[start, kv_length)`` for ``decode_attention``.

    ``keys`` / ``values``: ring buffers ``[B, H, R, D]`` in the query's dtype; position p sits at slot ``p % R``, so
    at most R positions (``kv_length - start <= R``).
    """

    keys: torch.Tensor
    values: torch.Tensor
    start: int


def uses_triton(tensor: torch.Tensor) -> bool:
    """Whether the kernels run through Triton for this tensor: CUDA tensors, or any tensor under the interpreter."""
    if not _HAS_TRITON:
        return False
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_scales(name: str, first: torch.Tensor, second: torch.Tensor, heads: int) -> None:
    for scale in (first, second):
        if scale.dtype != torch.float32 or not scale.is_contiguous() or scale.numel() not in (1, heads):
            raise ValueError(
                f"{name} must be contiguous float32 with 1 or {heads} elements, got {scale.dtype} {tuple(scale.shape)}"
            )


def _check_caches(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    for cache in (key_cache, value_cache):
        if cache.dtype != torch.uint8 or cache.dim() != 4 or not cache.is_contiguous():
            raise ValueError(
                f"caches must be contiguous 4-D uint8 views of fp8 buffers, got {cache.dtype} {cache.shape}"
            )
    if key_cache.shape != value_cache.shape:
        raise ValueError(f"key cache {tuple(key_cache.shape)} and value cache {tuple(value_cache.shape)} differ")


def quantize_append_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    start: int | torch.Tensor,
    key_inv_scale: torch.Tensor,
    value_inv_scale: torch.Tensor,
    fmt: FP8Format,
) -> None:
    """Quantize K and V ``[B, H, S, D]`` into ``cache[:, :, start:start + S]`` (saturating, round-to-nearest-even).

    ``start`` is an int, or a one-element integer tensor on the cache's device read there (positions from it at or
    beyond the capacity are then dropped: the caller checks the capacity on the device)."""
    if key.dim() != 4 or value.shape != key.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must be the same [B, H, S, D] shape")
    _check_caches(key_cache, value_cache)
    B, H, S, D = key.shape
    if isinstance(start, torch.Tensor):  # read on the device; the kernel writes no position beyond the capacity
        if start.dtype not in (torch.int32, torch.int64) or start.numel() != 1 or start.device != key_cache.device:
            raise ValueError(f"a start tensor must be one int32/int64 element on {key_cache.device}, got "
                             f"{start.dtype} {tuple(start.shape)} on {start.device}")  # fmt: skip
        known_start = 0
    else:
        known_start = start
    if key_cache.shape[:2] != (B, H) or key_cache.shape[3] != D or not 0 <= known_start <= key_cache.shape[2] - S:
        raise ValueError(f"cache {tuple(key_cache.shape)} cannot take {tuple(key.shape)} at position {start}")
    _check_scales("inverse scales", key_inv_scale, value_inv_scale, H)
    if uses_triton(key):
        from .quantize import quantize_append_kv as run
    else:
        run = reference.quantize_append_kv_ref
    run(key, value, key_cache, value_cache, start, key_inv_scale, value_inv_scale, fmt)


def dequantize_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    length: int,
    key_scale: torch.Tensor,
    value_scale: torch.Tensor,
    fmt: FP8Format,
    key_out: torch.Tensor,
    value_out: torch.Tensor,
) -> None:
    """Write ``fp8 * scale`` of the first ``length`` cached tokens into contiguous ``key_out`` / ``value_out``."""
    _check_caches(key_cache, value_cache)
    B, H, capacity, D = key_cache.shape
    if not 0 <= length <= capacity:
        raise ValueError(f"length {length} is outside the cache capacity {capacity}")
    for out in (key_out, value_out):
        if tuple(out.shape) != (B, H, length, D) or not out.is_contiguous():
            raise ValueError(f"output {tuple(out.shape)} must be contiguous {(B, H, length, D)}")
    _check_scales("scales", key_scale, value_scale, H)
    if uses_triton(key_cache):
        from .dequantize import dequantize_kv as run
    else:
        run = reference.dequantize_kv_ref
    run(key_cache, value_cache, length, key_scale, value_scale, fmt, key_out, value_out)


def _check_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_length: int | torch.Tensor,
    kv_start: torch.Tensor,
    key_scale: torch.Tensor,
    value_scale: torch.Tensor,
    fmt: FP8Format,
    out: torch.Tensor | None,
    recent: RecentWindow | None,
) -> None:
    """Validate the arguments of ``decode_attention`` (shared by the dispatch and the Triton launcher)."""
    if fmt.fnuz:
        raise ValueError(f"decode attention does not support the {fmt.name} format; use e4m3fn or e5m2")
    _check_caches(key_cache, value_cache)
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
    if isinstance(kv_length, torch.Tensor):  # read on the device: only its form and the capacity are checked here
        if kv_length.dtype not in (torch.int32, torch.int64) or kv_length.numel() != 1:
            raise ValueError(f"a kv_length tensor must be one int32/int64 element, got {kv_length.dtype} "
                             f"{tuple(kv_length.shape)}")  # fmt: skip
        if recent is not None:
            raise ValueError("an exact recent window needs a Python int kv_length")
        if not 1 <= Sq <= capacity:
            raise ValueError(f"need 1 <= query length {Sq} <= cache capacity {capacity}")
    elif not 1 <= Sq <= kv_length <= capacity:
        raise ValueError(f"need 1 <= query length {Sq} <= kv_length {kv_length} <= cache capacity {capacity}")
    if kv_start.dtype != torch.int32 or tuple(kv_start.shape) != (B,):
        raise ValueError(f"kv_start must be int32 of shape ({B},), got {kv_start.dtype} {tuple(kv_start.shape)}")
    _check_scales("scales", key_scale, value_scale, H)
    if out is not None and (tuple(out.shape) != (B, Sq, Hq, D) or out.dtype != query.dtype or not out.is_contiguous()):
        raise ValueError(f"out must be contiguous {query.dtype} {(B, Sq, Hq, D)}, got {out.dtype} {tuple(out.shape)}")
    if recent is not None:
        ring = recent.keys
        if ring.dim() != 4 or ring.shape[:2] != (B, H) or ring.shape[3] != D or ring.shape[2] == 0:
            raise ValueError(f"recent window buffers must be [{B}, {H}, R, {D}], got {tuple(ring.shape)}")
        if recent.values.shape != ring.shape or ring.dtype != query.dtype or recent.values.dtype != query.dtype:
            raise ValueError(f"recent window keys and values must both be {query.dtype} {tuple(ring.shape)}")
        if ring.stride(3) != 1 or recent.values.stride() != ring.stride():
            raise ValueError("recent window buffers must have the same strides, contiguous along the head dim")
        if not 0 <= kv_length - recent.start <= ring.shape[2]:
            raise ValueError(
                f"recent window start {recent.start} must be in [{kv_length - ring.shape[2]}, {kv_length}] "
                f"(kv_length {kv_length}, {ring.shape[2]} slots)"
            )
    tensors = (key_cache, value_cache, kv_start, key_scale, value_scale) + (() if out is None else (out,))
    tensors += (kv_length,) if isinstance(kv_length, torch.Tensor) else ()
    tensors += () if recent is None else tuple(recent[:2])
    if any(t.device != query.device for t in tensors):
        raise ValueError("query, caches, kv_start, kv_length, scales and out must be on one device")


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_length: int | torch.Tensor,
    kv_start: torch.Tensor,
    key_scale: torch.Tensor,
    value_scale: torch.Tensor,
    fmt: FP8Format,
    sm_scale: float,
    out: torch.Tensor | None = None,
    recent: RecentWindow | None = None,
) -> torch.Tensor:
    """Attention of ``query`` ``[B, Hq, Sq, D]`` over the first ``kv_length`` cached fp8 tokens -> ``[B, Sq, Hq, D]``.

    ``kv_length`` is an int, or a one-element integer tensor on the query's device that the kernel reads there
    (the static cache's filled length: no host value changes from step to step, as torch.compile and CUDA graphs
    need).

    Query row i sits at position ``kv_length - Sq + i`` and sees positions ``kv_start[b]`` up to its own (causal,
    left padding masked); ``Hq`` is a multiple of the cache's KV heads (GQA). With ``recent``, the positions of
    that window are read exactly from its ring buffers instead of the fp8 cache. Output in the query's dtype,
    written into ``out`` when given.
    """
    if uses_triton(query):
        from .attention import decode_attention_fp8 as run  # validates the arguments itself
    else:
        _check_decode_attention(query, key_cache, value_cache, kv_length, kv_start, key_scale, value_scale, fmt, out,
                                recent)  # fmt: skip
        run = reference.decode_attention_fp8_ref
    return run(query, key_cache, value_cache, kv_length, kv_start, key_scale, value_scale, fmt, sm_scale, out, recent)
