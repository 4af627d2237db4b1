"""Attention of new queries straight from the FP8 cache bytes: a split-KV ("flash-decoding") Triton kernel for decode
steps that also runs chunks of any length (prefill over the cache) in FlashAttention-style causal tiles.

    p[n]             = softmax_n(q[b, hq, i, :] . k_fp8[b, h, n, :] * sm_scale * k_scale[h])
    out[b, i, hq, :] = sum_n p[n] * v_fp8[b, h, n, :] * v_scale[h]

with h = hq // G (GQA group G = Hq / H), the query row i (0-based within Sq) at absolute position L - Sq + i, and
n running over kv_start[b] <= n <= L - Sq + i (left padding below kv_start, causal above). The scales are folded
where they are cheapest: k_scale into the logit scale, v_scale into the final division by the softmax sum l.

Per-token-head scales (``TOKEN_SCALES``, ``strategy="token_head"``: bf16 k_scale[b, h, n], v_scale[b, h, n] beside
the codes, which are then int8 or fp8): K's scale multiplies each logit, V's each probability before the P @ V sum
(relative to the block's largest value scale, so the fp16 operand keeps its range; the accumulator counts in that
unit, ``_attend_block``, and P @ V accumulates into it directly). int8 codes become fp16 through their bits
(``_codes_to_dot``: no integer-to-float conversion). The unmasked blocks read the scales two to a 32-bit word
(``PAIRED_SCALES``, ``_scale_pairs``) where the capacity is even: the loop's software pipeline then copies them
ahead with the codes (H200, 8x32768, e4m3 codes: 2-byte scale loads 214 us against 139 us per tensor; no scale
loads 146 us; 4-byte loads 155 us).

Options of the model families with them, each a constexpr specialization (without them the kernel compiles to the
plain path): a sliding window W (``SLIDING``: row i also needs n > L - Sq + i - W, transformers' ``kv_idx > q_idx -
W``; the splits share only the key blocks from the one holding the first row's window start, so the work follows W,
not L), a logit softcap c (``SOFTCAP``: logits c * tanh(logits / c) before masking, Gemma 2), and learned sinks
(``HAS_SINKS``: one logit s per query head that joins the softmax sum as exp(s - m) with no value, GPT-OSS; added
where l is divided).

Layout and dtypes:
- query ``[B, Hq, Sq, D]`` fp16 / bf16 / fp32, any strides (transformers hands over a transposed view); Sq is 1 for
  plain decode, a few for speculative tokens, or any length up to L (a chunk of a prompt over the cache); D in
  {64, 80, 128, 256} (any D <= 256 works).
- key / value caches: uint8 views of contiguous fp8 buffers ``[B, H, capacity, D]``, of which the first L tokens are
  read; formats e4m3fn and e5m2 (the ROCm fnuz formats raise ``ValueError``), and int8 with per-token scales.
- key_scale / value_scale: fp32 with 1 element (per tensor) or H (per KV head), or contiguous bf16 ``[B, H,
  capacity]`` (per token and head; not with ``new``); kv_start: int32 ``[B]``.
- out: contiguous ``[B, Sq, Hq, D]`` in the query's dtype, the layout an attention function returns to transformers.
- kv_length: a Python int, or a one-element integer tensor on the device (the static cache's filled length; then
  nothing on the host depends on it, so a compiled or CUDA-graphed step replays unchanged). The split count is
  then planned for the whole capacity, and each program divides the filled blocks evenly among the splits itself:
  the work stays proportional to the tokens written, not to the capacity.
- recent (optional ``RecentWindow``): ring buffers ``[B, H, R, D]`` in the query's dtype holding the exact K/V of
  positions [start, L) at slot ``position % R``; those positions are read from the ring instead of the fp8 bytes.

Design:
- Grid (B * H, splits, row tiles). A program owns one (batch row, KV head), one contiguous range of the keys (its
  split) and a tile of BLOCK_M query rows: the G query heads sharing the KV head times the Sq positions, row
  r = i * G + g (position major, ``_query_of_row``: a tile holds consecutive positions), padded to BLOCK_M >= 16
  (the smallest tl.dot shape), so each K/V byte is read once per tile.
- Causal tiles: a tile reads keys only up to its last row's position (later key blocks are skipped: a chunk's work
  is a trapezoid, not a rectangle), masks only the blocks from its first row's position on (and, with a sliding
  window, those below its last row's window start), and reads no block below its first row's window.
- Chunks (more than _MAX_BLOCK_M = 64 query rows a KV head, ``block_rows``): tiles of 128 rows and eight warps while
  a tile stays 128 x 128 elements (FlashAttention's tile on Hopper: each K/V byte read and converted serves 128
  rows), with splits aimed at 2 programs an SM (``_CHUNK_PROGRAMS_PER_SM``): a short chunk over a long history
  still splits its keys (8 x 32768 with q = 17: 4 splits), a long chunk runs one split a tile.
- Keys are decoded with the hardware conversion (uint8 -> fp8 bitcast -> fp16, exact for both formats) and fed to
  tl.dot in fp16 for fp16 / bf16 queries (bf16 q is saturated to +-65504 and rounded to fp16: exact for
  2^-14 <= |q| <= 65504, and fp16 keeps more mantissa than bf16) and in fp32 (input_precision="ieee") for fp32
  queries. bf16 operands never reach tl.dot: the Triton interpreter gets that dot wrong, and e4m3 -> bf16 costs
  three instructions per two elements on sm_90 against one for e4m3 -> fp16.
- Online softmax in fp32 on exp2 (log2(e) folded into the logit scale): running max m, sum l, accumulator acc.
  The running max starts at a finite -1e30, so fully masked blocks and rows never compute inf - inf; a row that
  sees no key at all (l == 0) writes zeros, never NaN. K and V loads outside [kv_start, L) read zeros, so stale
  or NaN bytes in padding or spare capacity cannot leak through 0 * NaN. Only the partial key blocks at the edges
  of a split pay for this masking; the blocks between hold only valid, visible keys and skip it (``MASKED=False``).
- The exact window: the fp8 splits stop at the window's start, and one more launch of the same kernel, specialized
  with EXACT_WINDOW (one program per (b, h) and row tile), runs the same online-softmax step (``_attend_block``) over
  the ring into the last partial slot: logit scale without k_scale, values divided by v_scale (which the end
  applies to everything). A separate specialization because a second loop in the same kernel slowed the fp8 loop
  by up to 50 % on the H200.
- Program shape (see program_shape): a tile of 16 query rows x 128 dims runs in one-warp programs over 32 keys a step
  when there is work for at least 4 of them an SM (each program then reduces its softmax rows inside one warp, with
  no shared-memory round trip per step); smaller workloads (one batch row) and bigger tiles run four (eight) warps
  over 64 (32 for D > 128) keys a step; chunk tiles of 128 rows over 128 keys a step.
- Splits: as many as fit 8 programs an SM in one wave (at most 32 splits, at most one per BLOCK_N block of keys;
  see split_plan). With one partial (one split, no window) the attention kernel normalizes and writes ``out``
  itself; otherwise each split (and the window) stores its (m, l, acc) in fp32 and counts its slot done on an
  int32 counter per (b, h, row tile) (``tl.atomic_add`` with acquire-release semantics, after a barrier so every
  thread's stores are issued); the program that completes the count sets it back to zero and merges the tile's
  slots (``_merge_slots``: one round of loads a query row, all its slots at once; a chunk tile's 128 rows one slot a
  round, ``_merge_tile_slots``) into ``out``. One launch a step,
  no combine kernel (a launch less of host time per layer in eager decode).
- The step's own token (``new``, ``NEW_TOKEN``; one query token): the program whose keys hold position L - 1
  quantizes its K/V with ``fp8_codec.encode_fp8`` (bit for bit what ``quantize_append_kv`` writes; with per-token-head
  scales ``token_head.quantize_rows``, what ``quantize_append_token_head`` writes, its two scales too), stores the codes
  and attends over them from registers in its masked tail block (the unmasked blocks end before L - 1), so a decode
  step is one launch instead of two.
- The launcher ``decode_attention`` validates, plans (``plan_decode_attention``: block sizes, program shape and
  splits as a ``DecodePlan``, host integers only), allocates the partials and launches.
- Offsets into the caches: a 64-bit block pointer plus int32 offsets inside the block; other offsets are int64.
  The output goes through ``fp8_codec.round_to_output`` (round-to-nearest-even, also for bf16
  under the interpreter).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .checks import check_decode_attention, check_decode_lengths
from .dispatch import _INTERPRETER
from .formats import Int8Format, StorageFormat, format_named
from .fp8_codec import encode_fp8, round_to_output
from .launch import LaunchMemo, launch
from .new_tokens import NewTokens
from .recent_window import RecentWindow
from .token_head import quantize_rows

# exp(x) == exp2(x * log2(e)); the factor is folded into the logit scale.
_LOG2E = 1.4426950408889634
# tl.dot needs every dimension (M, N, K) to be at least 16.
_MIN_DOT_SIZE = 16
# The smallest inner size of an e4m3 tl.dot (FP8 queries): Triton refuses K < 32 for fp8 operands.
_MIN_FP8_DOT_K = 32
# Query rows (G * Sq) per program of a decode-sized tile; bigger groups get more programs along grid axis 2 (keeps
# acc in registers).
_MAX_BLOCK_M = 64
# Query rows per program when there are more than _MAX_BLOCK_M (a chunk: prefill over the cache, or a large group):
# 128-row tiles with eight warps, FlashAttention's shape on Hopper, so each K/V byte read and converted serves twice
# the rows. Only while a tile stays at 128 x 128 elements (D <= 128); D = 256 keeps 64-row tiles.
_CHUNK_BLOCK_M = 128
_CHUNK_TILE = 128 * 128
# Keys per loop iteration, halved for D > 128 so a K or V tile stays at 8K elements.
_BLOCK_N = 64
# Keys per loop iteration of a chunk tile (_CHUNK_BLOCK_M rows): FlashAttention's 128 x 128 Hopper tile, each Q.K^T
# twice as long for the same softmax bookkeeping (H200, B=8, 32 q / 8 KV heads, d=128, us at 128 / 64 keys:
# 17 queries over 32768, 416 / 472; 2048 over 32768, 23779 / 29746; benchmarks/gpu/chunk_sweep.py, 2026-12-01).
_CHUNK_BLOCK_N = 128
# (fp32 queries, whose fp32 K and V tiles take shared memory: 128 keys need 256 KiB at D = 128, beyond the H200's 227
# KiB an SM; they keep _BLOCK_N keys, 160 KiB)
# One-warp programs: for tiles of at most 16 query rows x 128 dims, over 32 keys a step, when there is work for at
# least _NARROW_MIN_PROGRAMS_PER_SM of them an SM (8x32768 on the H200: 138.8 us against 159.5 us for four warps).
_NARROW_TILE = 16 * 128
_NARROW_BLOCK_N = 32
_NARROW_MIN_PROGRAMS_PER_SM = 4
# Programs an SM in the one wave the split count aims at: a one-warp program never needs more than 255 registers
# a thread, so 8 of them always fit an SM's 64K registers together. For four-warp programs (few programs, or tiles
# beyond 16 x 128) 8 an SM is more than a wave; with few programs the split count stops at _MAX_SPLITS first.
_PROGRAMS_PER_SM = 8
# Programs an SM in the wave the split count aims at for chunk tiles (_CHUNK_BLOCK_M rows, eight warps): such a
# program holds ~200 registers a thread (a 128 x 128 fp32 accumulator, the query tile, a 128 x 64 logit tile), so
# one or two of them fit an SM; two an SM fills one wave either way (two waves of one). Not measured yet (issue 17:
# benchmarks/gpu/chunk_sweep.py sweeps the split count).
_CHUNK_PROGRAMS_PER_SM = 2
# At most this many splits per (batch row, KV head): more only adds merge work (1x32768 on the H200: 32 splits
# 29.9 us, 128 splits 35.5 us).
_MAX_SPLITS = 32
# SM count assumed when the tensors are not on a CUDA device (interpreter runs): an H200.
_DEFAULT_SM_COUNT = 132
# Largest finite fp16: bf16 queries are saturated to it before the fp16 dot.
_FP16_MAX = 65504.0
# FP8 queries (``quantize_query``): Q @ K^T on e4m3 operands (each query row scaled by amax / 448, so its largest value
# becomes e4m3's largest; the keys' codes as stored), P @ V in fp16 over the values' codes as without them. An e4m3
# P @ V was 1.5x slower on the H200 (Hopper's FP8 MMA wants V K-major, so Triton transposes every V block through
# shared memory) and rounded each probability to 3 mantissa bits (docs/benchmarks.md, FP8 queries).
_E4M3_MAX = tl.constexpr(448.0)
_E4M3 = format_named("e4m3fn")
# Whether Triton interprets this process's launches (``dispatch``'s reading): its float -> fp8 conversion is wrong
# there, so the operands are encoded with integer arithmetic; compiled, the hardware conversion (round to nearest
# even, saturating: the same bits, FACTS.md) costs one instruction per two values instead of ~25.
_INTERPRETED = tl.constexpr(_INTERPRETER)
assert (_E4M3.mantissa_bits, _E4M3.bias, _E4M3.max) == (3, 7, 448.0)  # the literals of _e4m3 and _E4M3_MAX
# Finite stand-in for -inf as the initial running max (exp2(m_old - m_new) must never see inf - inf).
_M_INIT = -1.0e30
# Per-token-head scales: the smallest unit the accumulator counts its P @ V sum in (``_attend_block``). Values below
# 448 * 2^-30 (4e-7) may round to zero in the fp16 P operand of a block whose largest scale is this small; a block
# with larger scales keeps the accumulator below 448 * (largest scale) / 2^-30, which only overflows fp32 for values
# beyond 1e29.
_MIN_VALUE_UNIT = tl.constexpr(2.0**-30)


@triton.jit
def _to_dot_dtype(x, DOT_DTYPE: tl.constexpr, FP16_MAX: tl.constexpr):
    """A query or exact-window tile in the dot dtype: bf16 into an fp16 dot is saturated to the fp16 range first."""
    if x.dtype != DOT_DTYPE:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -FP16_MAX), FP16_MAX).to(DOT_DTYPE)
    return x


@triton.jit
def _e4m3(x):
    """fp32 -> e4m3 operand, round to nearest even, saturating: the hardware conversion, or under the interpreter
    (whose own conversion is wrong) ``fp8_codec.encode_fp8``'s same bits."""
    if _INTERPRETED:
        return encode_fp8(x, 3, 7, 448.0, False).to(tl.float8e4nv, bitcast=True)
    return x.to(tl.float8e4nv)


@triton.jit
def _e4m3_query(q):
    """A query tile -> (e4m3 tile, fp32 scale a row): row r is q[r] / scale[r] with scale[r] = amax_d |q[r, d]| / 448
    (1 for a zero row), both divisions exact-rounded (``tl.math.div_rn``) as in the torch twin."""
    x = q.to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    scale = tl.where(amax > 0.0, tl.math.div_rn(amax, _E4M3_MAX), 1.0)
    return _e4m3(tl.math.div_rn(x, scale[:, None])), scale


@triton.jit
def _query_of_row(r, G):
    """(g, i) of query row r of a (b, h) program: r = i * G + g, query head h * G + g at chunk position i. Position
    major, so a tile of rows holds consecutive positions (of all G heads): its causal range is narrow."""
    return r % G, r // G


@triton.jit
def _softcapped(x, softcap):
    """``softcap * tanh(s / softcap)`` in log2 units, from ``x = 2 * s / softcap * log2(e)`` (the logit scale folds
    that factor in) and ``softcap`` already times log2(e): tanh(y) = 1 - 2 / (exp(2y) + 1) on exp2, portable to the
    interpreter, and exactly +-1 at the extremes (exp2 gives inf or 0)."""
    return softcap * (1.0 - 2.0 / (tl.exp2(x) + 1.0))


@triton.jit
def _attend_block(q, k, v, n, n_valid, first_visible, last_visible, qk_scale, softcap, m_i, l_i, acc,
                  PV_DTYPE: tl.constexpr, MASKED: tl.constexpr = True, SLIDING: tl.constexpr = False,
                  SOFTCAP: tl.constexpr = False, TOKEN_SCALES: tl.constexpr = False, value_scales=None,
                  value_unit=1.0):  # fmt: skip
    """One online-softmax step over a block of keys n (q, k in the dot dtype, v in ``PV_DTYPE``, the P @ V operands'
    dtype; invalid keys loaded as zeros).
    MASKED=False: every key of the block is valid and visible to every row (no masking work). SLIDING: row r also
    needs n >= first_visible[r]. SOFTCAP: the logits are soft-capped before masking (``_softcapped``). TOKEN_SCALES:
    ``qk_scale`` is ``[1, BLOCK_N]`` (each key's scale folded in) and each probability is multiplied by its value's
    scale (``value_scales`` ``[BLOCK_N]``, fp32) before P @ V: divided by the block's largest scale, so the fp16
    operand keeps its range (no underflow for small scales). The accumulator then holds its sum in units of that
    scale (``value_unit``, returned: the caller multiplies by the last one at the end), so P @ V accumulates into it
    directly (one multiply an element, as without per-token scales; a separate product and a multiply-add cost 64
    registers and 64 instructions a thread, and the spills with them). A block of invalid keys only (scales loaded
    as 0) keeps the unit; a block's largest scale counts as at least ``_MIN_VALUE_UNIT``, so a block of near-zero
    values (scales down to 2^-126 where a token is all zeros) cannot overflow the accumulator."""
    qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    if SOFTCAP:
        qk = _softcapped(qk, softcap)
    if MASKED:
        visible = n_valid[None, :] & (n[None, :] <= last_visible[:, None])
        if SLIDING:
            visible = visible & (n[None, :] >= first_visible[:, None])
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if TOKEN_SCALES:
        block_max = tl.max(value_scales, 0)
        unit = tl.where(block_max > 0.0, tl.maximum(block_max, _MIN_VALUE_UNIT), value_unit)
        acc = tl.dot((p * (value_scales / unit)[None, :]).to(PV_DTYPE), v, acc * (alpha * (value_unit / unit))[:, None],
                     input_precision="ieee")  # fmt: skip
        return m_new, l_i, acc, unit
    acc = acc * alpha[:, None] + tl.dot(p.to(PV_DTYPE), v, input_precision="ieee")
    return m_new, l_i, acc, value_unit


@triton.jit
def _output_factor(m, total, v_scale, sink_ptrs, sink_mask, HAS_SINKS: tl.constexpr, LOG2E: tl.constexpr):
    """What the accumulator is multiplied by at the end: ``v_scale / total``, where a learned sink (one logit per
    query head, no value) adds ``exp(sink - m)`` to the softmax sum ``total`` (m in log2 units). A row that saw no key
    (total == 0; with a sink, total = inf) has a zero accumulator and gets zeros, never NaN."""
    if HAS_SINKS:
        total = total + tl.exp2(tl.load(sink_ptrs, mask=sink_mask, other=0.0) * LOG2E - m)
    return v_scale / tl.where(total == 0.0, 1.0, total)


@triton.jit
def _codes_to_dot(codes, CODE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """uint8 codes -> the dot dtype, exactly. int8 into fp16 without an integer-to-float conversion (16 a clock an SM
    on the H200, the int8 cache's bottleneck): the fp16 with bits 0x6400 | u is 1024 + u, so (code ^ 0x80) with
    0x64 above it, less 1152, is the code's value."""
    if (CODE_DTYPE == tl.int8) and (DOT_DTYPE == tl.float16):
        return (codes.to(tl.uint16) ^ 0x6480).to(tl.uint16).to(tl.float16, bitcast=True) - 1152.0
    return codes.to(CODE_DTYPE, bitcast=True).to(DOT_DTYPE)


@triton.jit
def _scale_pairs(scales_ptr, BLOCK_N: tl.constexpr):
    """BLOCK_N bf16 scales from a 4-byte aligned address, as fp32. Each key reads the 32-bit word
    holding its scale (two keys a word, the same bytes from memory) and shifts its half out: a 4-byte load a thread,
    which the loop's software pipeline copies ahead asynchronously like the codes (2-byte loads stay synchronous and
    cost their latency every block), and no join of the even and odd halves (a layout change every block: the key
    loop compiled for sm_90a by triton 3.6 has 947 instructions a block against 1010 with the join and 815 with one
    scale, ``benchmarks/decode_sass.py``)."""
    n = tl.arange(0, BLOCK_N)
    words = tl.load(scales_ptr.to(tl.pointer_type(tl.uint32)) + n // 2)
    return ((words >> (n % 2) * 16) << 16).to(tl.float32, bitcast=True)  # the even position in the low half


@triton.jit
def _attend_fp8_blocks(
    q, k_cache_ptr, v_cache_ptr, block_base, lo, hi, kv_first, kv_end, first_visible, last_visible, qk_scale,
    softcap, m_i, l_i, acc, value_unit, new_position, new_k_codes, new_v_codes, new_k_scale, new_v_scale, k_scale_ptr,
    v_scale_ptr, ring_slots, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CODE_DTYPE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr,
    MASKED: tl.constexpr, STAGES: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
    TOKEN_SCALES: tl.constexpr, NEW_TOKEN: tl.constexpr = False, RING: tl.constexpr = False,
    PAIRED_SCALES: tl.constexpr = False,
):  # fmt: skip
    """Online softmax over the fp8 key blocks at lo, lo + BLOCK_N, ... below hi of the (b, h) whose keys start at
    block_base (contiguous rows of D bytes). Addressing: a 64-bit block pointer plus int32 offsets inside the block
    (8 % faster at 8x32768 on the H200 than int64 offsets per element), the row stride a compile-time D (14 fewer
    registers a thread than a stride argument), no head-dim mask when BLOCK_D == D. MASKED=False: the caller
    guarantees that every key in [lo, hi) is valid and visible to every row, and nothing is masked. NEW_TOKEN
    (masked blocks only): position new_position takes the codes new_k_codes / new_v_codes ``[BLOCK_D]`` from
    registers (the step's own token, which this program also writes to the cache), not from memory. TOKEN_SCALES:
    each key's and value's bf16 scale is read beside its codes (``[B, H, capacity]``, so the (b, h) row's scales start
    at block_base / D; the new token's, new_k_scale / new_v_scale, from registers) and goes to ``_attend_block``;
    codes are int8 or fp8 (``CODE_DTYPE``). PAIRED_SCALES (even capacity, 4-byte aligned scales): the unmasked blocks
    read them as 32-bit words (``_scale_pairs``). RING: n counts
    slots of a ring of ``ring_slots`` below kv_end, and slot n holds the latest position p <= L - 1 (L - 1 is
    ``new_position``) with p % ring_slots == n (negative before the ring's first wrap: never written), which the
    masks compare."""
    k_block = k_cache_ptr + block_base + lo.to(tl.int64) * D
    v_block = v_cache_ptr + block_base + lo.to(tl.int64) * D
    k_scales = k_scale_ptr + block_base // D + lo.to(tl.int64)
    v_scales = v_scale_ptr + block_base // D + lo.to(tl.int64)
    tile = tl.arange(0, BLOCK_N)[:, None] * D + tl.arange(0, BLOCK_D)[None, :]
    tile_d_valid = (tl.arange(0, BLOCK_D)[None, :] < D) | (BLOCK_D == D)
    for start in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        n = start + tl.arange(0, BLOCK_N)
        if RING:  # slot -> position (% on non-negative operands: the GPU's truncates, the interpreter's floors)
            n_valid = n < kv_end
            n = new_position - (new_position - n + ring_slots) % ring_slots
            n_valid = n_valid & (n >= kv_first)
        else:
            n_valid = (n >= kv_first) & (n < kv_end)
        if MASKED:
            kv_mask = n_valid[:, None] & tile_d_valid
        else:
            kv_mask = tile_d_valid
        k = tl.load(k_block + tile, mask=kv_mask, other=0)
        v = tl.load(v_block + tile, mask=kv_mask, other=0)
        if NEW_TOKEN:
            is_new = (n == new_position)[:, None]
            k = tl.where(is_new, new_k_codes[None, :], k)
            v = tl.where(is_new, new_v_codes[None, :], v)
        k = _codes_to_dot(k, CODE_DTYPE, DOT_DTYPE)
        v = _codes_to_dot(v, CODE_DTYPE, PV_DTYPE)
        if TOKEN_SCALES:
            scale_offsets = tl.arange(0, BLOCK_N)
            if MASKED:
                key_scales = tl.load(k_scales + scale_offsets, mask=n_valid, other=0.0).to(tl.float32)
                value_scales = tl.load(v_scales + scale_offsets, mask=n_valid, other=0.0).to(tl.float32)
                if NEW_TOKEN:
                    key_scales = tl.where(n == new_position, new_k_scale, key_scales)
                    value_scales = tl.where(n == new_position, new_v_scale, value_scales)
            elif PAIRED_SCALES:
                key_scales = _scale_pairs(k_scales, BLOCK_N)
                value_scales = _scale_pairs(v_scales, BLOCK_N)
            else:
                key_scales = tl.load(k_scales + scale_offsets).to(tl.float32)
                value_scales = tl.load(v_scales + scale_offsets).to(tl.float32)
            m_i, l_i, acc, value_unit = _attend_block(q, k, v, n, n_valid, first_visible, last_visible,
                                                      qk_scale * key_scales[None, :], softcap, m_i, l_i, acc,
                                                      PV_DTYPE, MASKED, SLIDING, SOFTCAP, True, value_scales,
                                                      value_unit)  # fmt: skip
            k_scales += BLOCK_N
            v_scales += BLOCK_N
        else:
            m_i, l_i, acc, _ = _attend_block(q, k, v, n, n_valid, first_visible, last_visible, qk_scale, softcap,
                                             m_i, l_i, acc, PV_DTYPE, MASKED, SLIDING, SOFTCAP)  # fmt: skip
        k_block += BLOCK_N * D
        v_block += BLOCK_N * D
    return m_i, l_i, acc, value_unit


@triton.jit
def _first_key_block(L, SQ, window, BLOCK_N: tl.constexpr, SLIDING: tl.constexpr):
    """The first key position of the block holding the first key any query row can see: 0 without a sliding
    window; with one, the block of the first row's window start L - SQ - window + 1 (``first_key_block``, host twin)."""
    if SLIDING:
        return (tl.maximum(L - SQ - window + 1, 0) // BLOCK_N) * BLOCK_N
    return 0


# The length and split sizes change every decode step: no value specialization (would compile extra variants).
@triton.jit(do_not_specialize=["L", "num_slots", "first_slot", "blocks_per_split", "recent_start"])
def _decode_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, kv_start_ptr, k_scale_ptr, v_scale_ptr, length_ptr,
    recent_k_ptr, recent_v_ptr, sink_ptr, new_k_ptr, new_v_ptr, k_inv_scale_ptr, v_inv_scale_ptr,
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, counter_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_cb, stride_ch,
    stride_rb, stride_rh, stride_rs,
    stride_nkb, stride_nkh, stride_nkd, stride_nvb, stride_nvh, stride_nvd,
    scale_stride_h,
    H, G, SQ, D: tl.constexpr, L, num_slots, first_slot, blocks_per_split, qk_scale, R, recent_start, window, softcap,
    ring_slots,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    CODE_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, PV_DTYPE: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    EXACT_WINDOW: tl.constexpr,
    FP16_MAX: tl.constexpr, M_INIT: tl.constexpr, LENGTH_IN_MEMORY: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, LOG2E: tl.constexpr,
    NEW_TOKEN: tl.constexpr, MANTISSA_BITS: tl.constexpr, BIAS: tl.constexpr, FMAX: tl.constexpr,
    FNUZ: tl.constexpr, TOKEN_SCALES: tl.constexpr, MERGE_BY_SLOT: tl.constexpr, RING: tl.constexpr,
    PAIRED_SCALES: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    if LENGTH_IN_MEMORY:  # the filled length lives on the device; share its blocks among the launched splits
        L = tl.load(length_ptr).to(tl.int32)
        if RING:  # the written slots
            recent_start = tl.minimum(L, ring_slots)
            key_blocks = tl.cdiv(recent_start, BLOCK_N)
        else:
            recent_start = L
            key_blocks = tl.cdiv(L - _first_key_block(L, SQ, window, BLOCK_N, SLIDING), BLOCK_N)
        blocks_per_split = tl.cdiv(key_blocks, tl.num_programs(1))

    # query rows of this tile: r = i * G + g -> query head h * G + g at position L - SQ + i (_query_of_row); the
    # tile's rows sit at positions first_row ..= last_row
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < G * SQ
    g, i = _query_of_row(rows.to(tl.int64), G)
    first_row = L - SQ + (pid_m * BLOCK_M) // G
    last_row = L - SQ + tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, SQ - 1)
    d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_valid = d < D
    q_mask = row_valid[:, None] & d_valid[None, :]
    q_offsets = b * stride_qb + (h * G + g)[:, None] * stride_qh + i[:, None] * stride_qs + d[None, :] * stride_qd
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)
    if DOT_DTYPE == tl.float8e4nv:  # FP8 queries: each row's scale multiplies its logits
        q, q_scale = _e4m3_query(q)
        qk_scale = qk_scale * q_scale[:, None]
    else:
        q = _to_dot_dtype(q, DOT_DTYPE, FP16_MAX)

    kv_first = tl.load(kv_start_ptr + b)  # positions below are left padding
    last_visible = L - SQ + i  # causal: row i sees keys up to its own position
    first_visible = last_visible - window + 1  # sliding window: and the window - 1 before (used when SLIDING)
    m_i = tl.full([BLOCK_M], M_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    value_unit = tl.full([], 1.0, tl.float32)  # (per-token-head scales: the accumulator's unit, _attend_block)

    if EXACT_WINDOW:
        # the exact window [recent_start, L) from the ring buffers, position n at slot n % R. Its keys take the
        # logit scale without k_scale; its values enter divided by v_scale, which the end applies to everything (with
        # per-token scales, applied in the fp8 loop, neither: the end's factor is 1).
        if TOKEN_SCALES:
            inv_v_scale = 1.0
        else:
            inv_v_scale = 1.0 / tl.load(v_scale_ptr + h * scale_stride_h)
        recent_base = b * stride_rb + h * stride_rh
        ring_lo = tl.maximum(recent_start, kv_first)
        if SLIDING:
            ring_lo = tl.maximum(ring_lo, first_row - window + 1)
        ring_hi = last_row + 1  # causal: nothing past the tile's last row
        for start in range(ring_lo, ring_hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_valid = n < ring_hi
            kv_mask = n_valid[:, None] & d_valid[None, :]
            offsets = recent_base + (n % R).to(tl.int64)[:, None] * stride_rs + d[None, :]
            k = _to_dot_dtype(tl.load(recent_k_ptr + offsets, mask=kv_mask, other=0.0), DOT_DTYPE, FP16_MAX)
            v = tl.load(recent_v_ptr + offsets, mask=kv_mask, other=0.0).to(tl.float32) * inv_v_scale
            v = _to_dot_dtype(v, PV_DTYPE, FP16_MAX)
            m_i, l_i, acc, _ = _attend_block(q, k, v, n, n_valid, first_visible, last_visible, qk_scale, softcap,
                                             m_i, l_i, acc, PV_DTYPE, True, SLIDING, SOFTCAP)  # fmt: skip
    else:
        # this split's fp8 keys, from the block holding kv_start (blocks of pure padding are skipped) up to the
        # exact window's start (recent_start == L without one) and the tile's last row (causal: later key blocks
        # are skipped); with a sliding window the splits share only the blocks from the one holding the first row's
        # window start on, and a tile reads only those from its own first row's window start
        if not TOKEN_SCALES:  # (per-token key scales multiply each logit in _attend_fp8_blocks)
            qk_scale = qk_scale * tl.load(k_scale_ptr + h * scale_stride_h)  # sm_scale * log2(e) * k_scale[h]
        # Blocks in [inner_lo, inner_hi) hold only keys that are valid and visible to every row of the tile: they
        # skip all masking (3 % faster at 8x32768 on the H200) and are software-pipelined; the partial blocks around
        # them (at most one below; above, those the tile's rows reach causally; with a sliding window, below also
        # those the first rows' windows cut) are masked and not pipelined.
        if RING:  # slots: all valid and visible once the ring is full and the row's padding lies before it
            lo = split * blocks_per_split * BLOCK_N
            hi = tl.minimum(lo + blocks_per_split * BLOCK_N, recent_start)
            inner_lo = tl.where((L >= ring_slots) & (kv_first <= L - ring_slots), lo, hi)
            inner_hi = tl.maximum(inner_lo, (hi // BLOCK_N) * BLOCK_N)  # whole blocks only: the ring may end inside one
        else:
            lo = _first_key_block(L, SQ, window, BLOCK_N, SLIDING) + split * blocks_per_split * BLOCK_N
            hi = tl.minimum(tl.minimum(lo + blocks_per_split * BLOCK_N, recent_start), last_row + 1)
            lo = tl.maximum(lo, (kv_first // BLOCK_N) * BLOCK_N)
            if SLIDING:
                lo = tl.maximum(lo, (tl.maximum(first_row - window + 1, 0) // BLOCK_N) * BLOCK_N)
            inner_lo = tl.maximum(lo, tl.cdiv(kv_first, BLOCK_N) * BLOCK_N)
            if SLIDING:  # the tile's last row's window starts at last_row - window + 1
                inner_lo = tl.maximum(inner_lo, tl.cdiv(tl.maximum(last_row - window + 1, 0), BLOCK_N) * BLOCK_N)
            inner_lo = tl.minimum(inner_lo, hi)
            inner_end = first_row + 1  # every row of the tile sees the keys up to its first row's position
            if NEW_TOKEN:  # the new token (position L - 1) stays in a masked block: it is read from registers
                inner_end = first_row
            inner_hi = tl.maximum(inner_lo, (tl.minimum(hi, inner_end) // BLOCK_N) * BLOCK_N)
        block_base = b * stride_cb + h * stride_ch
        new_position = L - 1
        new_k_codes = tl.zeros([BLOCK_D], tl.uint8)
        new_v_codes = tl.zeros([BLOCK_D], tl.uint8)
        new_k_scale = 1.0
        new_v_scale = 1.0
        if NEW_TOKEN:
            # the step's one new token: the program whose keys hold position L - 1 quantizes its K/V (as
            # quantize_append_kv, or with TOKEN_SCALES as quantize_append_token_head, bit for bit), writes the codes
            # (and its scales) to the cache and attends over them from registers
            at_new = d * 0 + new_position  # [BLOCK_D]: tensor comparisons (the interpreter masks with no scalars)
            owner_mask = d_valid & (at_new >= lo) & (at_new < hi)
            new_k = tl.load(new_k_ptr + b * stride_nkb + h * stride_nkh + d * stride_nkd, mask=owner_mask, other=0.0)
            new_v = tl.load(new_v_ptr + b * stride_nvb + h * stride_nvh + d * stride_nvd, mask=owner_mask, other=0.0)
            if TOKEN_SCALES:  # each its own scale, from its own values (the unused inverse scales are not read)
                codes, scale = quantize_rows(new_k.to(tl.float32)[None, :], CODE_DTYPE == tl.int8, 1.0 / FMAX,
                                             MANTISSA_BITS, BIAS, FMAX, FNUZ)  # fmt: skip
                new_k_codes, new_k_scale = tl.reshape(codes, [BLOCK_D]), tl.max(scale, 0)
                codes, scale = quantize_rows(new_v.to(tl.float32)[None, :], CODE_DTYPE == tl.int8, 1.0 / FMAX,
                                             MANTISSA_BITS, BIAS, FMAX, FNUZ)  # fmt: skip
                new_v_codes, new_v_scale = tl.reshape(codes, [BLOCK_D]), tl.max(scale, 0)
                scale_offsets = block_base // D + at_new  # every lane the same address; lane 0 stores
                scale_mask = owner_mask & (d == 0)
                tl.store(k_scale_ptr + scale_offsets, (d * 0 + new_k_scale).to(tl.bfloat16), mask=scale_mask)
                tl.store(v_scale_ptr + scale_offsets, (d * 0 + new_v_scale).to(tl.bfloat16), mask=scale_mask)
            else:
                new_k_codes = encode_fp8(new_k.to(tl.float32) * tl.load(k_inv_scale_ptr + h * scale_stride_h),
                                         MANTISSA_BITS, BIAS, FMAX, FNUZ)  # fmt: skip
                new_v_codes = encode_fp8(new_v.to(tl.float32) * tl.load(v_inv_scale_ptr + h * scale_stride_h),
                                         MANTISSA_BITS, BIAS, FMAX, FNUZ)  # fmt: skip
            new_offsets = block_base + new_position.to(tl.int64) * D + d
            tl.store(k_cache_ptr + new_offsets, new_k_codes, mask=owner_mask)
            tl.store(v_cache_ptr + new_offsets, new_v_codes, mask=owner_mask)
        # (explicit arguments: starred tuples in calls are not in every Triton release this runs on)
        m_i, l_i, acc, value_unit = _attend_fp8_blocks(q, k_cache_ptr, v_cache_ptr, block_base, lo, inner_lo,
                                                       kv_first, recent_start, first_visible, last_visible, qk_scale,
                                                       softcap, m_i, l_i, acc, value_unit, new_position, new_k_codes,
                                                       new_v_codes, new_k_scale, new_v_scale, k_scale_ptr, v_scale_ptr,
                                                       ring_slots, D, BLOCK_N, BLOCK_D, CODE_DTYPE, DOT_DTYPE, PV_DTYPE,
                                                       MASKED=True, STAGES=1, SLIDING=SLIDING, SOFTCAP=SOFTCAP,
                                                       TOKEN_SCALES=TOKEN_SCALES, NEW_TOKEN=NEW_TOKEN,
                                                       RING=RING)  # fmt: skip
        m_i, l_i, acc, value_unit = _attend_fp8_blocks(q, k_cache_ptr, v_cache_ptr, block_base, inner_lo, inner_hi,
                                                       kv_first, recent_start, first_visible, last_visible, qk_scale,
                                                       softcap, m_i, l_i, acc, value_unit, new_position, new_k_codes,
                                                       new_v_codes, new_k_scale, new_v_scale, k_scale_ptr, v_scale_ptr,
                                                       ring_slots, D, BLOCK_N, BLOCK_D, CODE_DTYPE, DOT_DTYPE, PV_DTYPE,
                                                       MASKED=False, STAGES=None, SLIDING=SLIDING, SOFTCAP=SOFTCAP,
                                                       TOKEN_SCALES=TOKEN_SCALES,
                                                       PAIRED_SCALES=PAIRED_SCALES)  # fmt: skip
        m_i, l_i, acc, value_unit = _attend_fp8_blocks(q, k_cache_ptr, v_cache_ptr, block_base, inner_hi, hi,
                                                       kv_first, recent_start, first_visible, last_visible, qk_scale,
                                                       softcap, m_i, l_i, acc, value_unit, new_position, new_k_codes,
                                                       new_v_codes, new_k_scale, new_v_scale, k_scale_ptr, v_scale_ptr,
                                                       ring_slots, D, BLOCK_N, BLOCK_D, CODE_DTYPE, DOT_DTYPE, PV_DTYPE,
                                                       MASKED=True, STAGES=1, SLIDING=SLIDING, SOFTCAP=SOFTCAP,
                                                       TOKEN_SCALES=TOKEN_SCALES, NEW_TOKEN=NEW_TOKEN,
                                                       RING=RING)  # fmt: skip

    if TOKEN_SCALES:  # each value's own scale went in before P @ V; the accumulator counts in value_unit
        acc = acc * value_unit
        v_scale = 1.0
    else:
        v_scale = tl.load(v_scale_ptr + h * scale_stride_h)
    if WRITE_PARTIAL:
        # partials [B * H * G * SQ, num_slots, (D)]: row (b * H + h) * G * SQ + r is query (b, h * G + g, i)
        part = (pid_bh * G * SQ + rows) * num_slots + first_slot + split
        tl.store(part_m_ptr + part, m_i, mask=row_valid)
        tl.store(part_l_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=q_mask)
        # the last of the tile's num_slots programs (over this launch and the window's) merges them all: every
        # thread's stores are issued (barrier) before one thread counts this slot as done with release semantics
        counter = counter_ptr + pid_bh * tl.num_programs(2) + pid_m
        tl.debug_barrier()
        done = tl.atomic_add(counter, 1, sem="acq_rel")
        if done == num_slots - 1:
            tl.debug_barrier()
            tl.store(counter, 0)  # ready for the next launch
            if MERGE_BY_SLOT:
                m_i, l_i, acc = _merge_tile_slots(part_acc_ptr, part_m_ptr, part_l_ptr, pid_bh, rows, row_valid, d,
                                                  q_mask, num_slots, G, SQ, D, BLOCK_M, BLOCK_D, M_INIT)  # fmt: skip
                _store_rows(out_ptr, m_i, l_i, acc, v_scale, sink_ptr, b, h, g, i, d, row_valid, q_mask, H, G, SQ, D,
                            HAS_SINKS, LOG2E)  # fmt: skip
            else:
                _merge_slots(part_acc_ptr, part_m_ptr, part_l_ptr, v_scale, sink_ptr, out_ptr, pid_bh, pid_m, b, h,
                             num_slots, H, G, SQ, D, BLOCK_M, BLOCK_S, BLOCK_D, M_INIT, HAS_SINKS, LOG2E)  # fmt: skip
    else:
        _store_rows(out_ptr, m_i, l_i, acc, v_scale, sink_ptr, b, h, g, i, d, row_valid, q_mask, H, G, SQ, D,
                    HAS_SINKS, LOG2E)  # fmt: skip


@triton.jit
def _store_rows(out_ptr, m, total, acc, v_scale, sink_ptr, b, h, g, i, d, row_valid, q_mask, H, G, SQ, D,
                HAS_SINKS: tl.constexpr, LOG2E: tl.constexpr):  # fmt: skip
    """The tile's rows ``acc * v_scale / total`` (``_output_factor``) into ``out`` ``[B, SQ, H * G, D]``."""
    out = acc * _output_factor(m, total, v_scale, sink_ptr + h * G + g, row_valid, HAS_SINKS, LOG2E)[:, None]
    out_offsets = ((b * SQ + i[:, None]) * (H * G) + h * G + g[:, None]) * D + d[None, :]
    tl.store(out_ptr + out_offsets, round_to_output(out, out_ptr), mask=q_mask)


@triton.jit
def _merge_tile_slots(part_acc_ptr, part_m_ptr, part_l_ptr, pid_bh, rows, row_valid, d, q_mask, num_slots, G, SQ, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, M_INIT: tl.constexpr):  # fmt: skip
    """(m, l, acc) of the whole tile from its slots' partials, one slot a step (a chunk tile's merge: ``num_slots``
    rounds of ``[BLOCK_M, BLOCK_D]`` loads rather than ``_merge_slots``' one round a row, 128 rounds for a 128-row
    tile), each slot rescaled to the running max as in the online softmax. Empty slots (m = M_INIT, l = 0, acc = 0)
    add nothing. The loads bypass L1 (``.cg``): other SMs wrote the partials."""
    m = tl.full([BLOCK_M], M_INIT, tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(num_slots):
        part = (pid_bh * G * SQ + rows) * num_slots + s
        m_s = tl.load(part_m_ptr + part, mask=row_valid, other=M_INIT, cache_modifier=".cg")
        l_s = tl.load(part_l_ptr + part, mask=row_valid, other=0.0, cache_modifier=".cg")
        acc_s = tl.load(part_acc_ptr + part[:, None] * D + d[None, :], mask=q_mask, other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, m_s)
        old, new = tl.exp2(m - m_new), tl.exp2(m_s - m_new)
        total = total * old + l_s * new
        acc = acc * old[:, None] + acc_s * new[:, None]
        m = m_new
    return m, total, acc


@triton.jit
def _merge_slots(part_acc_ptr, part_m_ptr, part_l_ptr, v_scale, sink_ptr, out_ptr, pid_bh, pid_m, b, h, num_slots,
                 H, G, SQ, D, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                 M_INIT: tl.constexpr, HAS_SINKS: tl.constexpr, LOG2E: tl.constexpr):  # fmt: skip
    """Each query row of the tile from all its slots' partials: read in one round of loads (``BLOCK_S >=
    num_slots``), rescaled to their largest running max, added up, divided and written to ``out``. The loads bypass
    L1 (``.cg``): other SMs wrote the partials."""
    s = tl.arange(0, BLOCK_S)
    s_valid = s < num_slots
    d = tl.arange(0, BLOCK_D)
    d_valid = d < D
    for r in range(pid_m * BLOCK_M, tl.minimum(pid_m * BLOCK_M + BLOCK_M, G * SQ)):
        g, i = _query_of_row(r, G)
        part = (pid_bh * G * SQ + r) * num_slots + s
        m = tl.load(part_m_ptr + part, mask=s_valid, other=M_INIT, cache_modifier=".cg")
        l_part = tl.load(part_l_ptr + part, mask=s_valid, other=0.0, cache_modifier=".cg")
        acc = tl.load(part_acc_ptr + part[:, None] * D + d[None, :], mask=s_valid[:, None] & d_valid[None, :],
                      other=0.0, cache_modifier=".cg")  # fmt: skip
        m_all = tl.max(m, 0)
        weight = tl.where(s_valid, tl.exp2(m - m_all), 0.0)
        total = tl.sum(weight * l_part, 0)
        out = tl.sum(weight[:, None] * acc, 0)
        out = out * _output_factor(m_all, total, v_scale, sink_ptr + h * G + g, True, HAS_SINKS, LOG2E)
        out_offsets = ((b * SQ + i) * (H * G) + h * G + g) * D + d
        tl.store(out_ptr + out_offsets, round_to_output(out, out_ptr), mask=d_valid)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def program_shape(
    programs: int, block_m: int, block_d: int, sm_count: int, fp32_query: bool = False
) -> tuple[int, int]:
    """(keys a step, warps) of a program over a ``block_m`` x ``block_d`` query tile, given the number of programs
    without splitting (B * H * row tiles). One-warp programs keep the softmax row reductions inside a warp; they pay
    off once the splits can give at least ``_NARROW_MIN_PROGRAMS_PER_SM`` of them to every SM. Measured on the H200
    (one warp / four warps, us): 8x32768 138.8 / 159.5, 8x8192 42.0 / 49.1, 32x8192 144.4 / 171.6; with one batch
    row (8 programs) four warps stay ahead: 1x4096 11.1 / 8.9."""
    if block_m * block_d <= _NARROW_TILE and programs * _MAX_SPLITS >= _NARROW_MIN_PROGRAMS_PER_SM * sm_count:
        return _NARROW_BLOCK_N, 1
    warps = 8 if block_m * block_d >= 64 * 256 else 4
    if block_m >= _CHUNK_BLOCK_M and not fp32_query:
        return _CHUNK_BLOCK_N, warps
    return (_BLOCK_N if block_d <= 128 else _BLOCK_N // 2), warps


def split_plan(
    programs: int, kv_length: int, block_n: int, sm_count: int, programs_per_sm: int = _PROGRAMS_PER_SM
) -> tuple[int, int]:
    """(splits, blocks_per_split): the most splits that keep all programs in one wave of ``programs_per_sm`` an
    SM (``_PROGRAMS_PER_SM``; ``_CHUNK_PROGRAMS_PER_SM`` for chunk tiles), at most ``_MAX_SPLITS`` splits, at least
    one key block each. A program more than a wave holds starts a second
    wave that costs as much as the first: one-warp programs at 8x32768 on the H200 take 138.8 us with 16 splits
    (1024 programs for 132 SMs) and 166.7 us with 17 (1088).

    ``programs`` is the number of programs without splitting (B * H * row tiles). The split count is then
    recomputed from the blocks per split, so that no split is empty.
    """
    blocks = triton.cdiv(kv_length, block_n)
    splits = min(max(programs_per_sm * sm_count // programs, 1), _MAX_SPLITS, blocks)
    blocks_per_split = triton.cdiv(blocks, splits)
    return triton.cdiv(blocks, blocks_per_split), blocks_per_split


def first_key_block(kv_length: int, Sq: int, sliding_window: int | None, block_n: int) -> int:
    """The first position of the first key block any query row sees (the kernel's ``_first_key_block``): 0 without a
    sliding window; with one, the block holding the first row's window start ``kv_length - Sq - window + 1``. The
    splits share the blocks from there on: the work follows the window, not the length."""
    if sliding_window is None:
        return 0
    return max(kv_length - Sq - sliding_window + 1, 0) // block_n * block_n


@dataclass(frozen=True)
class DecodePlan:
    """How one ``decode_attention`` call is launched, planned on the host from shapes alone (see
    ``plan_decode_attention``)."""

    block_m: int  # query rows of a program: G * Sq padded to a power of two >= 16, at most _MAX_BLOCK_M, or
    #               _CHUNK_BLOCK_M beyond (see block_rows)
    block_n: int  # keys a loop step
    block_d: int  # head dims of a program: D padded to a power of two
    row_tiles: int  # programs along grid axis 2 (tiles of block_m query rows)
    splits: int  # fp8 programs per (b, h) and row tile; 0 when the exact window holds every position
    blocks_per_split: int  # key blocks of a split (the kernel shares them out itself when it reads the length)
    window: bool  # one more launch over the exact window, into the last slot
    num_warps: int  # of the fp8 launch
    window_warps: int  # of the window launch

    @property
    def slots(self) -> int:
        """Partial results per query row (one per fp8 split, one for the window); with one, nothing to merge."""
        return self.splits + self.window


def _partials(
    memo: LaunchMemo | None, shape: tuple[int, int], D: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """The float32 partial results (m, l ``shape``; acc ``shape + (D,)``) of the splits: the caller's memo keeps them
    from step to step."""
    if memo is None:
        return (torch.empty(shape, dtype=torch.float32, device=device), torch.empty(shape, dtype=torch.float32,
                device=device), torch.empty(*shape, D, dtype=torch.float32, device=device))  # fmt: skip
    return (memo.scratch("part_m", shape, torch.float32, device), memo.scratch("part_l", shape, torch.float32, device),
            memo.scratch("part_acc", (*shape, D), torch.float32, device))  # fmt: skip


def _slot_counters(memo: LaunchMemo | None, tiles: int, device: torch.device) -> torch.Tensor:
    """int32 zeros, one per (b, h, row tile): how many of the tile's slots are written (the last program merges them
    and sets its counter back to zero, so the memo keeps them zero from step to step)."""
    if memo is None:
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    return memo.scratch("slot_counters", (tiles,), torch.int32, device, zeroed=True)


def _strides_without_s(x: torch.Tensor) -> tuple[int, int, int]:
    """The b, h and d strides of a ``[B, H, 1, D]`` tensor."""
    stride_b, stride_h, _, stride_d = x.stride()
    return stride_b, stride_h, stride_d


def _code_dtype(fmt: StorageFormat) -> tl.dtype:
    """The Triton dtype the uint8 codes are bitcast to before their (exact) conversion to the dot dtype."""
    if isinstance(fmt, Int8Format):
        return tl.int8
    return tl.float8e4nv if fmt.exponent_bits == 4 else tl.float8e5


@functools.lru_cache(maxsize=256)  # one pair per plan and options: decode asks again every step
def _launch_meta(plan: DecodePlan, fmt: StorageFormat, dot_dtype: tl.dtype, length_in_memory: bool, sliding: bool,
                 softcap: bool, sinks: bool, new_token: bool, token_scales: bool, paired_scales: bool, ring: bool,
                 num_stages: int | None) -> tuple[dict, dict]:  # fmt: skip
    """The meta-parameters (constexprs and launch options) of the fp8 launch and of the exact-window launch (shared
    read-only: the launch memo compares them by identity first)."""
    codec = fmt.codec_constants()
    merge_by_slot = plan.block_m > _MAX_BLOCK_M  # a chunk tile: _merge_tile_slots, which needs no BLOCK_S (one compile)
    meta = dict(
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_D=plan.block_d,
        BLOCK_S=1 if merge_by_slot else triton.next_power_of_2(plan.slots),
        CODE_DTYPE=_code_dtype(fmt), TOKEN_SCALES=token_scales, PAIRED_SCALES=paired_scales,
        DOT_DTYPE=dot_dtype, PV_DTYPE=tl.float16 if dot_dtype == tl.float8e4nv else dot_dtype,
        WRITE_PARTIAL=plan.slots > 1, MERGE_BY_SLOT=merge_by_slot, FP16_MAX=_FP16_MAX, M_INIT=_M_INIT,
        LENGTH_IN_MEMORY=length_in_memory,
        SLIDING=sliding, SOFTCAP=softcap, HAS_SINKS=sinks, LOG2E=_LOG2E, NEW_TOKEN=new_token, RING=ring,
        MANTISSA_BITS=codec["MANTISSA_BITS"], BIAS=codec["BIAS"], FMAX=codec["FMAX"], FNUZ=codec["FNUZ"],
        num_warps=plan.num_warps, **({} if num_stages is None else {"num_stages": num_stages}),
    )  # fmt: skip
    return dict(meta, EXACT_WINDOW=False), dict(meta, EXACT_WINDOW=True, num_warps=plan.window_warps)


def _paired_scales(key_scale: torch.Tensor, value_scale: torch.Tensor) -> bool:
    """Whether per-token-head scales ``[B, H, capacity]`` can be read two to a 32-bit word (``_scale_pairs``): an even
    capacity (every row and key block then starts on a 4-byte boundary) and 4-byte aligned tensors."""
    return (
        key_scale.dim() == 3
        and key_scale.shape[2] % 2 == 0
        and all(scale.data_ptr() % 4 == 0 for scale in (key_scale, value_scale))
    )


def _call_form(
    query, key_cache, value_cache, kv_length, kv_start, key_scale, value_scale, fmt, out, recent, sliding_window,
    sinks, softcap, new, ring, quantize_query,
) -> tuple[tuple, tuple]:  # fmt: skip
    """What ``check_decode_attention`` validates of a call besides its lengths (``check_decode_lengths``), in two
    parts: the shapes, dtypes and devices of the tensors a caller makes anew each step (the query, the row starts, the
    step's K/V, the module's sinks) with the options, compared by value; and the tensors it keeps from step to step
    (buffers, scales, exact window), compared by identity (a tensor keeps its shape, dtype and device). Two calls
    with equal forms pass the same checks but the lengths'. 1.5 us where the checks take 8 (CPU)."""
    kept: tuple = (key_cache, value_cache, key_scale, value_scale)
    if isinstance(kv_length, torch.Tensor):
        kept += (kv_length,)
    if recent is not None:
        kept += (recent.keys, recent.values)
    made: tuple = (
        query.shape, query.dtype, query.device, kv_start.shape, kv_start.dtype, kv_start.device,
        None if out is None else (out.shape, out.dtype, out.device, out.is_contiguous()),
        None if sinks is None else (sinks.shape, sinks.dtype, sinks.device, sinks.is_contiguous()),
    )  # fmt: skip
    if new is not None:
        kept += (new.key_inv_scale, new.value_inv_scale)
        made += (new.keys.shape, new.keys.dtype, new.keys.device, new.values.shape, new.values.dtype,
                 new.values.device)  # fmt: skip
    options = (fmt, type(kv_length), recent is None, sliding_window, softcap, new is None, ring, quantize_query)
    return made + options, kept


def block_rows(rows: int, block_d: int) -> int:
    """Query rows of a program for ``rows`` = G * Sq query rows a (b, h): the next power of two (at least the
    smallest tl.dot size) up to ``_MAX_BLOCK_M``; beyond, ``_CHUNK_BLOCK_M`` rows while such a tile holds at most
    ``_CHUNK_TILE`` elements (D <= 128), else ``_MAX_BLOCK_M``."""
    block_m = max(triton.next_power_of_2(rows), _MIN_DOT_SIZE)
    if block_m <= _MAX_BLOCK_M:
        return block_m
    return _CHUNK_BLOCK_M if _CHUNK_BLOCK_M * block_d <= _CHUNK_TILE else _MAX_BLOCK_M


@functools.lru_cache(maxsize=4096)  # integers in, a frozen plan out: decode asks again every step
def plan_decode_attention(
    B: int, H: int, G: int, Sq: int, D: int, kv_length: int, window_start: int | None, sm_count: int, *,
    sliding_window: int | None = None, num_splits: int | None = None, block_m: int | None = None,
    block_n: int | None = None, num_warps: int | None = None, fp32_query: bool = False, fp8_dots: bool = False,
) -> DecodePlan:  # fmt: skip
    """Block sizes, splits and warps of ``decode_attention`` over ``kv_length`` keys (the cache capacity when the
    kernel reads the filled length on the device), of which those from ``window_start`` on (None: no window) come from
    the exact window, on ``sm_count`` SMs: integer arithmetic only. With a ``sliding_window`` the splits cover only
    the keys from ``first_key_block`` on. Chunks (more than ``_MAX_BLOCK_M`` query rows a KV head) run in tiles of
    ``block_rows`` rows and aim their splits at ``_CHUNK_PROGRAMS_PER_SM`` programs an SM, over _CHUNK_BLOCK_N keys a
    step unless ``fp32_query`` (shared memory). ``fp8_dots`` (FP8 queries): the head dim and the keys a step (Q @ K^T's
    e4m3 sizes) at least _MIN_FP8_DOT_K. The other keyword overrides are the launcher's."""
    rows = G * Sq
    min_k = _MIN_FP8_DOT_K if fp8_dots else _MIN_DOT_SIZE
    block_d = max(triton.next_power_of_2(D), min_k)
    chunk = rows > _MAX_BLOCK_M
    if block_m is None:
        block_m = block_rows(rows, block_d)
    elif block_m < _MIN_DOT_SIZE or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= {_MIN_DOT_SIZE}, got {block_m!r}")
    row_tiles = triton.cdiv(rows, block_m)
    default_block_n, default_warps = program_shape(B * H * row_tiles, block_m, block_d, sm_count, fp32_query)
    block_n = block_n or default_block_n
    if block_n < min_k:
        raise ValueError(f"block_n must be >= {min_k} with FP8 queries (the dot's inner size), got {block_n}")
    window = window_start is not None and window_start < kv_length
    fp8_end = kv_length if window_start is None else min(window_start, kv_length)  # [first key block, fp8_end): fp8
    fp8_length = max(fp8_end - first_key_block(kv_length, Sq, sliding_window, block_n), 0)
    if fp8_length == 0:
        splits, blocks_per_split = 0, 1
    elif num_splits is None:
        programs_per_sm = _CHUNK_PROGRAMS_PER_SM if chunk else _PROGRAMS_PER_SM
        splits, blocks_per_split = split_plan(B * H * row_tiles, fp8_length, block_n, sm_count, programs_per_sm)
    else:
        blocks = triton.cdiv(fp8_length, block_n)
        blocks_per_split = triton.cdiv(blocks, min(max(num_splits, 1), blocks))
        splits = triton.cdiv(blocks, blocks_per_split)
    # the window runs one program per (b, h): at least four warps, one-warp fp8 programs or not
    window_warps = num_warps or max(default_warps, 4)
    return DecodePlan(
        block_m, block_n, block_d, row_tiles, splits, blocks_per_split, window, num_warps or default_warps, window_warps
    )


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
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    memo: LaunchMemo | None = None,
    new: NewTokens | None = None,
    ring: bool = False,
    quantize_query: bool = False,
) -> torch.Tensor:
    """Attention of ``query`` ``[B, Hq, Sq, D]`` over the first ``kv_length`` tokens -> ``[B, Sq, Hq, D]``: fp8
    tokens, except those of the exact ``recent`` window when given, with an optional ``sliding_window``, learned
    ``sinks`` and logit ``softcap`` (see ``kernels.decode_attention``). With ``new`` (Sq = 1), the query's own K/V
    is quantized into the cache at ``kv_length - 1`` by the same launch (``new_tokens.py``). With ``ring`` the caches
    are a ring of ``capacity`` slots holding the last positions before ``kv_length`` (a device tensor), position p at
    slot ``p % capacity`` (see ``kernels.decode_attention``). With ``quantize_query`` (e4m3fn codes, FP8 tensor cores)
    Q @ K^T runs on e4m3 operands with fp32 accumulation, each query row quantized with its own scale
    (``_e4m3_query``), and P @ V in fp16 as without it.

    The keyword-only knobs override the defaults for tests and tuning sweeps: ``num_splits`` (capped at one
    split per key block), ``block_m`` (query rows a program, a power of two >= 16), ``block_n`` (keys per iteration),
    ``num_warps`` and ``num_stages``. ``memo``: the caller's ``LaunchMemo`` (``launch.py``), which relaunches the
    compiled kernels with less host work and remembers the last checked call: a call of the same form
    (``_call_form``) checks only its lengths; it keeps the partial results from call to call only for decode-sized
    calls (at most ``_MAX_BLOCK_M`` query rows a KV head): a chunk's partials (up to B * H * G * Sq * (splits + 1) *
    D floats) come from torch's allocator, so no layer keeps them.
    """
    arguments = (query, key_cache, value_cache, kv_length, kv_start, key_scale, value_scale, fmt, out, recent,
                 sliding_window, sinks, softcap, new, ring, quantize_query)  # fmt: skip
    if memo is None:
        check_decode_attention(*arguments)
    elif not memo.check_once("decode_attention", *_call_form(*arguments), check_decode_attention, arguments):
        check_decode_lengths(query, key_cache, kv_length, recent)  # a step like the last: only its lengths are new
    B, Hq, Sq, D = query.shape
    H = key_cache.shape[1]
    G = Hq // H
    if out is None:
        out = torch.empty(B, Sq, Hq, D, dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out

    sm_count = _sm_count(query.device.index or 0) if query.is_cuda else _DEFAULT_SM_COUNT
    length_tensor = kv_length if isinstance(kv_length, torch.Tensor) else None
    if length_tensor is not None:  # plan for the whole capacity; the kernel reads the filled length
        kv_length = key_cache.shape[2]
    plan = plan_decode_attention(B, H, G, Sq, D, kv_length, None if recent is None else recent.start, sm_count,
                                 sliding_window=sliding_window, num_splits=num_splits, block_m=block_m,
                                 block_n=block_n, num_warps=num_warps,
                                 fp32_query=query.dtype == torch.float32 and not quantize_query,
                                 fp8_dots=quantize_query)  # fmt: skip
    rows = G * Sq
    if plan.slots > 1:
        scratch = memo if rows <= _MAX_BLOCK_M else None
        part_m, part_l, part_acc = _partials(scratch, (B * H * rows, plan.slots), D, query.device)
        counters = _slot_counters(scratch, B * H * plan.row_tiles, query.device)
    else:
        part_m = part_l = part_acc = counters = out  # unused: the attention kernel writes out directly

    if not plan.window:  # the ring pointers are never read
        recent = RecentWindow(key_cache, value_cache, kv_length)
    scale_stride_h = 0 if key_scale.numel() == 1 else 1
    new_token = new is not None
    if new is None:  # the pointers are never read
        new = NewTokens(query, query, key_scale, value_scale)
        new_strides = (0,) * 6
    else:
        new_strides = (*_strides_without_s(new.keys), *_strides_without_s(new.values))
    arguments = (
        query, key_cache, value_cache, kv_start, key_scale, value_scale,
        kv_start if length_tensor is None else length_tensor,
        recent.keys, recent.values, value_scale if sinks is None else sinks,
        new.keys, new.values, new.key_inv_scale, new.value_inv_scale,
        out, part_acc, part_m, part_l, counters,
        *query.stride(),
        *key_cache.stride()[:2],
        *recent.keys.stride()[:3],
        *new_strides,
        scale_stride_h,
        H, G, Sq, D, kv_length, plan.slots,
    )  # fmt: skip
    dot_dtype = tl.float8e4nv if quantize_query else tl.float32 if query.dtype == torch.float32 else tl.float16
    fp8_meta, window_meta = _launch_meta(plan, fmt, dot_dtype, length_tensor is not None,
                                         sliding_window is not None, softcap is not None, sinks is not None,
                                         new_token, key_scale.dim() == 3, _paired_scales(key_scale, value_scale), ring,
                                         num_stages)  # fmt: skip
    # with a softcap the logit scale carries the tanh's 2 / softcap, and softcap * log2(e) rescales (_softcapped)
    logit_scale = sm_scale * _LOG2E if softcap is None else sm_scale * 2 * _LOG2E / softcap
    window_args = (logit_scale, recent.keys.shape[2], recent.start, sliding_window or 0, (softcap or 0.0) * _LOG2E,
                   key_cache.shape[2])  # fmt: skip
    if plan.splits:  # slots 0 .. splits - 1
        launch(
            _decode_attention_kernel,
            (B * H, plan.splits, plan.row_tiles),
            (*arguments, 0, plan.blocks_per_split, *window_args),
            fp8_meta,
            memo,
            "fp8",
        )
    if plan.window:  # the last slot; its own specialization keeps the fp8 loop's code as fast as without a window
        launch(
            _decode_attention_kernel,
            (B * H, 1, plan.row_tiles),
            (*arguments, plan.splits, 1, *window_args),
            window_meta,
            memo,
            "window",
        )
    return out
