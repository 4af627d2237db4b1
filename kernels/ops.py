"""The kernels as ``torch.library`` operators, for torch.compile and CUDA graphs (the static cache's path).

dynamo cannot trace the Python launchers (argument checks, launch planning, the interpreter on the CPU), so each
kernel is wrapped as a custom operator: dynamo records one opaque node, Inductor calls it, and a CUDA graph
captures its launches. Positions and lengths are one-element device tensors, so nothing on the host changes from
one decode step to the next and a graph replays as recorded. Each operator calls the dispatching function of
``kernels`` (Triton, or the torch reference), with the same checks as an eager call.

Formats travel by name (``FP8Format.name``), since operators take only tensors and plain values.
"""

from __future__ import annotations

import torch

from hf_fp8cache.formats import resolve_format

from . import decode_attention, dequantize_kv, quantize_append_kv

__all__ = ["quantize_append_kv_at", "dequantize_kv_into", "decode_attention_at"]


@torch.library.custom_op("hf_fp8cache::quantize_append_kv", mutates_args=("key_cache", "value_cache"))
def quantize_append_kv_at(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    start: torch.Tensor,
    key_inv_scale: torch.Tensor,
    value_inv_scale: torch.Tensor,
    fmt: str,
) -> None:
    """``kernels.quantize_append_kv`` at the position held by the one-element tensor ``start``."""
    quantize_append_kv(key, value, key_cache, value_cache, start, key_inv_scale, value_inv_scale, resolve_format(fmt))


@quantize_append_kv_at.register_fake
def _(key, value, key_cache, value_cache, start, key_inv_scale, value_inv_scale, fmt) -> None:
    return None


@torch.library.custom_op("hf_fp8cache::dequantize_kv", mutates_args=("key_out", "value_out"))
def dequantize_kv_into(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    length: int,
    key_scale: torch.Tensor,
    value_scale: torch.Tensor,
    fmt: str,
    key_out: torch.Tensor,
    value_out: torch.Tensor,
) -> None:
    """``kernels.dequantize_kv``."""
    dequantize_kv(key_cache, value_cache, length, key_scale, value_scale, resolve_format(fmt), key_out, value_out)


@dequantize_kv_into.register_fake
def _(key_cache, value_cache, length, key_scale, value_scale, fmt, key_out, value_out) -> None:
    return None


@torch.library.custom_op("hf_fp8cache::decode_attention", mutates_args=())
def decode_attention_at(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_length: torch.Tensor,
    kv_start: torch.Tensor,
    key_scale: torch.Tensor,
    value_scale: torch.Tensor,
    fmt: str,
    sm_scale: float,
) -> torch.Tensor:
    """``kernels.decode_attention`` over the first ``kv_length`` (a one-element device tensor) tokens."""
    return decode_attention(
        query, key_cache, value_cache, kv_length, kv_start, key_scale, value_scale, resolve_format(fmt), sm_scale
    )


@decode_attention_at.register_fake
def _(query, key_cache, value_cache, kv_length, kv_start, key_scale, value_scale, fmt, sm_scale) -> torch.Tensor:
    B, Hq, Sq, D = query.shape
    return query.new_empty(B, Sq, Hq, D)
