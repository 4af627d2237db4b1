"""The kernels as ``torch.library`` operators, for torch.compile and CUDA graphs (the static cache's path).

dynamo cannot trace the Python launchers (argument checks, launch planning, the interpreter on the CPU), so each
kernel is wrapped as a custom operator: dynamo records one opaque node, Inductor calls it, and a CUDA graph
captures its launches. Positions and lengths are one-element device tensors, so nothing on the host changes from
one decode step to the next and a graph replays as recorded. Each operator calls the dispatching function of
``kernels`` (Triton, or the torch reference), with the same checks as an eager call. The operator
``hf_fp8cache::x`` is ``ops.x`` here (and ``torch.ops.hf_fp8cache.x``).

Formats travel by name (``FP8Format.name``), since operators take only tensors and plain values.
"""

from __future__ import annotations

import torch

from . import dispatch
from .formats import format_named, storage_format_named

__all__ = ["quantize_append_kv", "dequantize_kv", "quantize_append_token_head", "dequantize_token_head",
           "decode_attention"]  # fmt: skip


@torch.library.custom_op("hf_fp8cache::quantize_append_kv", mutates_args=("key_cache", "value_cache"))
def quantize_append_kv(
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
    dispatch.quantize_append_kv(
        key, value, key_cache, value_cache, start, key_inv_scale, value_inv_scale, format_named(fmt)
    )


@quantize_append_kv.register_fake
def _(key, value, key_cache, value_cache, start, key_inv_scale, value_inv_scale, fmt) -> None:
    return None


@torch.library.custom_op("hf_fp8cache::dequantize_kv", mutates_args=("key_out", "value_out"))
def dequantize_kv(
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
    dispatch.dequantize_kv(
        key_cache, value_cache, length, key_scale, value_scale, format_named(fmt), key_out, value_out
    )


@dequantize_kv.register_fake
def _(key_cache, value_cache, length, key_scale, value_scale, fmt, key_out, value_out) -> None:
    return None


@torch.library.custom_op(
    "hf_fp8cache::quantize_append_token_head", mutates_args=("key_codes", "value_codes", "key_scales", "value_scales")
)
def quantize_append_token_head(
    key: torch.Tensor,
    value: torch.Tensor,
    key_codes: torch.Tensor,
    value_codes: torch.Tensor,
    key_scales: torch.Tensor,
    value_scales: torch.Tensor,
    start: torch.Tensor,
    fmt: str,
) -> None:
    """``kernels.quantize_append_token_head`` at the position held by the one-element tensor ``start`` (``fmt``: an
    fp8 format's name or ``"int8"``)."""
    dispatch.quantize_append_token_head(
        key, value, key_codes, value_codes, key_scales, value_scales, start, storage_format_named(fmt)
    )


@quantize_append_token_head.register_fake
def _(key, value, key_codes, value_codes, key_scales, value_scales, start, fmt) -> None:
    return None


@torch.library.custom_op("hf_fp8cache::dequantize_token_head", mutates_args=("key_out", "value_out"))
def dequantize_token_head(
    key_codes: torch.Tensor,
    value_codes: torch.Tensor,
    key_scales: torch.Tensor,
    value_scales: torch.Tensor,
    length: int,
    fmt: str,
    key_out: torch.Tensor,
    value_out: torch.Tensor,
) -> None:
    """``kernels.dequantize_token_head``."""
    dispatch.dequantize_token_head(
        key_codes, value_codes, key_scales, value_scales, length, storage_format_named(fmt), key_out, value_out
    )


@dequantize_token_head.register_fake
def _(key_codes, value_codes, key_scales, value_scales, length, fmt, key_out, value_out) -> None:
    return None


@torch.library.custom_op("hf_fp8cache::decode_attention", mutates_args=())
def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kv_length: torch.Tensor,
    kv_start: torch.Tensor,
    key_scale: torch.Tensor,
    value_scale: torch.Tensor,
    fmt: str,
    sm_scale: float,
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
    ring: bool = False,
    quantize_query: bool = False,
) -> torch.Tensor:
    """``kernels.decode_attention`` over the first ``kv_length`` (a one-element device tensor) tokens, with its
    optional sliding window, sinks and softcap, over a ring of slots with ``ring``, on FP8 queries with
    ``quantize_query``."""
    return dispatch.decode_attention(
        query, key_cache, value_cache, kv_length, kv_start, key_scale, value_scale, storage_format_named(fmt), sm_scale,
        sliding_window=sliding_window, sinks=sinks, softcap=softcap, ring=ring, quantize_query=quantize_query,
    )  # fmt: skip


@decode_attention.register_fake
def _(query, key_cache, value_cache, kv_length, kv_start, key_scale, value_scale, fmt, sm_scale, sliding_window=None,
      sinks=None, softcap=None, ring=False, quantize_query=False) -> torch.Tensor:  # fmt: skip
    B, Hq, Sq, D = query.shape
    return query.new_empty(B, Sq, Hq, D)
