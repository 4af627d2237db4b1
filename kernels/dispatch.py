"""Which path runs a kernel: the Triton launcher, or its torch twin in ``reference.py``.

CUDA tensors always run through Triton. CPU tensors run through Triton's interpreter when ``TRITON_INTERPRET=1`` was
set as ``hf_fp8cache.kernels`` was imported (as the tests do; Triton itself needs it before it is imported), and
through the torch twin otherwise; ``cpu_backend`` switches that for a block. Both paths write the same bytes.

Each public function validates its arguments once (``checks.py``), then runs one of the two.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

from . import reference
from .checks import (
    check_append_position,
    check_decode_attention,
    check_dequantize_kv,
    check_dequantize_token_head,
    check_quantize_append_kv,
    check_quantize_append_token_head,
)
from .formats import FP8Format, StorageFormat
from .launch import LaunchMemo, current_cuda_device
from .new_tokens import NewTokens
from .recent_window import RecentWindow

__all__ = [
    "quantize_append_kv",
    "dequantize_kv",
    "quantize_append_token_head",
    "dequantize_token_head",
    "decode_attention",
    "uses_triton",
    "cpu_backend",
]

_HAS_TRITON = importlib.util.find_spec("triton") is not None
# Read once: whether Triton runs under its interpreter in this process, so CPU tensors can take the Triton path.
_INTERPRETER = _HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"
_CPU_BACKENDS = ("triton", "torch")
_cpu_runs_triton = _INTERPRETER


def uses_triton(tensor: torch.Tensor) -> bool:
    """Whether the kernels run through Triton for this tensor: CUDA tensors, or CPU tensors under the interpreter
    (unless ``cpu_backend("torch")`` says otherwise)."""
    return _HAS_TRITON and (tensor.is_cuda or _cpu_runs_triton)


_ON_CURRENT_DEVICE = contextlib.nullcontext()


def _on_device_of(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s GPU the current device for a launch: Triton launches on the current device and its stream,
    and a layer of a model spread over GPUs (``device_map``) may sit on another one. Nothing to switch (and no host
    work) when it already is the current one."""
    if tensor.is_cuda and tensor.device.index != current_cuda_device():
        return torch.cuda.device(tensor.device)
    return _ON_CURRENT_DEVICE


@contextlib.contextmanager
def cpu_backend(name: str) -> Iterator[None]:
    """Run the kernels on CPU tensors through ``"torch"`` (the reference twins) or ``"triton"`` (Triton's
    interpreter, which needs ``TRITON_INTERPRET=1`` before ``hf_fp8cache`` is imported) inside the block.
    CUDA tensors run through Triton either way."""
    global _cpu_runs_triton
    if name not in _CPU_BACKENDS:
        raise ValueError(f"unknown cpu backend {name!r}; use one of {', '.join(map(repr, _CPU_BACKENDS))}")
    if name == "triton" and not _INTERPRETER:
        raise ValueError(
            "cpu backend 'triton' needs Triton's interpreter: set TRITON_INTERPRET=1 before importing hf_fp8cache"
        )
    previous, _cpu_runs_triton = _cpu_runs_triton, name == "triton"
    try:
        yield
    finally:
        _cpu_runs_triton = previous


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
    """Quantize K and V ``[B, H, S, D]`` into ``cache[:, :, start:start + S]`` (saturating, round-to-nearest-even).

    ``start`` is an int, or a one-element integer tensor on the cache's device read there (positions from it at or
    beyond the capacity are then dropped: the caller checks the capacity on the device). ``memo``: the caller's
    ``LaunchMemo`` (a cache layer's), which relaunches the compiled kernel with less host work."""
    arguments = (key, value, key_cache, value_cache, start, key_inv_scale, value_inv_scale)
    if memo is None:
        check_quantize_append_kv(*arguments)
    else:  # a write like the last checks only its position (as decode_attention: kernels/attention.py)
        form = (key.shape, key.dtype, key.device, value.shape, value.dtype, value.device, type(start))
        kept = (key_cache, value_cache, key_inv_scale, value_inv_scale, *((start,) if type(start) is not int else ()))
        if not memo.check_once("quantize_append_kv", form, kept, check_quantize_append_kv, arguments):
            check_append_position(key, key_cache, start)
    if not uses_triton(key):
        reference.quantize_append_kv_ref(key, value, key_cache, value_cache, start, key_inv_scale, value_inv_scale, fmt)
        return
    from .quantize import quantize_append_kv as run

    with _on_device_of(key):
        run(key, value, key_cache, value_cache, start, key_inv_scale, value_inv_scale, fmt, memo)


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
    """Write ``fp8 * scale`` of the first ``length`` cached tokens into contiguous ``key_out`` / ``value_out``
    (``memo``: as for ``quantize_append_kv``)."""
    check_dequantize_kv(key_cache, value_cache, length, key_scale, value_scale, key_out, value_out)
    if not uses_triton(key_cache):
        reference.dequantize_kv_ref(key_cache, value_cache, length, key_scale, value_scale, fmt, key_out, value_out)
        return
    from .dequantize import dequantize_kv as run

    with _on_device_of(key_cache):
        run(key_cache, value_cache, length, key_scale, value_scale, fmt, key_out, value_out, memo)


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
    """Quantize K and V ``[B, H, S, D]`` into ``codes[:, :, start:start + S]`` with one scale per (token, head), written
    into bf16 ``scales[:, :, start:start + S]`` by the same launch (``token_head.py``; int8 or fp8 codes by ``fmt``).
    ``start``: as for ``quantize_append_kv``."""
    check_quantize_append_token_head(key, value, key_codes, value_codes, key_scales, value_scales, start)
    arguments = (key, value, key_codes, value_codes, key_scales, value_scales, start, fmt)
    _run_token_head("quantize_append_token_head", arguments, memo)


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
    """Write ``decode(code) * scale`` of the first ``length`` tokens (per-token-head scales) into contiguous
    ``key_out`` / ``value_out``."""
    check_dequantize_token_head(key_codes, value_codes, key_scales, value_scales, length, key_out, value_out)
    arguments = (key_codes, value_codes, key_scales, value_scales, length, fmt, key_out, value_out)
    _run_token_head("dequantize_token_head", arguments, memo)


def _run_token_head(name: str, arguments: tuple, memo: LaunchMemo | None) -> None:
    """``token_head.<name>`` (Triton) or its twin ``reference.<name>_ref`` over checked ``arguments`` (the first a
    tensor on the launch's device)."""
    if not uses_triton(arguments[0]):
        getattr(reference, f"{name}_ref")(*arguments)
        return
    from . import token_head

    with _on_device_of(arguments[0]):
        getattr(token_head, name)(*arguments, memo)


def decode_attention(
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
    memo: LaunchMemo | None = None,
    new: NewTokens | None = None,
    ring: bool = False,
    quantize_query: bool = False,
) -> torch.Tensor:
    """Attention of ``query`` ``[B, Hq, Sq, D]`` over the first ``kv_length`` cached fp8 tokens -> ``[B, Sq, Hq, D]``.

    ``kv_length`` is an int, or a one-element integer tensor on the query's device that the kernel reads there
    (the static cache's filled length: no host value changes from step to step, as torch.compile and CUDA graphs
    need).

    Query row i sits at position ``kv_length - Sq + i`` and sees positions ``kv_start[b]`` up to its own (causal, left
    padding masked); ``Hq`` is a multiple of the cache's KV heads (GQA). ``Sq`` is 1 for a decode step and may be any
    length up to ``kv_length``: a chunk (prefill over the cache) runs in causal tiles of 128 query rows. With
    ``recent``, the positions of that window are read exactly from its ring buffers instead of the fp8 cache. Output in
    the query's dtype, written into ``out`` when given.

    Options of the model families with them (transformers' conventions): ``sliding_window`` W, row i then sees only
    positions p - W < n <= p of its own p (and >= kv_start); ``sinks``, float32 ``[Hq]``, one learned logit per
    query head that joins the softmax sum without a value (GPT-OSS ``s_aux``); ``softcap``, logits become
    ``softcap * tanh(logits / softcap)`` before masking (Gemma 2). ``sm_scale`` is the model's own scaling
    (Gemma's ``query_pre_attn_scalar ** -0.5``). ``memo``: as for ``quantize_append_kv``. ``new`` (one query
    token): its own K/V, written into the cache at ``kv_length - 1`` first, by the same launch on the Triton path
    (``new_tokens.py``); the cache then holds what ``quantize_append_kv`` would have written.

    ``ring`` (one query token, ``kv_length`` a device tensor, a ``sliding_window`` of at least the capacity): the
    caches are a ring of ``capacity`` slots, position p at slot ``p % capacity``, holding the last ``capacity``
    positions before ``kv_length`` (the static sliding layer's storage); ``kv_start`` is in positions.

    ``quantize_query`` (e4m3fn codes; on CUDA, compute capability 8.9 or later; no ``recent`` window): FP8 queries,
    as vLLM's FlashAttention 3 path for Q @ K^T: e4m3 operands with fp32 accumulation, each query row divided by its
    own scale amax / 448; P @ V stays in fp16 over the values' codes (an e4m3 P @ V was 1.5x slower on the H200).
    """
    arguments = (query, key_cache, value_cache, kv_length, kv_start, key_scale, value_scale, fmt)
    if not uses_triton(query):
        check_decode_attention(*arguments, out, recent, sliding_window, sinks, softcap, new, ring, quantize_query)
        return reference.decode_attention_ref(*arguments, sm_scale, out, recent, sliding_window=sliding_window,
                                              sinks=sinks, softcap=softcap, new=new, ring=ring,
                                              quantize_query=quantize_query)  # fmt: skip
    from .attention import decode_attention as run  # validates the arguments itself

    with _on_device_of(query):
        return run(*arguments, sm_scale, out, recent, sliding_window=sliding_window, sinks=sinks, softcap=softcap,
                   memo=memo, new=new, ring=ring, quantize_query=quantize_query)  # fmt: skip
