"""The four 8-bit float encodings the kernels read and write, by their canonical names.

Every format is described by its bit layout (exponent and mantissa bits); the bias, the largest finite value and
the subnormal step are derived from ``torch.finfo`` so nothing is typed twice. Kernels encode and decode with
integer arithmetic from these numbers (see ``fp8_codec.py``), which is exact on the GPU and under the Triton
interpreter alike.

The names users pick formats by (vLLM's ``"fp8"``, ``"fp8_e5m2"``, ``"auto"``, torch dtypes) are resolved by the
library (``hf_fp8cache.formats.resolve_format``); here a format is known by its canonical ``name`` only, as the
``torch.library`` operators (``ops.py``) pass it. Beside them, ``INT8``: symmetric int8 codes, stored in the same
uint8 buffers, for per-token-head scales only (``token_head.py``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["FP8Format", "FORMATS", "INT8", "Int8Format", "StorageFormat", "format_named", "storage_format_named"]


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
        """The compile-time constants the Triton codec needs (see fp8_codec.py); computed once per format, as every
        kernel launch asks for them. Read-only."""
        return _codec_constants(self)


@functools.cache
def _codec_constants(fmt: FP8Format) -> dict[str, object]:
    return {
        "INT8": False,
        "MANTISSA_BITS": fmt.mantissa_bits,
        "BIAS": fmt.bias,
        "FMAX": fmt.max,
        "SUBNORMAL_STEP": fmt.subnormal_step,
        "FNUZ": fmt.fnuz,
        "HAS_INF": fmt.has_inf,
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


@dataclass(frozen=True)
class Int8Format:
    """Symmetric int8 codes: two's complement in [-127, 127] (-128 is never written), round half to even. Only with a
    scale per (token, KV head) (``token_head.py``): under one scale for a whole layer or head, int8's uniform steps
    leave small values few levels. The kernels decode a code by a bitcast to int8 and a conversion (exact)."""

    name: str = "int8"
    dtype: torch.dtype = torch.int8
    fnuz: bool = False  # (read by checks written for the fp8 formats)

    @property
    def max(self) -> float:
        return float(torch.iinfo(self.dtype).max)  # 127.0

    def codec_constants(self) -> dict[str, object]:
        """The kernels' compile-time constants (``FP8Format.codec_constants``): ``INT8`` set, the fp8 codec's unused."""
        return _INT8_CODEC


INT8 = Int8Format()
_INT8_CODEC: dict[str, object] = {"INT8": True, "MANTISSA_BITS": 0, "BIAS": 0, "FMAX": INT8.max,
                                  "SUBNORMAL_STEP": 0.0, "FNUZ": False, "HAS_INF": False}  # fmt: skip
# What a cache may store: an fp8 format, or int8 (per-token-head scales only)
StorageFormat = FP8Format | Int8Format


def format_named(name: str) -> FP8Format:
    """The fp8 format whose canonical ``FP8Format.name`` is ``name`` (how operators pass a format)."""
    if name not in FORMATS:
        raise ValueError(f"unknown fp8 format {name!r}; use one of {', '.join(map(repr, FORMATS))}")
    return FORMATS[name]


def storage_format_named(name: str) -> StorageFormat:
    """``format_named``, or ``INT8`` for ``"int8"``: the formats a per-token-head operator takes."""
    return INT8 if name == INT8.name else format_named(name)
