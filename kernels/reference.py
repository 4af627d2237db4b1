"""Torch twins of every kernel, with the same signatures: the CPU path, the test oracle and the benchmark baseline.

Layout everywhere: ``[B, H, S, D]`` (batch, KV heads, sequence, head dim). Caches are uint8 views of fp8 bytes
with a capacity ``>= S`` along dim 2. Scales are fp32 tensors of one element (per tensor) or ``H`` elements
(per KV head), or bf16 ``[B, H, capacity]`` beside the codes (per token and head, ``token_head.py``; codes then int8
or fp8); the per-tensor / per-head quantizer takes the reciprocal (``inv_scale = 1 / scale``) so that kernel and
reference compute the very same fp32 product ``x * inv_scale`` before rounding.
"""

from __future__ import annotations

from typing import cast

import torch

from .formats import FP8Format, Int8Format, StorageFormat, format_named
from .new_tokens import NewTokens
from .recent_window import RecentWindow, ring_read


def _per_head(scale: torch.Tensor) -> torch.Tensor:
    return scale.reshape(1, -1, 1, 1)


def encode_fp8_ref(x: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """fp32 -> uint8 fp8 codes: torch's round-to-nearest-even cast after saturating at +-fmax."""
    return x.float().clamp(-fmt.max, fmt.max).to(fmt.dtype).view(torch.uint8)


def _scale_factor(scale: torch.Tensor, length: int) -> torch.Tensor:
    """A dequantization scale as a factor of ``[B, H, length, D]`` decoded codes: fp32 ``[1]`` / ``[H]`` (per tensor,
    per head) -> ``[1, H, 1, 1]``; bf16 ``[B, H, capacity]`` (per token and head) -> ``[B, H, length, 1]``."""
    return scale[:, :, :length, None].float() if scale.dim() == 3 else _per_head(scale)


def decode_fp8_ref(code: torch.Tensor, fmt: StorageFormat) -> torch.Tensor:
    """uint8 codes -> fp32: fp8 codes, or int8 codes of ``formats.INT8``."""
    return code.view(fmt.dtype).float()


def quantize_append_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    start: int | torch.Tensor,
    key_inv_scale: torch.Tensor,
    value_inv_scale: torch.Tensor,
    fmt: FP8Format,
) -> None:
    """Write ``saturate(x * inv_scale)`` as fp8 into ``cache[:, :, start:start + S]`` for K and V (``start`` an int or
    a one-element tensor; positions beyond the capacity are dropped)."""
    first = int(start)
    written = max(0, min(key.shape[2], key_cache.shape[2] - first))
    end = first + written
    key, value = key[:, :, :written], value[:, :, :written]
    key_cache[:, :, first:end] = encode_fp8_ref(key.float() * _per_head(key_inv_scale), fmt)
    value_cache[:, :, first:end] = encode_fp8_ref(value.float() * _per_head(value_inv_scale), fmt)


def dequantize_kv_ref(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    length: int,
    key_scale: torch.Tensor,
    value_scale: torch.Tensor,
    fmt: FP8Format,
    key_out: torch.Tensor,
    value_out: torch.Tensor,
) -> None:
    """Write ``fp8 * scale`` of the first ``length`` tokens into ``key_out`` / ``value_out`` (their dtype)."""
    key_out.copy_(decode_fp8_ref(key_cache[:, :, :length], fmt) * _per_head(key_scale))
    value_out.copy_(decode_fp8_ref(value_cache[:, :, :length], fmt) * _per_head(value_scale))


def decode_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_length: int | torch.Tensor,
    kv_start: torch.Tensor,
    key_scale: torch.Tensor,
    value_scale: torch.Tensor,
    fmt: StorageFormat,
    sm_scale: float,
    out: torch.Tensor | None = None,
    recent: RecentWindow | None = None,
    *,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    new: NewTokens | None = None,
    ring: bool = False,
    quantize_query: bool = False,
) -> torch.Tensor:
    """Attention of ``query`` ``[B, Hq, Sq, D]`` over the first ``kv_length`` fp8 tokens -> ``[B, Sq, Hq, D]``
    (with ``new``, the query's own K/V are first quantized into the cache at ``kv_length - 1``). Scales per tensor, per
    head, or per token and head (``[B, H, capacity]``, int8 or fp8 codes): each key's and value's own.

    Math attention in fp32 on the dequantized cache, the positions of the ``recent`` window (a
    ``kernels.RecentWindow``) taken exactly from its ring: query row i (position ``kv_length - Sq + i``) sees positions
    ``kv_start[b]`` up to its own. Values outside ``[kv_start, kv_length)`` count as zero and a row that sees no
    key gives zeros, as in the kernel (so do values below every row's sliding window). Output in the query's dtype
    (into ``out`` when given). With ``ring`` (a ring of ``capacity`` slots, position p at slot ``p % capacity``), the
    written slots are first put in position order, oldest first, and the positions shifted to start at 0.

    ``quantize_query``: each query row fake-quantized to e4m3 with its own scale amax / 448 exactly as the kernel
    does (Q @ K^T on e4m3 operands); P @ V as without it (the kernel's fp16 operands).
    """
    kv_length = int(kv_length)  # an int or a one-element tensor
    if ring:
        capacity = key_cache.shape[2]
        filled = min(kv_length, capacity)
        order = (torch.arange(filled, device=key_cache.device) + kv_length - filled) % capacity
        key_cache, value_cache = key_cache.index_select(2, order), value_cache.index_select(2, order)
        if key_scale.dim() == 3:  # per-token-head scales sit beside their slots
            key_scale, value_scale = key_scale.index_select(2, order), value_scale.index_select(2, order)
        kv_start = (kv_start.long() - (kv_length - filled)).clamp(min=0)
        kv_length = filled
    if new is not None and key_scale.dim() == 3:  # each its own scale, written beside it
        quantize_append_token_head_ref(new.keys, new.values, key_cache, value_cache, key_scale, value_scale,
                                       kv_length - 1, fmt)  # fmt: skip
    elif new is not None:
        quantize_append_kv_ref(new.keys, new.values, key_cache, value_cache, kv_length - 1, new.key_inv_scale,
                               new.value_inv_scale, cast(FP8Format, fmt))  # fmt: skip
    B, Hq, Sq, _ = query.shape
    G = Hq // key_cache.shape[1]
    positions = torch.arange(kv_length, device=query.device)
    in_row = positions[None, :] >= kv_start[:, None].long()  # [B, L]: not left padding
    if sliding_window is not None:  # nor below the first row's window (never read, as in the kernel)
        in_row &= positions[None, :] > kv_length - Sq - sliding_window
    key = decode_fp8_ref(key_cache[:, :, :kv_length], fmt) * _scale_factor(key_scale, kv_length)
    value = decode_fp8_ref(value_cache[:, :, :kv_length], fmt) * _scale_factor(value_scale, kv_length)
    if recent is not None:
        ring_read(recent.keys, recent.start, kv_length, out=key[:, :, recent.start :])
        ring_read(recent.values, recent.start, kv_length, out=value[:, :, recent.start :])
    value = value.masked_fill(~in_row[:, None, :, None], 0.0)
    key, value = key.repeat_interleave(G, dim=1), value.repeat_interleave(G, dim=1)  # [B, Hq, L, D]

    own = kv_length - Sq + torch.arange(Sq, device=query.device)
    visible = in_row[:, None, :] & (positions[None, None, :] <= own[None, :, None])  # [B, Sq, L]
    if sliding_window is not None:
        visible &= positions[None, None, :] > own[None, :, None] - sliding_window
    query_values = _e4m3_rows_ref(query) if quantize_query else query.float()  # (the output keeps query's dtype)
    logits = torch.matmul(query_values, key.transpose(-1, -2)) * sm_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    if sinks is not None:  # [B, Hq, Sq, L + 1]: the sink's column joins the softmax, then is dropped
        sink_logits = sinks.float().reshape(1, -1, 1, 1).expand(B, Hq, Sq, 1)
        probs = torch.softmax(torch.cat([logits, sink_logits], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    probs = probs.masked_fill(~visible.any(-1)[:, None, :, None], 0.0)
    result = torch.matmul(probs, value).transpose(1, 2)  # [B, Sq, Hq, D]
    if out is None:
        return result.to(query.dtype).contiguous()
    out.copy_(result)
    return out


_E4M3 = format_named("e4m3fn")


def _e4m3_ref(x: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to e4m3 (RNE, saturating), as fp32."""
    return decode_fp8_ref(encode_fp8_ref(x.float(), _E4M3), _E4M3)


def _e4m3_rows_ref(query: torch.Tensor) -> torch.Tensor:
    """Each row (last dim) of ``query`` fake-quantized to e4m3 with the scale amax / 448 (1 for a zero row), fp32:
    the kernel's ``_e4m3_query``."""
    x = query.float()
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / _E4M3.max, torch.ones_like(amax))
    return _e4m3_ref(x / scale) * scale


# -- per-token-head scales (token_head.py) ------------------------------------------------------------------------
def bf16_scale_up_ref(amax: torch.Tensor, fmax: float) -> torch.Tensor:
    """amax * (1 / fmax) rounded up to a bf16 value, as fp32; 2^-126 where amax is 0 (``token_head._bf16_scale_up``)."""
    bits = (amax.float() * (1.0 / fmax)).view(torch.int32)
    up = torch.where((bits & 0xFFFF) != 0, (bits + 0x10000) & ~0xFFFF, bits)
    up = torch.where(amax > 0, up, torch.full_like(up, 0x00800000))
    return up.view(torch.float32)


def quantize_append_token_head_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_codes: torch.Tensor,
    value_codes: torch.Tensor,
    key_scales: torch.Tensor,
    value_scales: torch.Tensor,
    start: int | torch.Tensor,
    fmt: StorageFormat,
) -> None:
    """``token_head.quantize_append_token_head`` in torch: per (token, head) scales, int8 (``formats.INT8``: round
    half to even, +-127) or fp8 codes (``start`` an int or a one-element tensor; positions beyond the capacity are
    dropped)."""
    start = int(start)
    end = min(start + key.shape[2], key_codes.shape[2])
    for x, codes, scales in ((key, key_codes, key_scales), (value, value_codes, value_scales)):
        x = x[:, :, : end - start].float()
        scale = bf16_scale_up_ref(x.abs().amax(-1), fmt.max)
        y = x / scale[..., None]
        if isinstance(fmt, Int8Format):
            codes[:, :, start:end] = torch.round(y).clamp(-fmt.max, fmt.max).to(torch.int8).view(torch.uint8)
        else:
            codes[:, :, start:end] = encode_fp8_ref(y, fmt)
        scales[:, :, start:end] = scale.to(torch.bfloat16)


def dequantize_token_head_ref(
    key_codes: torch.Tensor,
    value_codes: torch.Tensor,
    key_scales: torch.Tensor,
    value_scales: torch.Tensor,
    length: int,
    fmt: StorageFormat,
    key_out: torch.Tensor,
    value_out: torch.Tensor,
) -> None:
    """``token_head.dequantize_token_head`` in torch."""
    for codes, scales, out in ((key_codes, key_scales, key_out), (value_codes, value_scales, value_out)):
        out.copy_(decode_fp8_ref(codes[:, :, :length], fmt) * _scale_factor(scales, length))
