"""FP8 storage formats: the names users pick the four 8-bit float encodings by.

`kv_cache_dtype` takes vLLM's names: ``"fp8"`` and ``"fp8_e4m3"`` mean OCP e4m3fn (max 448, the default),
``"fp8_e5m2"`` means e5m2 (max 57344). The ROCm "fnuz" variants (no negative zero, one NaN code 0x80, exponent
bias one higher) are known by name too: ``"fp8_e4m3fnuz"``, ``"fp8_e5m2fnuz"``. ``"auto"`` picks e4m3fnuz on
ROCm builds of torch and e4m3fn everywhere else.

The formats themselves (``FP8Format``: bit layout, limits derived from ``torch.finfo``, the codec's constants) and
the table of the four by canonical name (``FORMATS``) live with the kernels that encode them
(``kernels/formats.py``) and are re-exported here.
"""

from __future__ import annotations

import torch

from .kernels.formats import FORMATS, FP8Format

__all__ = ["FP8Format", "FORMATS", "resolve_format"]

_ALIASES = {
    "fp8": "e4m3fn",
    "fp8_e4m3": "e4m3fn",
    "fp8_e4m3fn": "e4m3fn",
    "fp8_e5m2": "e5m2",
    "fp8_e4m3fnuz": "e4m3fnuz",
    "fp8_e5m2fnuz": "e5m2fnuz",
}


def resolve_format(kv_cache_dtype: str | torch.dtype | FP8Format) -> FP8Format:
    """Turn a user's ``kv_cache_dtype`` (a vLLM-style name, a format name, or a torch fp8 dtype) into a format."""
    if isinstance(kv_cache_dtype, FP8Format):
        return kv_cache_dtype
    if isinstance(kv_cache_dtype, torch.dtype):
        for fmt in FORMATS.values():
            if fmt.dtype == kv_cache_dtype:
                return fmt
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype} is not an 8-bit float dtype; use one of {_choices()}")
    if not isinstance(kv_cache_dtype, str):
        raise TypeError(f"kv_cache_dtype must be a string or torch dtype, got {type(kv_cache_dtype).__name__}")
    key = kv_cache_dtype.strip().lower()
    if key == "auto":
        key = "e4m3fnuz" if torch.version.hip else "e4m3fn"
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; use one of {_choices()}")
    return FORMATS[key]


def _choices() -> str:
    return ", ".join(repr(n) for n in ["auto", *_ALIASES, *FORMATS])
