"""FP8 encode/decode (and bf16 rounding) in integer arithmetic, shared by every kernel that writes or reads the cache
(plus the tiling of the per-token kernels).

Why integers: the Triton interpreter's own float -> fp8 conversion is wrong (ties round away from zero, a carry
into the exponent halves the value, no saturation), so the CPU tests could never match the GPU. These helpers
do the conversion on the fp32 bit pattern, which is exact on both, for all four formats (``formats.py``):

encode  code = sign | RNE(min(|x|, FMAX)) ; NaN -> the format's NaN code; fnuz formats have no -0
decode  x = (-1)^s * 2^(e - BIAS) * (1 + m / 2^M)      (e > 0)
          = (-1)^s * m * SUBNORMAL_STEP                 (e == 0)   ; NaN / inf codes decode to NaN / inf

The torch twins are ``reference.encode_fp8_ref`` / ``reference.decode_fp8_ref`` (torch's own casts, after
clamping to +-FMAX); tests check all 256 codes and random fp32 values bit for bit.
"""

import functools

import triton
import triton.language as tl

# Per-token kernels (quantize, dequantize) give a program about 4K elements of each of K and V: decode (S=1) gets
# one row per program, prefill fills whole tiles.
_ELEMENTS_PER_PROGRAM = 4096


@functools.lru_cache(maxsize=1024)  # integers in, integers out: every update asks (triton.cdiv costs us on the host)
def token_tiles(B: int, H: int, S: int, D: int) -> tuple[tuple[int, int], int, int]:
    """(grid, BLOCK_S, BLOCK_D) of the per-token kernels: one program per (b, h) row and block of BLOCK_S tokens."""
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_S = min(triton.next_power_of_2(S), max(1, _ELEMENTS_PER_PROGRAM // BLOCK_D))
    return (B * H, triton.cdiv(S, BLOCK_S)), BLOCK_S, BLOCK_D


@triton.jit
def encode_fp8(x, MANTISSA_BITS: tl.constexpr, BIAS: tl.constexpr, FMAX: tl.constexpr, FNUZ: tl.constexpr):
    """fp32 tensor -> uint8 fp8 codes, round-to-nearest-even, saturating at +-FMAX."""
    SHIFT: tl.constexpr = 23 - MANTISSA_BITS
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.minimum(tl.abs(x), FMAX)  # saturate (inf too); NaN is replaced below
    u = a.to(tl.uint32, bitcast=True)
    e = (u >> 23).to(tl.int32)  # biased fp32 exponent of |x|

    # normal range: round the fp32 mantissa to MANTISSA_BITS (RNE), then re-bias the exponent;
    # a carry out of the mantissa correctly bumps the exponent.
    rounded = u + ((1 << (SHIFT - 1)) - 1) + ((u >> SHIFT) & 1)
    normal = (rounded >> SHIFT) - ((127 - BIAS) << MANTISSA_BITS)

    # subnormal range: count SUBNORMAL_STEP units in the full significand, RNE; 2^M is the smallest normal code.
    significand = (u & 0x7FFFFF) | 0x800000
    s = tl.minimum(151 - BIAS - MANTISSA_BITS - e, 31).to(tl.uint32)
    one = tl.full(s.shape, 1, tl.uint32)
    subnormal = (significand + ((one << (s - 1)) - 1) + ((significand >> s) & 1)) >> s

    magnitude = tl.where(e >= 128 - BIAS, normal, subnormal)
    if FNUZ:
        code = tl.where(magnitude == 0, 0, magnitude | sign)  # no negative zero
        code = tl.where(x != x, 0x80, code)
    else:
        code = tl.where(x != x, 0x7F | sign, magnitude | sign)
    return code.to(tl.uint8)


@triton.jit
def decode_fp8(
    code,
    MANTISSA_BITS: tl.constexpr,
    BIAS: tl.constexpr,
    SUBNORMAL_STEP: tl.constexpr,
    FNUZ: tl.constexpr,
    HAS_INF: tl.constexpr,
):
    """uint8 fp8 codes -> fp32 values, exact."""
    c = code.to(tl.uint32)
    magnitude = c & 0x7F
    e = magnitude >> MANTISSA_BITS
    m = magnitude & ((1 << MANTISSA_BITS) - 1)
    normal = (((e + (127 - BIAS)) << 23) | (m << (23 - MANTISSA_BITS))).to(tl.float32, bitcast=True)
    subnormal = m.to(tl.float32) * SUBNORMAL_STEP
    value = tl.where(e == 0, subnormal, normal)
    if HAS_INF:
        EXP_MAX: tl.constexpr = (1 << (7 - MANTISSA_BITS)) - 1
        value = tl.where(e == EXP_MAX, tl.where(m == 0, float("inf"), float("nan")), value)
    elif FNUZ:
        value = tl.where(c == 0x80, float("nan"), value)
    else:
        value = tl.where(magnitude == 0x7F, float("nan"), value)
    # the sign goes in as a bit: Triton compiles `-x` as `0 - x`, which turns -0 into +0 on the GPU
    return (value.to(tl.uint32, bitcast=True) | ((c & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def round_to_output(x, out_ptr):
    """fp32 -> the element type of ``out_ptr``, round-to-nearest-even.

    bf16 is rounded on the bit pattern: the Triton interpreter's own fp32 -> bf16 cast truncates, so it would not
    match torch on the CPU. fp16 and fp32 use the plain cast, which is exact-RNE on both.
    """
    if out_ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0 | ((bits >> 16) & 0x8000), rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(out_ptr.dtype.element_ty)
