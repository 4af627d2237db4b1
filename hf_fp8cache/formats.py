"""FP8 storage formats: the four 8-bit float encodings and the names users pick them by.

`kv_cache_dtype` takes vLLM's names: ``"fp8"`` and ``"fp8_e4m3"`` mean OCP e4m3fn (max 448, the default),
``"fp8_e5m2"`` means e5m2 (max 57344). The ROCm "fnuz" variants (no negative zero, one NaN code 0x80, exponent
bias one higher) are known by name too: ``"fp8_e4m3fnuz"``, ``"fp8_e5m2fnuz"``. ``"auto"`` picks e4m3fnuz on
ROCm builds of torch and e4m3fn everywhere else.

Every format is described by its bit layout (exponent and mantissa bits); the bias, the largest finite value and
the subnormal step are derived from ``torch.finfo`` so nothing is typed twice. Kernels encode and decode with
integer arithmetic from these numbers (see ``kernels/fp8_codec.py``), which is exact on the GPU and under the Triton
interpreter alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FP8Format", "FORMATS", "resolve_format"]


@dataclass(frozen=True)
class FP8Format:
    """One 8-bit float encoding."""

    name: str
    dtype: torch.dtype
    exponent_bits: int
    mantissa_bits: int
    fnuz: bool  # True for the ROCm variants: no -0, no inf, NaN is 0x80

    @property
    def max(self) -> float:
        return torch.finfo(self.dtype).max  # e4m3fn 448, e5m2 57344, e4m3fnuz 240, e5m2fnuz 57344

    @property
    def bias(self) -> int:
        # smallest normal = 2^(1 - bias): e4m3fn 2^-6 -> 7, e5m2 2^-14 -> 15, e4m3fnuz 2^-7 -> 8, e5m2fnuz -> 16
        return 1 - int(math.log2(torch.finfo(self.dtype).smallest_normal))

    @property
    def has_inf(self) -> bool:
        # Only OCP e5m2 keeps IEEE-style infinities (exponent all ones); e4m3fn and the fnuz formats have none.
        return self.exponent_bits == 5 and not self.fnuz

    @property
    def subnormal_step(self) -> float:
        return 2.0 ** (1 - self.bias - self.mantissa_bits)  # e4m3fn 2^-9, e5m2 2^-16

    def codec_constants(self) -> dict[str, object]:
        """The compile-time constants the Triton codec needs (see kernels/fp8_codec.py)."""
        return {
            "MANTISSA_BITS": self.mantissa_bits,
            "BIAS": self.bias,
            "FMAX": self.max,
            "SUBNORMAL_STEP": self.subnormal_step,
            "FNUZ": self.fnuz,
            "HAS_INF": self.has_inf,
        }


FORMATS: dict[str, FP8Format] = {
    f.name: f
    for f in (
        FP8Format("e4m3fn", torch.float8_e4m3fn, 4, 3, fnuz=False),
        FP8Format("e5m2", torch.float8_e5m2, 5, 2, fnuz=False),
        FP8Format("e4m3fnuz", torch.float8_e4m3fnuz, 4, 3, fnuz=True),
        FP8Format("e5m2fnuz", torch.float8_e5m2fnuz, 5, 2, fnuz=True),
    )
}

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
