"""Fused quantize-and-append of K and V into the FP8 cache: one launch per layer update.

    cache[b, h, start + s, d] = fp8(saturate(x[b, h, s, d] * inv_scale[h]))      for K and for V

Layout ``[B, H, S, D]``; inputs fp16 / bf16 / fp32 with any strides (transformers hands over transposed views);
caches are uint8 views of contiguous fp8 buffers ``[B, H, capacity, D]``. ``inv_scale`` has 1 element (per
tensor, stride 0) or H (per KV head). ``start`` is a Python int, or a one-element integer tensor read on the device
(the static cache's filled length, so that a compiled or graphed step needs no host value); then positions at or
beyond the capacity are not written. Rounding is to nearest even through ``fp8_codec.encode_fp8``, bit-identical
to ``reference.quantize_append_kv_ref`` on the GPU and under the Triton interpreter.

Grid: one program per (b, h) row and block of BLOCK_S tokens; K and V are handled by the same program so the
update is a single launch.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .formats import FP8Format
from .fp8_codec import encode_fp8, token_tiles
from .launch import LaunchMemo, launch


@triton.jit(do_not_specialize=["start"])
def _quantize_append_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, key_inv_scale_ptr, value_inv_scale_ptr, start_ptr,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_cb, stride_ch, stride_cs,
    scale_stride_h,
    H, S, D, start, capacity,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, BIAS: tl.constexpr, FMAX: tl.constexpr, FNUZ: tl.constexpr,
    START_IN_MEMORY: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    if START_IN_MEMORY:
        start = tl.load(start_ptr).to(tl.int64)
    mask = (s[:, None] < S) & (start + s[:, None] < capacity) & (d[None, :] < D)
    cache_offsets = b * stride_cb + h * stride_ch + (start + s[:, None]) * stride_cs + d[None, :]

    key = tl.load(key_ptr + b * stride_kb + h * stride_kh + s[:, None] * stride_ks + d[None, :] * stride_kd, mask=mask)
    key = key.to(tl.float32) * tl.load(key_inv_scale_ptr + h * scale_stride_h)
    tl.store(key_cache_ptr + cache_offsets, encode_fp8(key, MANTISSA_BITS, BIAS, FMAX, FNUZ), mask=mask)

    value = tl.load(
        value_ptr + b * stride_vb + h * stride_vh + s[:, None] * stride_vs + d[None, :] * stride_vd, mask=mask
    )
    value = value.to(tl.float32) * tl.load(value_inv_scale_ptr + h * scale_stride_h)
    tl.store(value_cache_ptr + cache_offsets, encode_fp8(value, MANTISSA_BITS, BIAS, FMAX, FNUZ), mask=mask)


def quantize_append_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    start: int | torch.Tensor,
    key_inv_scale: torch.Tensor,
    value_inv_scale: torch.Tensor,
    fmt: FP8Format,
    memo: LaunchMemo | None = None,
) -> None:
    """Quantize ``key``/``value`` ``[B, H, S, D]`` and write them at ``cache[:, :, start:start + S]`` (relaunching
    the kernel of ``memo``'s last launch when it fits: ``launch.py``)."""
    start_in_memory = isinstance(start, torch.Tensor)
    B, H, S, D = key.shape
    if S == 0 or B == 0:
        return
    grid, BLOCK_S, BLOCK_D = token_tiles(B, H, S, D)
    args = (
        key, value, key_cache, value_cache, key_inv_scale, value_inv_scale, start if start_in_memory else key_cache,
        *key.stride(), *value.stride(), *key_cache.stride()[:3],
        0 if key_inv_scale.numel() == 1 else 1,
        H, S, D, 0 if start_in_memory else start, key_cache.shape[2],
    )  # fmt: skip
    launch(_quantize_append_kv_kernel, grid, args, _launch_meta(BLOCK_S, BLOCK_D, fmt, start_in_memory), memo)


@functools.lru_cache(maxsize=256)  # every update asks: one shared read-only dict (the memo compares by identity first)
def _launch_meta(BLOCK_S: int, BLOCK_D: int, fmt: FP8Format, start_in_memory: bool) -> dict:
    c = fmt.codec_constants()
    return dict(
        BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D,
        MANTISSA_BITS=c["MANTISSA_BITS"], BIAS=c["BIAS"], FMAX=c["FMAX"], FNUZ=c["FNUZ"],
        START_IN_MEMORY=start_in_memory,
    )  # fmt: skip
