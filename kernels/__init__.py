"""Triton kernels of hf_fp8cache and their dispatch (installed as ``hf_fp8cache.kernels``; imports nothing of the
library and never transformers).

One name per kernel ``x`` (``quantize_append_kv``, ``dequantize_kv``, ``decode_attention``; with per-token-head
scales ``quantize_append_token_head``, ``dequantize_token_head``), the module naming the tier:

- ``kernels.x`` (``dispatch.py``): validates, then runs the Triton launcher for CUDA tensors (and for CPU tensors
  under ``TRITON_INTERPRET=1``, as the tests do) and the torch twin otherwise; both write the same bytes.
- ``kernels.<module>.x`` (``quantize.py``, ``dequantize.py``, ``token_head.py``, ``attention.py``): the launcher of
  the Triton kernel ``_x_kernel`` in the same module.
- ``kernels.reference.x_ref``: the torch twin, same signature: the CPU path, the test oracle, the benchmark baseline.
- ``kernels.ops.x``: the ``torch.library`` operator ``hf_fp8cache::x`` over the dispatch, for torch.compile and CUDA
  graphs.

Around them: ``formats.py`` (the fp8 encodings), ``checks.py`` (argument checks), ``recent_window.py`` (the exact
recent window and its ring buffers), ``new_tokens.py`` (a decode step's K/V, written by the attention launch),
``fp8_codec.py`` (the Triton fp8 codec), ``launch.py`` (relaunching a compiled
kernel without Triton's per-call binding).
"""

from .checks import has_fp8_tensor_cores
from .dispatch import (
    cpu_backend,
    decode_attention,
    dequantize_kv,
    dequantize_token_head,
    quantize_append_kv,
    quantize_append_token_head,
    uses_triton,
)
from .launch import LaunchMemo
from .new_tokens import NewTokens
from .recent_window import RecentWindow

__all__ = [
    "LaunchMemo",
    "NewTokens",
    "RecentWindow",
    "quantize_append_kv",
    "dequantize_kv",
    "quantize_append_token_head",
    "dequantize_token_head",
    "decode_attention",
    "uses_triton",
    "cpu_backend",
    "has_fp8_tensor_cores",
]
