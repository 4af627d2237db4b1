"""Dequantize the first ``length`` tokens of the FP8 K and V caches into a reused workspace: one launch.

    out[b, h, s, d] = decode(cache[b, h, s, d]) * scale[h]          (fp32 product, rounded to out's dtype)

Layout ``[B, H, S, D]``; caches are uint8 views of contiguous fp8 buffers ``[B, H, capacity, D]``; outputs are
contiguous ``[B, H, length, D]`` in the model's dtype. ``scale`` has 1 element (per tensor) or H. Decoding goes
through ``fp8_codec.decode_fp8`` (exact), so the result is bit-identical to ``reference.dequantize_kv_ref``.

This is the read path that serves every attention implementation; our own attention (a later issue) reads the
fp8 bytes directly instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .formats import FP8Format
from .fp8_codec import decode_fp8, round_to_output, token_tiles
from .launch import LaunchMemo, launch


@triton.jit
def _dequantize_kv_kernel(
    key_cache_ptr, value_cache_ptr, key_scale_ptr, value_scale_ptr, key_out_ptr, value_out_ptr,
    stride_cb, stride_ch, stride_cs,
    scale_stride_h,
    H, S, D,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, BIAS: tl.constexpr, SUBNORMAL_STEP: tl.constexpr,
    FNUZ: tl.constexpr, HAS_INF: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    mask = (s[:, None] < S) & (d[None, :] < D)
    cache_offsets = b * stride_cb + h * stride_ch + s[:, None] * stride_cs + d[None, :]
    out_offsets = (pid_bh * S + s[:, None]) * D + d[None, :]  # contiguous [B, H, S, D]

    key = decode_fp8(
        tl.load(key_cache_ptr + cache_offsets, mask=mask), MANTISSA_BITS, BIAS, SUBNORMAL_STEP, FNUZ, HAS_INF
    )
    key = key * tl.load(key_scale_ptr + h * scale_stride_h)
    tl.store(key_out_ptr + out_offsets, round_to_output(key, key_out_ptr), mask=mask)

    value = decode_fp8(
        tl.load(value_cache_ptr + cache_offsets, mask=mask), MANTISSA_BITS, BIAS, SUBNORMAL_STEP, FNUZ, HAS_INF
    )
    value = value * tl.load(value_scale_ptr + h * scale_stride_h)
    tl.store(value_out_ptr + out_offsets, round_to_output(value, value_out_ptr), mask=mask)


def dequantize_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    length: int,
    key_scale: torch.Tensor,
    value_scale: torch.Tensor,
    fmt: FP8Format,
    key_out: torch.Tensor,
    value_out: torch.Tensor,
    memo: LaunchMemo | None = None,
) -> None:
    """Write ``fp8 * scale`` of the first ``length`` tokens into contiguous ``key_out`` / ``value_out`` (relaunching
    the kernel of ``memo``'s last launch when it fits: ``launch.py``)."""
    B, H, _, D = key_cache.shape
    if length == 0 or B == 0:
        return
    grid, BLOCK_S, BLOCK_D = token_tiles(B, H, length, D)
    c = fmt.codec_constants()
    args = (
        key_cache, value_cache, key_scale, value_scale, key_out, value_out,
        *key_cache.stride()[:3],
        0 if key_scale.numel() == 1 else 1,
        H, length, D,
    )  # fmt: skip
    meta = dict(
        BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D,
        MANTISSA_BITS=c["MANTISSA_BITS"], BIAS=c["BIAS"], SUBNORMAL_STEP=c["SUBNORMAL_STEP"],
        FNUZ=c["FNUZ"], HAS_INF=c["HAS_INF"],
    )  # fmt: skip
    launch(_dequantize_kv_kernel, grid, args, meta, memo)
