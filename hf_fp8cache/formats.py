"""Storage formats: the names users pick the four 8-bit float encodings (and int8) by.

`kv_cache_dtype` takes vLLM's names: ``"fp8"`` and ``"fp8_e4m3"`` mean OCP e4m3fn (max 448, the default),
``"fp8_e5m2"`` means e5m2 (max 57344). The ROCm "fnuz" variants (no negative zero, one NaN code 0x80, exponent
bias one higher) are known by name too: ``"fp8_e4m3fnuz"``, ``"fp8_e5m2fnuz"``. ``"auto"`` picks e4m3fnuz on
ROCm builds of torch and e4m3fn everywhere else.

``"int8"`` is symmetric int8 (``INT8``), only with per-token-head scales (``strategy="token_head"``). vLLM's
``"fp8_per_token_head"`` and ``"int8_per_token_head"`` name a format and that strategy at once:
``resolve_kv_cache_dtype`` returns both.

The formats themselves (``FP8Format``: bit layout, limits derived from ``torch.finfo``, the codec's constants) and
the table of the four by canonical name (``FORMATS``) live with the kernels that encode them
(``kernels/formats.py``) and are re-exported here.
"""

from __future__ import annotations

import torch

from .kernels.formats import FORMATS, INT8, FP8Format, StorageFormat

__all__ = [
    "FP8Format",
    "FORMATS",
    "INT8",
    "TOKEN_HEAD",
    "StorageFormat",
    "resolve_format",
    "resolve_fp8_format",
    "resolve_kv_cache_dtype",
]

_ALIASES = {
    "fp8": "e4m3fn",
    "fp8_e4m3": "e4m3fn",
    "fp8_e4m3fn": "e4m3fn",
    "fp8_e5m2": "e5m2",
    "fp8_e4m3fnuz": "e4m3fnuz",
    "fp8_e5m2fnuz": "e5m2fnuz",
}
TOKEN_HEAD = "token_head"  # the strategy of a scale per (token, KV head), computed as each token is written
# vLLM's kv_cache_dtype names that also say the strategy: per-token-head scales
_PER_TOKEN_HEAD_NAMES = {"fp8_per_token_head": "e4m3fn", "int8_per_token_head": INT8.name}


def resolve_kv_cache_dtype(kv_cache_dtype: str | torch.dtype | StorageFormat) -> tuple[StorageFormat, str | None]:
    """A user's ``kv_cache_dtype`` -> (format, the strategy the name implies or None): vLLM's
    ``"fp8_per_token_head"`` is (e4m3fn, ``"token_head"``), ``"int8_per_token_head"`` (``INT8``, ``"token_head"``);
    every other name is ``resolve_format``'s, with no strategy."""
    if isinstance(kv_cache_dtype, str) and kv_cache_dtype.strip().lower() in _PER_TOKEN_HEAD_NAMES:
        return resolve_format(_PER_TOKEN_HEAD_NAMES[kv_cache_dtype.strip().lower()]), TOKEN_HEAD
    return resolve_format(kv_cache_dtype), None


def resolve_format(kv_cache_dtype: str | torch.dtype | StorageFormat) -> StorageFormat:
    """Turn a user's ``kv_cache_dtype`` (a vLLM-style name, a format name, a torch fp8 dtype, ``"int8"``) into a
    format. vLLM's per-token-head names also set the strategy: ``resolve_kv_cache_dtype`` takes them."""
    if isinstance(kv_cache_dtype, (FP8Format, type(INT8))):
        return kv_cache_dtype
    if isinstance(kv_cache_dtype, torch.dtype):
        for fmt in (*FORMATS.values(), INT8):
            if fmt.dtype == kv_cache_dtype:
                return fmt
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype} is not an 8-bit dtype; use one of {_choices()}")
    if not isinstance(kv_cache_dtype, str):
        raise TypeError(f"kv_cache_dtype must be a string or torch dtype, got {type(kv_cache_dtype).__name__}")
    key = kv_cache_dtype.strip().lower()
    if key == "auto":
        key = "e4m3fnuz" if torch.version.hip else "e4m3fn"
    if key in _PER_TOKEN_HEAD_NAMES:
        raise ValueError(
            f"kv_cache_dtype={kv_cache_dtype!r} names a format and strategy='token_head' (scales computed as each "
            "token is written): a cache's kv_cache_dtype takes it; here give a format alone (e.g. 'fp8', 'int8')"
        )
    key = _ALIASES.get(key, key)
    if key == INT8.name:
        return INT8
    if key not in FORMATS:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; use one of {_choices()}")
    return FORMATS[key]


def resolve_fp8_format(kv_cache_dtype: str | torch.dtype | StorageFormat, what: str) -> FP8Format:
    """``resolve_format`` for ``what`` takes fp8 formats only (per-tensor / per-head scales: calibration,
    checkpoints): int8 is refused, naming ``what``."""
    fmt = resolve_format(kv_cache_dtype)
    if not isinstance(fmt, FP8Format):
        raise ValueError(
            f"{what} is for fp8 formats (per-tensor / per-head scales), got kv_cache_dtype={kv_cache_dtype!r}: int8 "
            f"codes take per-token-head scales, computed as each token is written (strategy={TOKEN_HEAD!r})"
        )
    return fmt


def _choices() -> str:
    return ", ".join(repr(n) for n in ["auto", *_ALIASES, *FORMATS, INT8.name])
