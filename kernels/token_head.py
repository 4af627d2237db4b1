"""Per-token-head scales (issue 18): quantize-and-append that computes each (token, KV head)'s scale from its own
values in the same launch, and the dequantization that reads them (``strategy="token_head"`` of the dynamic cache).

    scale[b, h, t] = round_up_to_bf16(amax_d |x[b, h, t, d]| * (1 / FMAX))       (the smallest normal bf16 for 0)
    code[b, h, t, d] = int8:  clamp(round_half_even(x / scale), -127, 127)      (two's complement, stored as uint8)
                       fp8:   encode_fp8(x / scale)                             (fp8_codec, RNE, saturating)
    out = decode(code) * scale

FMAX is 127 for int8 (``formats.INT8``) and the format's largest finite value for fp8. The scale is rounded up to a
bf16 value (the measured choice: half of fp32's bytes, fp32's range, no accuracy cost; docs/benchmarks.md), so
``|x| / scale`` never exceeds FMAX. Every step is exact-rounded fp32 arithmetic (the division by ``tl.math.div_rn``:
Triton's ``/`` compiles to the approximate ``div.full.f32`` on NVIDIA GPUs) or integer arithmetic on bit
patterns, so the kernel and its torch twin (``reference.quantize_append_token_head_ref`` /
``dequantize_token_head_ref``) write the same bytes on the GPU and under the interpreter; the int8 rounding uses the
fp32 magic-number trick ((y + 1.5 * 2^23) - 1.5 * 2^23 rounds |y| < 2^22 half to even), which needs no libdevice
function.

Layout as ``quantize.py``: K/V ``[B, H, S, D]`` any strides; codes uint8 ``[B, H, capacity, D]`` contiguous; scales
bf16 ``[B, H, capacity]`` contiguous; ``start`` a Python int, or a one-element integer tensor read on the device (the
static cache's filled length).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .formats import StorageFormat
from .fp8_codec import decode_fp8, encode_fp8, round_to_output, token_tiles
from .launch import LaunchMemo, launch

__all__ = ["dequantize_token_head", "quantize_append_token_head"]

# 1.5 * 2^23: adding then subtracting it rounds |y| < 2^22 to an integer, half to even
_ROUNDING_MAGIC = tl.constexpr(12582912.0)
_SMALLEST_BF16_NORMAL_BITS = tl.constexpr(0x00800000)  # 2^-126 as fp32 bits (a bf16 value): an all-zero entry's scale


@triton.jit
def _bf16_scale_up(amax, INV_FMAX: tl.constexpr):
    """amax * (1 / FMAX) rounded up to a bf16 value (returned as fp32); 2^-126 where amax is 0."""
    bits = (amax * INV_FMAX).to(tl.uint32, bitcast=True)
    up = tl.where((bits & 0xFFFF) != 0, (bits + 0x10000) & 0xFFFF0000, bits)
    up = tl.where(amax > 0, up, _SMALLEST_BF16_NORMAL_BITS)
    return up.to(tl.float32, bitcast=True)


@triton.jit
def _encode(y, INT8: tl.constexpr, MANTISSA_BITS: tl.constexpr, BIAS: tl.constexpr, FMAX: tl.constexpr,
            FNUZ: tl.constexpr):  # fmt: skip
    """Scaled values -> uint8 codes: int8 two's complement (round half to even, +-127) or fp8."""
    if INT8:
        rounded = (y + _ROUNDING_MAGIC) - _ROUNDING_MAGIC
        rounded = tl.minimum(tl.maximum(rounded, -127.0), 127.0)
        return rounded.to(tl.int32).to(tl.int8).to(tl.uint8, bitcast=True)
    return encode_fp8(y, MANTISSA_BITS, BIAS, FMAX, FNUZ)


@triton.jit
def quantize_rows(x, INT8: tl.constexpr, INV_FMAX: tl.constexpr, MANTISSA_BITS: tl.constexpr, BIAS: tl.constexpr,
                  FMAX: tl.constexpr, FNUZ: tl.constexpr):  # fmt: skip
    """fp32 rows ``[BLOCK_S, BLOCK_D]`` (one token and head each) -> (uint8 codes, each row's scale as fp32, a bf16
    value). Also the decode kernel's write of a step's own token (``attention.py``, ``NEW_TOKEN``), bit for bit."""
    scale = _bf16_scale_up(tl.max(tl.abs(x), 1), INV_FMAX)
    y = tl.math.div_rn(x, scale[:, None])  # correctly rounded, as torch's x / scale (Triton's `/` is div.full.f32)
    return _encode(y, INT8, MANTISSA_BITS, BIAS, FMAX, FNUZ), scale


@triton.jit
def _quantize_tile(x_ptr, offsets, mask, codes_ptr, cache_offsets, scales_ptr, scale_offsets, row_mask,
                   INT8: tl.constexpr, INV_FMAX: tl.constexpr, MANTISSA_BITS: tl.constexpr, BIAS: tl.constexpr,
                   FMAX: tl.constexpr, FNUZ: tl.constexpr):  # fmt: skip
    """One [BLOCK_S, BLOCK_D] tile: per-row scale, codes, both stored."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    codes, scale = quantize_rows(x, INT8, INV_FMAX, MANTISSA_BITS, BIAS, FMAX, FNUZ)
    tl.store(codes_ptr + cache_offsets, codes, mask=mask)
    tl.store(scales_ptr + scale_offsets, scale.to(tl.bfloat16), mask=row_mask)  # exact: a bf16 value


@triton.jit(do_not_specialize=["start"])
def _quantize_append_token_head_kernel(
    key_ptr, value_ptr, key_codes_ptr, value_codes_ptr, key_scales_ptr, value_scales_ptr, start_ptr,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    H, S, D, start, capacity,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr, INV_FMAX: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, BIAS: tl.constexpr, FMAX: tl.constexpr, FNUZ: tl.constexpr,
    START_IN_MEMORY: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    if START_IN_MEMORY:  # the static cache's filled length, read on the device
        start = tl.load(start_ptr).to(tl.int64)
    row_mask = (s < S) & (start + s < capacity)
    mask = row_mask[:, None] & (d[None, :] < D)
    position = pid_bh * capacity + start + s  # [B, H, capacity] contiguous
    cache_offsets = position[:, None] * D + d[None, :]  # [B, H, capacity, D] contiguous
    key_offsets = b * stride_kb + h * stride_kh + s[:, None] * stride_ks + d[None, :] * stride_kd
    _quantize_tile(key_ptr, key_offsets, mask, key_codes_ptr, cache_offsets, key_scales_ptr, position, row_mask, INT8,
                   INV_FMAX, MANTISSA_BITS, BIAS, FMAX, FNUZ)  # fmt: skip
    value_offsets = b * stride_vb + h * stride_vh + s[:, None] * stride_vs + d[None, :] * stride_vd
    _quantize_tile(value_ptr, value_offsets, mask, value_codes_ptr, cache_offsets, value_scales_ptr, position,
                   row_mask, INT8, INV_FMAX, MANTISSA_BITS, BIAS, FMAX, FNUZ)  # fmt: skip


@triton.jit
def _dequantize_tile(codes_ptr, scales_ptr, out_ptr, cache_offsets, positions, out_offsets, mask, row_mask,
                     INT8: tl.constexpr, MANTISSA_BITS: tl.constexpr, BIAS: tl.constexpr,
                     SUBNORMAL_STEP: tl.constexpr, FNUZ: tl.constexpr, HAS_INF: tl.constexpr):  # fmt: skip
    codes = tl.load(codes_ptr + cache_offsets, mask=mask, other=0)
    if INT8:
        value = codes.to(tl.int8, bitcast=True).to(tl.float32)
    else:
        value = decode_fp8(codes, MANTISSA_BITS, BIAS, SUBNORMAL_STEP, FNUZ, HAS_INF)
    scale = tl.load(scales_ptr + positions, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offsets, round_to_output(value * scale[:, None], out_ptr), mask=mask)


@triton.jit
def _dequantize_token_head_kernel(
    key_codes_ptr, value_codes_ptr, key_scales_ptr, value_scales_ptr, key_out_ptr, value_out_ptr,
    S, D, capacity,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, INT8: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, BIAS: tl.constexpr, SUBNORMAL_STEP: tl.constexpr, FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S).to(tl.int64)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    row_mask = s < S
    mask = row_mask[:, None] & (d[None, :] < D)
    positions = pid_bh * capacity + s
    cache_offsets = positions[:, None] * D + d[None, :]
    out_offsets = (pid_bh * S + s[:, None]) * D + d[None, :]  # contiguous [B, H, S, D]
    _dequantize_tile(key_codes_ptr, key_scales_ptr, key_out_ptr, cache_offsets, positions, out_offsets, mask,
                     row_mask, INT8, MANTISSA_BITS, BIAS, SUBNORMAL_STEP, FNUZ, HAS_INF)  # fmt: skip
    _dequantize_tile(value_codes_ptr, value_scales_ptr, value_out_ptr, cache_offsets, positions, out_offsets, mask,
                     row_mask, INT8, MANTISSA_BITS, BIAS, SUBNORMAL_STEP, FNUZ, HAS_INF)  # fmt: skip


@functools.lru_cache(maxsize=64)  # every update asks: one shared read-only dict (the memo compares by identity first)
def _launch_meta(BLOCK_S: int, BLOCK_D: int, fmt: StorageFormat, quantize: bool, start_in_memory: bool = False) -> dict:
    c = fmt.codec_constants()
    names = ("INT8", "MANTISSA_BITS", "BIAS", "FNUZ") + (("FMAX",) if quantize else ("SUBNORMAL_STEP", "HAS_INF"))
    meta = dict(BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D, **{name: c[name] for name in names})
    return dict(meta, INV_FMAX=1.0 / fmt.max, START_IN_MEMORY=start_in_memory) if quantize else meta


def quantize_append_token_head(
    key: torch.Tensor,
    value: torch.Tensor,
    key_codes: torch.Tensor,
    value_codes: torch.Tensor,
    key_scales: torch.Tensor,
    value_scales: torch.Tensor,
    start: int | torch.Tensor,
    fmt: StorageFormat,
    memo: LaunchMemo | None = None,
) -> None:
    """Quantize ``key``/``value`` ``[B, H, S, D]`` with one scale per (token, head) into ``codes[:, :, start:start +
    S]`` and ``scales[:, :, start:start + S]`` (int8 or fp8 codes by ``fmt``; ``memo``: ``launch.py``). ``start``:
    a Python int, or a one-element tensor read on the device (positions at or beyond the capacity are dropped)."""
    B, H, S, D = key.shape
    if S == 0 or B == 0:
        return
    in_memory = isinstance(start, torch.Tensor)
    grid, BLOCK_S, BLOCK_D = token_tiles(B, H, S, D)
    args = (key, value, key_codes, value_codes, key_scales, value_scales, start if in_memory else key_codes,
            *key.stride(), *value.stride(), H, S, D, 0 if in_memory else start, key_codes.shape[2])  # fmt: skip
    meta = _launch_meta(BLOCK_S, BLOCK_D, fmt, True, in_memory)
    launch(_quantize_append_token_head_kernel, grid, args, meta, memo)


def dequantize_token_head(
    key_codes: torch.Tensor,
    value_codes: torch.Tensor,
    key_scales: torch.Tensor,
    value_scales: torch.Tensor,
    length: int,
    fmt: StorageFormat,
    key_out: torch.Tensor,
    value_out: torch.Tensor,
    memo: LaunchMemo | None = None,
) -> None:
    """``decode(code) * scale`` of the first ``length`` tokens into contiguous ``key_out`` / ``value_out``."""
    B, H, capacity, D = key_codes.shape
    if length == 0 or B == 0:
        return
    grid, BLOCK_S, BLOCK_D = token_tiles(B, H, length, D)
    args = (key_codes, value_codes, key_scales, value_scales, key_out, value_out, length, D, capacity)
    launch(_dequantize_token_head_kernel, grid, args, _launch_meta(BLOCK_S, BLOCK_D, fmt, False), memo)
