"""FP8 decode attention: the Triton kernel (interpreter here, compiled on the GPU machine) and its torch twin against
an independent fp64 oracle written here from the decoded cache values, plus argument checks.

Errors are relative Frobenius norms ||out - oracle|| / ||oracle||. The kernel multiplies in fp16 for fp16 / bf16
queries (probabilities rounded to fp16 before P @ V) and rounds the output to the query dtype, so those errors sit
near the fp16 / bf16 rounding unit; fp32 queries run an fp32 dot.
"""

import math
from contextlib import nullcontext

import pytest
import torch
from hf_fp8cache.kernels import attention, ops, reference
from hf_fp8cache.kernels.attention import (
    DecodePlan,
    first_key_block,
    plan_decode_attention,
    program_shape,
    split_plan,
)
from hf_fp8cache.kernels.launch import LaunchMemo

from hf_fp8cache import kernels
from hf_fp8cache.formats import FORMATS, INT8

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow / inf notes inside the interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FMTS = [FORMATS["e4m3fn"], FORMATS["e5m2"]]
# bf16 queries are rounded to fp16 before any tl.dot, so the interpreter's broken bf16 dot is never involved.
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# Bounds a few times above the worst relative error measured over this file (triton 3.9 interpreter, CPU):
# kernel fp16 2.5e-4, bf16 1.7e-3 (the output rounding to bf16 dominates), fp32 6.3e-7;
# torch reference (fp32 math, output rounded to the query dtype) fp16 2.7e-4, bf16 2.0e-3, fp32 3.6e-7.
TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 6e-3, torch.float32: 3e-6}
NAN_CODE = 0x7F  # a NaN in e4m3fn and in e5m2: stored where the kernel must not look (left padding, spare capacity)


def _case(B, H, G, Sq, D, L, kv_start, *, fmt=FMTS[0], dtype=torch.float16, per_head=True, seed=0, spare=5):
    """Random queries (a transposed view, as transformers passes them) and fp8 caches with poisoned padding."""
    g = torch.Generator().manual_seed(seed)
    capacity = L + spare
    key_scale = torch.rand(H if per_head else 1, generator=g) * 0.05 + 0.01
    value_scale = torch.rand(H if per_head else 1, generator=g) * 0.5 + 0.05
    caches = []
    for _ in "kv":
        x = (torch.randn(B, H, capacity, D, generator=g) * 40).clamp(-fmt.max, fmt.max)
        code = x.to(fmt.dtype).view(torch.uint8)
        code[:, :, L:] = NAN_CODE
        for b, start in enumerate(kv_start):
            code[b, :, : min(start, L)] = NAN_CODE
        caches.append(code.to(DEVICE))
    query = (torch.randn(B, Sq, H * G, D, generator=g) * 3).to(dtype).to(DEVICE).transpose(1, 2)
    start = torch.tensor(kv_start, dtype=torch.int32, device=DEVICE)
    return query, caches[0], caches[1], L, start, key_scale.to(DEVICE), value_scale.to(DEVICE), fmt, D**-0.5


def _with_window(args, slots, window, seed=0):
    """Add a RecentWindow of ``slots`` ring slots whose last ``window`` positions are exact; other slots hold NaN."""
    query, L = args[0], args[3]
    B, H, D = args[1].shape[0], args[1].shape[1], args[1].shape[3]
    g = torch.Generator().manual_seed(seed)
    rings = []
    for scale in (args[5], args[6]):  # exact values of the size the scales imply
        ring = torch.full((B, H, slots, D), float("nan"))
        size = scale.cpu().float()[:, :, L - window : L, None] if scale.dim() == 3 else scale.cpu().reshape(1, -1, 1, 1)
        exact = torch.randn(B, H, window, D, generator=g) * 40 * size
        for j, p in enumerate(range(L - window, L)):
            ring[:, :, p % slots] = exact[:, :, j]
        rings.append(ring.to(query.dtype).to(DEVICE))
    return (*args, None, kernels.RecentWindow(rings[0], rings[1], L - window))


def _oracle(query, key_cache, value_cache, L, kv_start, key_scale, value_scale, fmt, sm_scale, out=None, recent=None,
            *, sliding_window=None, sinks=None, softcap=None):  # fmt: skip
    """fp64 attention written out row by row from the decoded fp8 values (and the exact window): [B, Sq, Hq, D].
    A sliding window W: row i sees only keys above its position minus W; softcap: logits c * tanh(logits / c);
    sinks: one more logit per query head in the softmax sum, with no value."""
    B, Hq, Sq, D = query.shape
    H = key_cache.shape[1]
    key = key_cache.cpu().view(fmt.dtype).double() * _oracle_scale(key_scale)
    value = value_cache.cpu().view(fmt.dtype).double() * _oracle_scale(value_scale)
    if recent is not None:
        for p in range(recent.start, L):
            slot = p % recent.keys.shape[2]
            key[:, :, p] = recent.keys[:, :, slot].cpu().double()
            value[:, :, p] = recent.values[:, :, slot].cpu().double()
    q = query.cpu().double()
    out = torch.zeros(B, Sq, Hq, D, dtype=torch.float64)
    for b in range(B):
        for i in range(Sq):
            first, last = int(kv_start[b]), L - Sq + i  # keys first..last inclusive
            if sliding_window is not None:
                first = max(first, last - sliding_window + 1)
            if first > last:
                continue  # sees nothing: zeros
            k, v = key[b, :, first : last + 1], value[b, :, first : last + 1]  # [H, n, D]
            logits = torch.einsum("hgd,hnd->hgn", q[b, :, i].reshape(H, Hq // H, D), k) * sm_scale
            if softcap is not None:
                logits = softcap * torch.tanh(logits / softcap)
            weights = logits.exp()  # logits are small here: no max subtraction needed in fp64
            total = weights.sum(-1, keepdim=True)
            if sinks is not None:
                total = total + sinks.cpu().double().reshape(H, Hq // H, 1).exp()
            out[b, i] = torch.einsum("hgn,hnd->hgd", weights / total, v).reshape(Hq, D)
    return out


def _oracle_scale(scale):
    """A scale as a factor of the decoded [B, H, capacity, D] codes: per tensor / head, or per token and head."""
    scale = scale.cpu().double()
    return scale[..., None] if scale.dim() == 3 else scale.reshape(1, -1, 1, 1)


def _relative_error(out, expected):
    assert out.shape == expected.shape
    assert torch.isfinite(out).all()
    return ((out.cpu().double() - expected).norm() / expected.norm()).item()


def _check_kernel(args, **launch):
    out = attention.decode_attention(*args, **launch)
    query = args[0]
    assert out.dtype == query.dtype and out.is_contiguous()
    error = _relative_error(out, _oracle(*args))
    assert error < TOLERANCE[query.dtype], error
    return out


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_head", [False, True], ids=["tensor", "attn_head"])
def test_matches_oracle(fmt, dtype, per_head):
    _check_kernel(_case(2, 2, 4, 3, 80, 130, [0, 37], fmt=fmt, dtype=dtype, per_head=per_head, seed=1))


@pytest.mark.parametrize("D", [64, 80, 128, 256])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("Sq", [1, 3])
def test_head_dims_and_groups(D, G, Sq):
    fmt = FMTS[(D + G) % 2]
    _check_kernel(_case(2, 2, G, Sq, D, 70, [0, 9], fmt=fmt, seed=D * G + Sq))


# Sq <= L: the queries' own tokens are part of the cache
@pytest.mark.parametrize("L, Sq", [(1, 1), (7, 1), (7, 3), (128, 1), (128, 3), (4097, 1), (4097, 3)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_lengths(L, Sq, dtype):
    if L > 1000:
        B, H, D, kv_start = 2, 1, 128, [0, 1000]  # keep the interpreter quick
    else:
        B, H, D, kv_start = 3, 2, 64, [0, L // 2, L - 1]
    _check_kernel(_case(B, H, 4, Sq, D, L, kv_start, dtype=dtype, seed=L + Sq))


# 3 batch rows x 6 KV heads = 18 programs before splitting: enough for one-warp programs over 32-key blocks on
# 132 SMs (program_shape), with left padding, causal rows (Sq = 3) and an exact window or the device-held length.
@pytest.mark.parametrize("Sq", [1, 3])
@pytest.mark.parametrize("variant", ["int_length", "window", "device_length"])
def test_one_warp_program_shape(Sq, variant):
    plan = plan_decode_attention(3, 6, 4, Sq, 64, 150, 130 if variant == "window" else None, 132)
    assert (plan.block_m, plan.block_n, plan.num_warps) == (16, 32, 1)
    args = _case(3, 6, 4, Sq, 64, 150, [0, 70, 149], seed=11 + Sq)
    if variant == "window":
        args = _with_window(args, 32, 20, seed=Sq)
    expected = _oracle(*args)
    if variant == "device_length":
        args = (*args[:3], torch.tensor(150, device=DEVICE), *args[4:])
    assert _relative_error(attention.decode_attention(*args), expected) < TOLERANCE[args[0].dtype]


def test_large_group_spans_several_row_tiles():
    # G * Sq = 16 * 5 = 80 query rows per KV head: two row tiles of 64
    _check_kernel(_case(1, 2, 16, 5, 64, 90, [3], fmt=FMTS[1], dtype=torch.float32, seed=5))


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 1000])
def test_forced_split_counts_agree(num_splits):
    # 300 keys are 5 blocks of 64: 3 splits of 2 + 2 + 1 blocks, 7 and 1000 are capped at 5
    args = _case(2, 2, 4, 3, 64, 300, [0, 130], dtype=torch.float32, seed=7)
    out = _check_kernel(args, num_splits=num_splits)
    single = attention.decode_attention(*args, num_splits=1)
    # only the fp32 summation order differs: interpreter below 1e-6 abs; H200 (fp32 dot) up to ~4e-6 abs on
    # outputs of magnitude ~15, i.e. ~3e-7 relative
    assert ((out - single).abs().max() / single.abs().max()).item() < 2e-6


def test_rows_that_see_nothing_are_zero_not_nan():
    # row 1 starts at the last position: its first two queries see no key; row 2 starts past the end
    args = _case(3, 2, 4, 3, 64, 20, [0, 19, 25], seed=3)
    for num_splits in (1, 4):
        out = _check_kernel(args, num_splits=num_splits)
        assert (out[1, :2] == 0).all() and (out[2] == 0).all()
        assert (out[1, 2] != 0).any()


# The static cache's form: the filled length as a device tensor, the capacity far larger (its bytes poisoned), and
# the splits planned for the capacity, so most of them find no filled block (16 splits for 1000 slots; 70 tokens
# fill 2 blocks).
@pytest.mark.parametrize("L, Sq", [(1, 1), (70, 3), (300, 1), (1000, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_length_read_on_the_device(L, Sq, dtype):
    args = list(_case(2, 2, 4, Sq, 64, L, [0, L // 3], dtype=dtype, seed=L, spare=1000 - L))
    expected = _oracle(*args)
    args[3] = torch.tensor(L, device=DEVICE)
    for run in (attention.decode_attention, kernels.decode_attention):
        assert _relative_error(run(*args), expected) < TOLERANCE[dtype]
    as_operator = ops.decode_attention(*args[:7], args[7].name, args[8])  # what the static cache calls
    assert _relative_error(as_operator, expected) < TOLERANCE[dtype]
    with kernels.cpu_backend("torch"):  # the torch twin takes the tensor too
        assert _relative_error(kernels.decode_attention(*args), expected) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("float", r"a kv_length tensor must be one int32/int64 element, got torch.float32 \(\)"),
        ("two_elements", r"a kv_length tensor must be one int32/int64 element, got torch.int64 \(2,\)"),
        ("with_window", "an exact recent window needs a Python int kv_length"),
        ("query_past_capacity", "need 1 <= query length 2 <= cache capacity 1$"),
    ],
)
def test_rejects_bad_device_lengths(bad, message):
    args = list(_case(2, 2, 4, 2, 64, 10, [0, 1]))
    extra = {}
    args[3] = torch.tensor(10, device=DEVICE)
    if bad == "float":
        args[3] = args[3].float()
    elif bad == "two_elements":
        args[3] = torch.tensor([10, 10], device=DEVICE)
    elif bad == "with_window":
        ring = torch.zeros(2, 2, 4, 64, dtype=args[0].dtype, device=DEVICE)
        extra["recent"] = kernels.RecentWindow(ring, ring, 8)
    else:
        args[1], args[2] = args[1][:, :, :1].contiguous(), args[2][:, :, :1].contiguous()
    with pytest.raises(ValueError, match=message):
        kernels.decode_attention(*args, **extra)


# (slots, window): a full ring, a part-filled one, a window that wraps around the ring, one longer than a key block,
# and an empty window; lengths put the window inside one split or across the split boundary
@pytest.mark.parametrize("slots, window", [(8, 8), (16, 5), (6, 6), (96, 80), (4, 0)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_exact_recent_window_matches_oracle(slots, window, dtype, num_splits):
    args = _with_window(_case(3, 2, 4, 3, 64, 200, [0, 150, 197], dtype=dtype, seed=slots), slots, window, seed=window)
    out = _check_kernel(args, num_splits=num_splits)
    fp8_only = _oracle(*args[:9])
    if window:  # the window changed the answer (rows that see a window position)
        assert _relative_error(out, fp8_only) > 10 * TOLERANCE[dtype]
    reference_out = reference.decode_attention_ref(*args)
    assert _relative_error(reference_out, _oracle(*args)) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_window_holding_every_token_needs_no_fp8(dtype):
    # 7 tokens, all in an 8-slot window: only the window program runs and writes out directly; fp8 bytes are NaN
    args = _with_window(_case(2, 2, 4, 3, 64, 7, [0, 3], dtype=dtype, seed=11), 8, 7, seed=2)
    args[1].fill_(NAN_CODE), args[2].fill_(NAN_CODE)
    _check_kernel(args)


def test_writes_into_out():
    args = _case(2, 2, 4, 1, 64, 40, [0, 5], seed=4)
    out = torch.full((2, 1, 8, 64), float("nan"), dtype=torch.float16, device=DEVICE)
    assert attention.decode_attention(*args, out=out) is out
    assert _relative_error(out, _oracle(*args)) < TOLERANCE[torch.float16]


def _sinks(Hq, seed):
    """One learned sink logit per query head, of the size of the test's logits (a few units)."""
    return (torch.randn(Hq, generator=torch.Generator().manual_seed(seed)) * 2).to(DEVICE)


# The model-family options on L = 200 keys, rows starting at 0, 150 and 197 (left padding), 3 queries a row: a
# sliding window below, equal to and above L (and of one key), learned sinks, a softcap, all three together; formats,
# dtypes and scale kinds rotate over the cases.
OPTIONS = {
    "window_37": dict(sliding_window=37),
    "window_equals_L": dict(sliding_window=200),
    "window_above_L": dict(sliding_window=500),
    "window_1": dict(sliding_window=1),
    "sinks": dict(sinks=8),
    "softcap": dict(softcap=2.0),
    "window_sinks_softcap": dict(sliding_window=70, sinks=8, softcap=3.0),
}


# the planned splits for every case; forced splits (partials merged by the last program of a tile) where they matter
# most
OPTION_RUNS = [(name, None) for name in OPTIONS] + [("window_37", 3), ("window_sinks_softcap", 3)]


@pytest.mark.parametrize("name, num_splits", OPTION_RUNS)
def test_window_sinks_and_softcap_match_oracle_and_twin(name, num_splits):
    index = list(OPTIONS).index(name)
    dtype = DTYPES[index % 3]
    args = _case(3, 2, 4, 3, 64, 200, [0, 150, 197], fmt=FMTS[index % 2], dtype=dtype, per_head=index % 2 == 0,
                 seed=20 + index)  # fmt: skip
    options = dict(OPTIONS[name])
    if "sinks" in options:
        options["sinks"] = _sinks(options["sinks"], seed=index)
    out = attention.decode_attention(*args, num_splits=num_splits, **options)
    expected = _oracle(*args, **options)
    assert _relative_error(out, expected) < TOLERANCE[dtype]
    assert _relative_error(reference.decode_attention_ref(*args, **options), expected) < TOLERANCE[dtype]
    if options.get("sliding_window", 0) < 200:  # the option changed the answer (a window >= L changes nothing)
        assert _relative_error(out, _oracle(*args)) > 10 * TOLERANCE[dtype]


def _as_ring(args, slots):
    """The one-query case ``args`` (caches of exactly L tokens) with its caches moved into a ring of ``slots`` slots,
    as the static sliding layer stores them: position p at slot p % slots for the last min(L, slots) positions,
    never-written slots poisoned; the length as a device tensor."""
    query, key_cache, value_cache, L, kv_start, key_scale, value_scale = args[:7]
    per_token = key_scale.dim() == 3  # per-token-head scales sit beside their codes: into the ring too
    rings = []
    for tensor in (key_cache, value_cache, *((key_scale, value_scale) if per_token else ())):
        poison = NAN_CODE if tensor.dtype == torch.uint8 else float("nan")
        ring = torch.full((*tensor.shape[:2], slots, *tensor.shape[3:]), poison, dtype=tensor.dtype, device=DEVICE)
        for p in range(max(L - slots, 0), L):
            ring[:, :, p % slots] = tensor[:, :, p]
        rings.append(ring)
    scales = rings[2:] if per_token else [key_scale, value_scale]
    return (query, *rings[:2], torch.tensor(L, device=DEVICE), kv_start, *scales, *args[7:])


# A ring before its first wrap, after one and after several; padding before the ring's oldest position, and inside
# it (row 1 of the second case starts at 270 of 300 with 64 slots); the window equal to the ring (the static sliding
# layer's usual case: the ring is min(window, max_cache_len)) or above it before the wrap; a ring that ends inside
# a key block (48 slots).
@pytest.mark.parametrize(
    "L, slots, kv_start, window",
    [
        (50, 64, [0, 20], 64),
        (50, 64, [3, 0], 100),
        (300, 64, [0, 270], 64),
        (300, 48, [0, 270], 48),
        (1000, 128, [0, 3], 128),
    ],
)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_ring_of_slots_matches_the_same_positions_in_order(L, slots, kv_start, window, num_splits):
    dtype = torch.float16 if num_splits != 1 else torch.float32
    args = _case(2, 2, 4, 1, 64, L, kv_start, dtype=dtype, seed=L + slots, spare=0)
    expected = _oracle(*args, sliding_window=window)
    ring = _as_ring(args, slots)
    out = attention.decode_attention(*ring, sliding_window=window, num_splits=num_splits, ring=True)
    assert _relative_error(out, expected) < TOLERANCE[dtype]
    assert _relative_error(reference.decode_attention_ref(*ring, sliding_window=window, ring=True),
                           expected) < TOLERANCE[dtype]  # fmt: skip
    operator = ops.decode_attention(*ring[:7], ring[7].name, ring[8], sliding_window=window, ring=True)
    assert _relative_error(operator, expected) < TOLERANCE[dtype]
    # (The slot-to-position map is what row 1's padding inside the ring checks: a softmax over the whole ring does
    # not depend on the slots' order. A ring is never read as a plain cache: its device length passes its capacity.)


def test_ring_with_sinks_and_softcap():
    args = _case(2, 2, 4, 1, 64, 200, [0, 150], dtype=torch.bfloat16, seed=7, spare=0)
    options = dict(sliding_window=48, sinks=_sinks(8, seed=5), softcap=3.0)
    out = attention.decode_attention(*_as_ring(args, 48), ring=True, **options)
    assert _relative_error(out, _oracle(*args, **options)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize(
    "change, message",
    [
        ("int_length", "a ring is read for one query token with a device kv_length"),
        ("two_queries", "got 2 query tokens"),
        ("narrow_window", "a ring of 64 slots needs a sliding window of at least 64, got 63"),
        ("no_window", "a ring of 64 slots needs a sliding window of at least 64, got None"),
    ],
)
def test_rejects_a_ring_it_cannot_read(change, message):
    args = list(_as_ring(_case(2, 2, 4, 1, 64, 100, [0, 1], spare=0), 64))
    window = dict(narrow_window=63, no_window=None).get(change, 64)
    if change == "int_length":
        args[3] = 100
    if change == "two_queries":
        args[0] = torch.cat([args[0], args[0]], dim=2)
    with pytest.raises(ValueError, match=message):
        kernels.decode_attention(*args, sliding_window=window, ring=True)


@pytest.mark.parametrize("Sq, window", [(1, 40), (4, 40), (4, 1)])
def test_sliding_window_reads_no_block_below_the_window(Sq, window):
    # every key below the first block holding the first row's window start is NaN: reading one would give NaN
    args = _case(2, 2, 4, Sq, 64, 300, [0, 280], fmt=FMTS[1], dtype=torch.float32, seed=window + Sq)
    plan = plan_decode_attention(2, 2, 4, Sq, 64, 300, None, 132, sliding_window=window)
    below = first_key_block(300, Sq, window, plan.block_n)
    assert below >= 300 - Sq - window - plan.block_n + 1 and below > 0
    for cache in args[1:3]:
        cache[:, :, :below] = NAN_CODE
    expected = _oracle(*args, sliding_window=window)  # (which never reads below the window either)
    assert _relative_error(attention.decode_attention(*args, sliding_window=window), expected) < 3e-6
    with kernels.cpu_backend("torch") if DEVICE == "cpu" else nullcontext():  # the twin leaves them out too
        assert _relative_error(kernels.decode_attention(*args, sliding_window=window), expected) < 3e-6


def test_options_with_the_length_on_the_device_and_the_operator():
    # the static cache's form: the filled length read on the device, splits planned over the window of the capacity
    args = list(_case(2, 2, 4, 2, 64, 150, [0, 40], dtype=torch.float32, seed=31, spare=350))
    options = dict(sliding_window=60, sinks=_sinks(8, seed=3), softcap=4.0)
    expected = _oracle(*args, **options)
    args[3] = torch.tensor(150, device=DEVICE)
    assert _relative_error(kernels.decode_attention(*args, **options), expected) < TOLERANCE[torch.float32]
    as_operator = ops.decode_attention(*args[:7], args[7].name, args[8], **options)
    assert _relative_error(as_operator, expected) < TOLERANCE[torch.float32]


def test_sliding_window_with_an_exact_recent_window():
    args = _with_window(_case(2, 2, 4, 3, 64, 200, [0, 150], dtype=torch.float32, seed=5), 16, 12, seed=4)
    for window in (5, 30):  # inside the exact window, and across its start
        expected = _oracle(*args, sliding_window=window)
        out = attention.decode_attention(*args, sliding_window=window, num_splits=2)
        assert _relative_error(out, expected) < TOLERANCE[torch.float32]
        assert _relative_error(reference.decode_attention_ref(*args, sliding_window=window),
                               _oracle(*args, sliding_window=window)) < TOLERANCE[torch.float32]  # fmt: skip


def test_slot_counters_return_to_zero_so_a_memo_relaunch_merges_again():
    # the program completing a tile's slots merges them and resets its counter: with the memo's counters kept from
    # call to call, the second launch (splits and an exact window, 48 query rows in two tiles of 32) merges exactly
    # as the first; counters left non-zero would make no program (or the wrong one) merge
    args = _with_window(_case(2, 2, 24, 2, 64, 200, [0, 150], dtype=torch.float32, seed=9), 16, 12, seed=2)
    memo = LaunchMemo()
    expected = _oracle(*args)
    plan = plan_decode_attention(2, 2, 24, 2, 64, 200, args[10].start, 132, num_splits=3, block_m=32)
    assert plan.slots == 4 and plan.row_tiles == 2
    counters = memo.scratch("slot_counters", (2 * 2 * plan.row_tiles,), torch.int32, torch.device(DEVICE), zeroed=True)
    for _ in range(2):
        out = attention.decode_attention(*args, num_splits=3, block_m=32, memo=memo)
        assert _relative_error(out, expected) < TOLERANCE[torch.float32]
        assert counters.tolist() == [0] * counters.numel()


def test_a_chunk_keeps_no_partials_in_the_memo():
    # 24 x 3 = 72 query rows: a chunk tile; its partials come from torch's allocator, the layer's memo keeps none.
    # Slots: 3 splits of the fp8 keys (64 a step for fp32 queries) and the window's.
    args = _with_window(_case(2, 2, 24, 3, 64, 200, [0, 150], dtype=torch.float32, seed=9), 16, 12, seed=2)
    memo = LaunchMemo()
    _check_kernel(args, num_splits=3, memo=memo)
    assert plan_decode_attention(2, 2, 24, 3, 64, 200, args[10].start, 132, num_splits=3, fp32_query=True).slots == 4
    assert memo._scratch == {}


def test_sliding_window_plans_over_the_window_only():
    # 8 x 32768 with a 4096-token window is planned as 8 x 4096 without one (plus one block where the window starts
    # inside one): the work follows the window
    full = plan_decode_attention(8, 8, 4, 1, 128, 4096, None, 132)
    windowed = plan_decode_attention(8, 8, 4, 1, 128, 32768, None, 132, sliding_window=4096)
    assert windowed == full and first_key_block(32768, 1, 4096, windowed.block_n) == 32768 - 4096
    shifted = plan_decode_attention(8, 8, 4, 1, 128, 32768 + 5, None, 132, sliding_window=4096)
    assert shifted.splits * shifted.blocks_per_split >= 4096 // shifted.block_n + 1
    # a window beyond the length changes nothing
    assert plan_decode_attention(2, 2, 4, 3, 64, 300, None, 132, sliding_window=1000) == plan_decode_attention(
        2, 2, 4, 3, 64, 300, None, 132
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sliding_window=0), "sliding_window must be an int >= 1 or None, got 0"),
        (dict(sliding_window=4.0), "sliding_window must be an int >= 1 or None, got 4.0"),
        (dict(sinks=torch.zeros(8, dtype=torch.float16)), r"sinks must be contiguous float32 of shape \(8,\), got "
                                                          "torch.float16"),
        (dict(sinks=torch.zeros(2)), r"sinks must be contiguous float32 of shape \(8,\), got torch.float32 \(2,\)"),
        (dict(softcap=0.0), "softcap must be a finite number > 0 or None, got 0.0"),
    ],
)  # fmt: skip
def test_rejects_bad_options(options, message):
    args = _case(2, 2, 4, 2, 64, 10, [0, 1])
    options = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    for backend in ("triton", "torch"):
        with (
            pytest.raises(ValueError, match=message),
            kernels.cpu_backend(backend) if DEVICE == "cpu" else nullcontext(),
        ):
            kernels.decode_attention(*args, **options)
    memo = kernels.LaunchMemo()  # after a good call with sinks, with a launch memo
    attention.decode_attention(*args, sinks=torch.zeros(8, device=DEVICE), memo=memo)
    with pytest.raises(ValueError, match=message):
        attention.decode_attention(*args, **{"sinks": torch.zeros(8, device=DEVICE), **options}, memo=memo)


@pytest.mark.gpu
@pytest.mark.parametrize("Sq", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_window_sinks_softcap_on_gpu_match_the_twin(Sq, dtype):
    """The compiled kernel (one-warp programs, real splits) with every option against its torch twin on CUDA."""
    args = _case(4, 8, 4, Sq, 128, 5000, [0, 700, 4000, 4990], dtype=dtype, seed=Sq)
    for options in (dict(sliding_window=1024), dict(sinks=_sinks(32, seed=1), softcap=30.0),
                    dict(sliding_window=300, sinks=_sinks(32, seed=2), softcap=5.0)):  # fmt: skip
        oracle = _oracle(*args, **options)
        assert _relative_error(reference.decode_attention_ref(*args, **options), oracle) < TOLERANCE[dtype]
        assert _relative_error(attention.decode_attention(*args, **options), oracle) < TOLERANCE[dtype]
        device_length = (*args[:3], torch.tensor(5000, device=DEVICE), *args[4:])
        assert _relative_error(kernels.decode_attention(*device_length, **options), oracle) < TOLERANCE[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("slots", [1024, 1000])
def test_ring_on_gpu_matches_the_same_positions_in_order(slots):
    """The compiled kernel over a wrapped ring (one-warp programs, real splits; a ring ending inside a key block)."""
    args = _case(4, 8, 4, 1, 128, 5000, [0, 700, 4500, 4990], dtype=torch.bfloat16, seed=slots, spare=0)
    options = dict(sliding_window=slots, sinks=_sinks(32, seed=3))
    out = kernels.decode_attention(*_as_ring(args, slots), ring=True, **options)
    assert _relative_error(out, _oracle(*args, **options)) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_matches_oracle(fmt, dtype):
    for shape in [(2, 2, 4, 3, 80, 130, [0, 37]), (3, 1, 8, 1, 64, 7, [0, 6, 9]), (1, 2, 1, 3, 256, 64, [2])]:
        args = _case(*shape, fmt=fmt, dtype=dtype, seed=len(shape[-1]))
        out = reference.decode_attention_ref(*args)
        assert out.dtype == dtype and out.shape == (shape[0], shape[3], shape[1] * shape[2], shape[4])
        error = _relative_error(out, _oracle(*args))
        assert error < TOLERANCE[dtype], error


def test_dispatch_picks_the_kernel_and_the_reference():
    args = _case(2, 2, 4, 3, 64, 50, [0, 11], dtype=torch.float32, seed=8)
    expected = _oracle(*args)
    assert _relative_error(kernels.decode_attention(*args), expected) < TOLERANCE[torch.float32]
    with kernels.cpu_backend("torch"):
        if DEVICE == "cpu":
            assert not kernels.uses_triton(args[0])
        assert _relative_error(kernels.decode_attention(*args), expected) < TOLERANCE[torch.float32]


def test_split_plan_covers_every_block_without_empty_splits():
    for programs in (1, 3, 8, 16, 64, 264, 1000, 1056, 5000):
        for length in (1, 63, 64, 65, 4097, 32768, 131072):
            splits, per_split = split_plan(programs, length, 64, 132)
            blocks = math.ceil(length / 64)
            assert 1 <= splits <= min(blocks, 32) and (splits - 1) * per_split < blocks <= splits * per_split
            if programs >= 8 * 132:  # already 8 programs an SM
                assert splits == 1
            if splits > 1:  # never beyond one wave of 8 programs an SM
                assert programs * splits <= 8 * 132
    assert split_plan(8, 32768, 64, 132) == (32, 16)  # B * H = 8 at 32K tokens: capped at 32 splits of 16 blocks
    assert split_plan(64, 32768, 32, 132) == (16, 64)  # 8 x 32768: 1024 programs, one wave of 8 an SM
    assert split_plan(256, 8192, 32, 132) == (4, 64)  # 32 x 8192


def test_program_shape_picks_one_warp_programs_only_with_enough_work():
    assert program_shape(64, 16, 128, 132) == (32, 1)  # 8 x 8 KV heads, 4 query rows: 64 * 32 splits >= 4 / SM
    assert program_shape(17, 16, 128, 132) == (32, 1)  # 17 * 32 = 544 >= 528
    assert program_shape(16, 16, 128, 132) == (64, 4)  # 16 * 32 = 512 < 528: four warps
    assert program_shape(8, 16, 128, 132) == (64, 4)  # one batch row of 8 KV heads
    assert program_shape(64, 16, 64, 132) == (32, 1)  # D = 64 fits the one-warp tile too
    assert program_shape(64, 32, 128, 132) == (64, 4)  # 32 query rows: beyond the one-warp tile
    assert program_shape(64, 16, 256, 132) == (32, 4)  # D = 256: half the keys a step
    assert program_shape(64, 64, 256, 132) == (32, 8)


# (B, H, G, Sq, D, kv_length), the exact window's start, the launcher's overrides -> the plan and its slot count
@pytest.mark.parametrize(
    "shape, window_start, overrides, expected, slots",
    [
        # 8 x 32768 on the H200 (8 KV heads, 4 query heads each): one-warp programs, one wave of 16 splits
        ((8, 8, 4, 1, 128, 32768), None, {}, DecodePlan(16, 32, 128, 1, 16, 64, False, 1, 4), 16),
        # 1 x 32768: too few programs for one warp; capped at 32 splits
        ((1, 8, 4, 1, 128, 32768), None, {}, DecodePlan(16, 64, 128, 1, 32, 16, False, 4, 4), 32),
        # D = 256: half the keys a step
        ((4, 8, 4, 1, 256, 4096), None, {}, DecodePlan(16, 32, 256, 1, 32, 4, False, 4, 4), 32),
        # 16 x 5 = 80 query rows: a chunk, one tile of 128 (128 x 64 elements: four warps) over 128 keys a step,
        # splits aimed at 2 programs an SM (capped by the one key block)
        ((1, 2, 16, 5, 64, 90), None, {}, DecodePlan(128, 128, 64, 1, 1, 1, False, 4, 4), 1),
        # 8 x 32768 + 17 new tokens (68 query rows): one 128-row tile of eight warps, 4 splits (256 programs)
        ((8, 8, 4, 17, 128, 32785), None, {}, DecodePlan(128, 128, 128, 1, 4, 65, False, 8, 8), 4),
        # 8 x 32768 + 2048 new tokens: 64 tiles a KV head (4096 programs), one split each
        ((8, 8, 4, 2048, 128, 34816), None, {}, DecodePlan(128, 128, 128, 64, 1, 272, False, 8, 8), 1),
        # fp32 queries: the chunk tile keeps 64 keys a step (128 would need 256 KiB of shared memory at D = 128)
        ((8, 8, 4, 17, 128, 32785), None, {"fp32_query": True}, DecodePlan(128, 64, 128, 1, 4, 129, False, 8, 8), 4),
        # D = 256: chunk tiles stay at 64 rows (64 x 256 elements)
        ((8, 8, 4, 64, 256, 4160), None, {}, DecodePlan(64, 32, 256, 4, 1, 130, False, 8, 8), 1),
        # an exact window from 150: the fp8 splits cover [0, 150), the window takes the last slot
        ((3, 2, 4, 3, 64, 200), 150, {}, DecodePlan(16, 64, 64, 1, 3, 1, True, 4, 4), 4),
        # a window holding every position: no fp8 split, the window program writes out itself
        ((2, 2, 4, 3, 64, 7), 0, {}, DecodePlan(16, 64, 64, 1, 0, 1, True, 4, 4), 1),
        # forced: 3 splits of 5 blocks are 2 + 2 + 1; 32-key blocks and two warps for both launches
        ((2, 2, 4, 3, 64, 300), None, {"num_splits": 3}, DecodePlan(16, 64, 64, 1, 3, 2, False, 4, 4), 3),
        ((2, 2, 4, 3, 64, 300), 290, {"block_n": 32, "num_warps": 2}, DecodePlan(16, 32, 64, 1, 10, 1, True, 2, 2), 11),
    ],
)  # fmt: skip
def test_decode_plan(shape, window_start, overrides, expected, slots):
    plan = plan_decode_attention(*shape, window_start, 132, **overrides)
    assert plan == expected and plan.slots == slots


@pytest.mark.parametrize("name", ["e4m3fnuz", "e5m2fnuz"])
def test_fnuz_formats_are_rejected(name):
    args = list(_case(1, 1, 1, 1, 64, 4, [0]))
    args[7] = FORMATS[name]
    with pytest.raises(ValueError, match=name):
        attention.decode_attention(*args)
    with pytest.raises(ValueError, match=name):
        kernels.decode_attention(*args)
    with pytest.raises(ValueError, match=name), kernels.cpu_backend("torch"):
        kernels.decode_attention(*args)


def _bad(change, good=None):
    """The arguments of a good call (``good``, or new ones) with ``change`` made, and the keywords it adds."""
    args = list(good or _case(2, 2, 4, 2, 64, 10, [0, 1]))
    B, Hq, Sq, D = args[0].shape
    if change == "group":
        args[0] = args[0][:, :7]
    elif change == "head_dim":
        args[0] = args[0][..., :32]
    elif change == "batch":
        args[0] = args[0][:1]
    elif change == "query_rank":
        args[0] = args[0][0]
    elif change == "query_dtype":
        args[0] = args[0].to(torch.float64)
    elif change == "too_many_queries":
        args[3] = 1
    elif change == "past_capacity":
        args[3] = args[1].shape[2] + 1
    elif change == "kv_start_dtype":
        args[4] = args[4].long()
    elif change == "kv_start_shape":
        args[4] = args[4][:1]
    elif change == "scale_count":
        args[5] = torch.ones(3, device=DEVICE)
    elif change == "scale_dtype":
        args[6] = args[6].double()
    elif change == "cache_dtype":
        args[1] = args[1].view(FMTS[0].dtype)
    elif change == "cache_layout":
        args[2] = args[2].transpose(2, 3).contiguous().transpose(2, 3)
    elif change == "cache_shapes_differ":
        args[2] = args[2][:, :, :-1].contiguous()
    elif change == "head_dim_over_256":
        cache = torch.zeros(2, 2, 12, 512, dtype=torch.uint8, device=DEVICE)
        args[0], args[1], args[2] = torch.zeros(B, Hq, Sq, 512, device=DEVICE), cache, cache.clone()
    elif change == "out_shape":
        return args, {"out": torch.empty(B, Hq, Sq, D, dtype=args[0].dtype, device=DEVICE)}
    elif change == "out_dtype":
        return args, {"out": torch.empty(B, Sq, Hq, D, dtype=torch.float32, device=DEVICE)}
    elif change.startswith("window"):
        ring = torch.zeros(B, 2, 4, D, dtype=args[0].dtype, device=DEVICE)
        recent = {
            "window_too_long": kernels.RecentWindow(ring, ring, 5),  # 5 positions of 10 in 4 slots
            "window_past_end": kernels.RecentWindow(ring, ring, 11),
            "window_dtype": kernels.RecentWindow(ring.float(), ring.float(), 8),
            "window_shape": kernels.RecentWindow(ring[:, :1], ring[:, :1], 8),
        }[change]
        return args, {"recent": recent}
    return args, {}


# each change of _bad and the message naming it (the good query is [2, 8, 2, 64], the caches [2, 2, 15, 64], L = 10)
BAD_ARGUMENTS = {
    "group": r"query \(2, 7, 2, 64\) does not fit the cache \(2, 2, 15, 64\)",
    "head_dim": r"query \(2, 8, 2, 32\) does not fit the cache \(2, 2, 15, 64\)",
    "batch": r"query \(1, 8, 2, 64\) does not fit the cache \(2, 2, 15, 64\)",
    "query_rank": r"query must be 4-D fp16 / bf16 / fp32 \[B, Hq, Sq, D\], got torch.float16 \(8, 2, 64\)",
    "query_dtype": r"query must be 4-D fp16 / bf16 / fp32 \[B, Hq, Sq, D\], got torch.float64 \(2, 8, 2, 64\)",
    "too_many_queries": r"need 1 <= query length 2 <= kv_length 1 <= cache capacity 15",
    "past_capacity": r"need 1 <= query length 2 <= kv_length 16 <= cache capacity 15",
    "kv_start_dtype": r"kv_start must be int32 of shape \(2,\), got torch.int64 \(2,\)",
    "kv_start_shape": r"kv_start must be int32 of shape \(2,\), got torch.int32 \(1,\)",
    "scale_count": r"scales must be contiguous float32 with 1 or 2 elements, got torch.float32 \(3,\)",
    "scale_dtype": r"scales must be contiguous float32 with 1 or 2 elements, got torch.float64 \(2,\)",
    "cache_dtype": r"caches must be contiguous 4-D uint8 views of fp8 buffers, got torch.float8_e4m3fn",
    "cache_layout": r"caches must be contiguous 4-D uint8 views of fp8 buffers, got torch.uint8",  # a transposed view
    "cache_shapes_differ": r"key cache \(2, 2, 15, 64\) and value cache \(2, 2, 14, 64\) differ",
    "head_dim_over_256": r"head dim 512 is larger than the supported 256",
    "out_shape": r"out must be contiguous torch.float16 \(2, 2, 8, 64\), got torch.float16 \(2, 8, 2, 64\)",
    "out_dtype": r"out must be contiguous torch.float16 \(2, 2, 8, 64\), got torch.float32 \(2, 2, 8, 64\)",
    "window_too_long": r"recent window start 5 must be in \[6, 10\] \(kv_length 10, 4 slots\)",
    "window_past_end": r"recent window start 11 must be in \[6, 10\] \(kv_length 10, 4 slots\)",
    "window_dtype": r"recent window keys and values must both be torch.float16 \(2, 2, 4, 64\)",
    "window_shape": r"recent window buffers must be \[2, 2, R, 64\], got \(2, 1, 4, 64\)",
}


@pytest.mark.parametrize("change, message", BAD_ARGUMENTS.items(), ids=list(BAD_ARGUMENTS))
def test_rejects_bad_arguments(change, message):
    args, extra = _bad(change)
    with pytest.raises(ValueError, match=message):
        attention.decode_attention(*args, **extra)
    with pytest.raises(ValueError, match=message):
        kernels.decode_attention(*args, **extra)
    with pytest.raises(ValueError, match=message), kernels.cpu_backend("torch"):  # the reference path validates too
        kernels.decode_attention(*args, **extra)


@pytest.mark.parametrize("change, message", BAD_ARGUMENTS.items(), ids=list(BAD_ARGUMENTS))
def test_a_launch_memo_checks_every_call_unlike_the_last_checked_one(change, message):
    """With a memo a call like the last checked one is checked only for its lengths: a bad call after a good one
    over the same buffers and scales, or over other tensors, still raises."""
    good, _ = _bad("none")
    memo = kernels.LaunchMemo()
    attention.decode_attention(*good, memo=memo)
    args, extra = _bad(change, good)
    with pytest.raises(ValueError, match=message):
        attention.decode_attention(*args, **extra, memo=memo)


def test_a_launch_memo_skips_the_full_check_of_a_call_like_the_last(monkeypatch):
    """The checks a decode step's host time would repeat (8 us of a layer's 30 on CPU) run once per call form; the
    length is checked every call."""
    good, _ = _bad("none")
    memo, checked = kernels.LaunchMemo(), []
    full_check = attention.check_decode_attention
    monkeypatch.setattr(attention, "check_decode_attention", lambda *a: checked.append(1) or full_check(*a))
    attention.decode_attention(*good, memo=memo)
    attention.decode_attention(*good[:3], 9, *good[4:], memo=memo)  # the next step: another length
    assert len(checked) == 1
    with pytest.raises(ValueError, match="need 1 <= query length 2 <= kv_length 16 <= cache capacity 15"):
        attention.decode_attention(*good[:3], 16, *good[4:], memo=memo)
    query = good[0].clone()  # a query of the same form, another tensor: compared by shape, dtype and device
    attention.decode_attention(query, *good[1:], memo=memo)
    assert len(checked) == 1
    attention.decode_attention(*good[:5], good[5].clone(), *good[6:], memo=memo)  # another scale tensor: checked
    assert len(checked) == 2


# -- per-token-head scales (strategy="token_head": bf16 [B, H, capacity] scales, int8 or fp8 codes) ----------------
TOKEN_HEAD_FMTS = [INT8, FORMATS["e4m3fn"]]


def _token_head_case(B, H, G, Sq, D, L, kv_start, *, fmt, dtype, seed=0, spare=5):
    """Caches written by the per-token-head quantizer's twin from K/V whose tokens span four decades (keys 1e-4 to 1,
    values 1e-7 to 1e-3: value scales down to ~1e-9, where a probability times its scale underflows fp16), with NaN
    scales (and NaN fp8 codes) where the kernel must not look (left padding, spare capacity)."""
    g = torch.Generator().manual_seed(seed)
    capacity = L + spare
    magnitudes = torch.logspace(-4, 0, capacity)
    kv = [torch.randn(B, H, capacity, D, generator=g) * magnitudes[torch.randperm(capacity, generator=g)][:, None]
          * size for size in (1.0, 1e-3)]  # fmt: skip
    codes = [torch.zeros(B, H, capacity, D, dtype=torch.uint8) for _ in "kv"]
    scales = [torch.zeros(B, H, capacity, dtype=torch.bfloat16) for _ in "kv"]
    reference.quantize_append_token_head_ref(kv[0], kv[1], codes[0], codes[1], scales[0], scales[1], 0, fmt)
    for code, scale in zip(codes, scales):
        for b, start in enumerate(kv_start):
            scale[b, :, : min(start, L)] = float("nan")
            code[b, :, : min(start, L)] = NAN_CODE
        scale[:, :, L:] = float("nan")
        code[:, :, L:] = NAN_CODE
    query = (torch.randn(B, Sq, H * G, D, generator=g) * 3).to(dtype).to(DEVICE).transpose(1, 2)
    start = torch.tensor(kv_start, dtype=torch.int32, device=DEVICE)
    codes, scales = [c.to(DEVICE) for c in codes], [s.to(DEVICE) for s in scales]
    return query, codes[0], codes[1], L, start, scales[0], scales[1], fmt, D**-0.5


# Worst relative errors against the fp64 oracle measured here (triton 3.9 interpreter, int8 and e4m3fn alike): kernel
# fp16 3.8e-4, bf16 1.7e-3, fp32 3.0e-7; twin fp16 3.4e-4, bf16 1.7e-3, fp32 4.1e-7: within TOLERANCE. Without the
# kernel's division by the block's largest value scale the fp16 / bf16 errors reach 1.7e-2 to 5.3e-2 (checked).
@pytest.mark.parametrize("fmt", TOKEN_HEAD_FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["splits", "exact_window", "device_length", "even_capacity"])
def test_token_head_scales_match_oracle_and_twin(fmt, dtype, variant):
    args = _token_head_case(2, 2, 2, 3, 64, 100, [0, 7], fmt=fmt, dtype=dtype, seed=len(variant))
    if variant == "even_capacity":  # 204 slots: the unmasked blocks read the scales two to a word (_scale_pairs)
        args = _token_head_case(2, 2, 2, 3, 64, 200, [0, 7], fmt=fmt, dtype=dtype, seed=3, spare=4)
        assert attention._paired_scales(args[5], args[6])
    elif variant == "exact_window":
        args = _with_window(args, 8, 6)
    elif variant == "device_length":
        args = (*args[:3], torch.tensor(args[3], device=DEVICE), *args[4:])
    _check_kernel(args, num_splits=3)
    twin = reference.decode_attention_ref(*args)
    assert _relative_error(twin, _oracle(*args)) < TOLERANCE[dtype]


@pytest.mark.parametrize("fmt", TOKEN_HEAD_FMTS, ids=lambda f: f.name)
def test_token_head_values_of_all_scales_in_one_split_stay_finite_and_exact(fmt):
    """The accumulator counts in the last block's largest value scale (``_attend_block``): a block of all-zero values
    (scale 2^-126) after blocks of 3e4-sized values, then small ones, must neither overflow it nor lose the large
    values. Without the unit's floor the output is inf / NaN (checked)."""
    case = _token_head_case(1, 1, 2, 1, 64, 128, [0], fmt=fmt, dtype=torch.float16, seed=5)
    query, key, _, L, start, key_scale, _, *rest = case
    g = torch.Generator().manual_seed(6)
    values = torch.randn(1, 1, 133, 64, generator=g)
    values[:, :, :32] *= 3e4
    values[:, :, 32:64] = 0.0
    values[:, :, 64:] *= 1e-3
    codes, scales = torch.zeros(1, 1, 133, 64, dtype=torch.uint8), torch.zeros(1, 1, 133, dtype=torch.bfloat16)
    reference.quantize_append_token_head_ref(values, values, codes, codes.clone(), scales, scales.clone(), 0, fmt)
    assert scales[0, 0, 32].float().item() == 2.0**-126
    args = (query, key, codes.to(DEVICE), L, start, key_scale, scales.to(DEVICE), *rest)
    out = _check_kernel(args, num_splits=1, block_n=32)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("fmt", TOKEN_HEAD_FMTS, ids=lambda f: f.name)
def test_token_head_scales_in_a_ring(fmt):
    """A static sliding layer's ring with per-token-head scales: each slot's scales are read beside its codes, the
    never-written slots' NaN scales masked; the kernel and the twin against the same positions in order."""
    args = _token_head_case(2, 2, 2, 1, 64, 100, [0, 70], fmt=fmt, dtype=torch.float16, seed=4, spare=0)
    expected = _oracle(*args, sliding_window=48)
    ring = _as_ring(args, 48)
    for run in (attention.decode_attention, reference.decode_attention_ref):
        assert _relative_error(run(*ring, sliding_window=48, ring=True), expected) < TOLERANCE[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", TOKEN_HEAD_FMTS, ids=lambda f: f.name)
def test_token_head_scales_in_a_ring_on_gpu(fmt):
    """The compiled kernel over a wrapped 1000-slot ring with per-token-head scales (one-warp programs, real splits)."""
    args = _token_head_case(4, 8, 4, 1, 128, 5000, [0, 700, 4500, 4990], fmt=fmt, dtype=torch.bfloat16, seed=9,
                            spare=0)  # fmt: skip
    out = kernels.decode_attention(*_as_ring(args, 1000), sliding_window=1000, ring=True)
    assert _relative_error(out, _oracle(*args, sliding_window=1000)) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", TOKEN_HEAD_FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize("L", [4097, 32768])
def test_token_head_scales_on_gpu_shapes(fmt, L):
    """The compiled kernel at decode shapes (8 rows, 8 KV heads of 4 query heads, D = 128: one-warp programs over
    real splits) against the twin, per-token scales read beside the codes."""
    args = _token_head_case(8, 8, 4, 1, 128, L, [0, 5, 100, 0, 7, 0, 1, 2], fmt=fmt, dtype=torch.bfloat16, seed=L)
    out = attention.decode_attention(*args)
    assert _relative_error(out, reference.decode_attention_ref(*args).double().cpu()) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize(
    "change, message",
    [
        ("int8_per_tensor", r"int8 codes need per-token-head scales \(bf16 \[B, H, capacity\]\), got torch.float32"),
        ("scale_dtype", r"per-token-head scales must be contiguous bfloat16 \(2, 2, 15\) .*got torch.float32"),
        ("scale_shape", r"per-token-head scales must be contiguous bfloat16 \(2, 2, 15\) .*got torch.bfloat16 "
                        r"\(2, 2, 14\)"),
    ],
)  # fmt: skip
def test_token_head_rejects_bad_arguments(change, message):
    args = list(_token_head_case(2, 2, 4, 1, 64, 10, [0, 1], fmt=INT8, dtype=torch.float16))
    if change == "int8_per_tensor":
        args[5] = args[6] = torch.ones(1, device=DEVICE)
    elif change == "scale_dtype":
        args[5] = args[5].float()
    elif change == "scale_shape":
        args[6] = args[6][:, :, :-1].contiguous()
    with pytest.raises(ValueError, match=message):
        kernels.decode_attention(*args)
    with pytest.raises(ValueError, match=message), kernels.cpu_backend("torch"):  # the reference path validates too
        kernels.decode_attention(*args)


def _new_token_case(L, *, fmt, dtype, per_head, seed, B=2, H=4, D=64):
    """A decode step's case: the fp8 cache holds L - 1 tokens (position L - 1 poisoned) and the step's own K/V."""
    starts = [min(3 * b, L - 1) for b in range(B)]
    args = list(_case(B, H, 4, 1, D, L, starts, fmt=fmt, dtype=dtype, per_head=per_head, seed=seed))
    for cache in args[1:3]:
        cache[:, :, L - 1] = NAN_CODE  # not written yet: a kernel reading it from memory gives NaN
    g = torch.Generator().manual_seed(seed + 1)
    new_kv = [(torch.randn(B, 1, H, D, generator=g) * 3).to(dtype).to(DEVICE).transpose(1, 2) for _ in "kv"]
    inverse = [1.0 / scale for scale in args[5:7]]
    return args, kernels.NewTokens(new_kv[0], new_kv[1], inverse[0], inverse[1])


def _token_head_new_token_case(L, *, fmt, dtype, seed, B=2, H=4, D=64):
    """``_new_token_case`` with per-token-head scales: the cache's codes and scales at L - 1 poisoned (NaN), the new
    token's heads of very different sizes (each gets its own scale), the inverse scales unused."""
    starts = [min(3 * b, L - 1) for b in range(B)]
    args = list(_token_head_case(B, H, 4, 1, D, L, starts, fmt=fmt, dtype=dtype, seed=seed))
    for codes, scales in ((args[1], args[5]), (args[2], args[6])):
        codes[:, :, L - 1] = NAN_CODE
        scales[:, :, L - 1] = float("nan")
    g = torch.Generator().manual_seed(seed + 1)
    sizes = torch.logspace(-3, 1, H)[None, :, None, None]
    new_kv = [(torch.randn(B, 1, H, D, generator=g).transpose(1, 2) * sizes).to(dtype).to(DEVICE) for _ in "kv"]
    one = torch.ones(1, device=DEVICE)
    return args, kernels.NewTokens(new_kv[0], new_kv[1], one, one)


@pytest.mark.parametrize(
    "L, fmt, dtype, per_head, num_splits, sliding_window",
    [
        (1, FMTS[0], torch.float32, True, None, None),  # the first decode token of a one-token prompt
        (64, FMTS[0], torch.float16, False, None, None),  # the new token ends a full key block
        (65, FMTS[1], torch.bfloat16, True, None, None),  # ... starts one
        (128, FMTS[0], torch.float32, True, 3, None),  # split boundaries forced
        (200, FMTS[1], torch.float16, True, 1, 37),  # one split, a sliding window
        (300, FMTS[0], torch.bfloat16, False, None, None),
    ],
)
def test_a_new_token_is_written_as_quantize_append_does_and_attended(L, fmt, dtype, per_head, num_splits,
                                                                      sliding_window):  # fmt: skip
    _check_new_token(_new_token_case(L, fmt=fmt, dtype=dtype, per_head=per_head, seed=L), num_splits,
                     sliding_window)  # fmt: skip


@pytest.mark.parametrize(
    "L, fmt, dtype, num_splits, sliding_window",
    [
        (1, INT8, torch.float32, None, None),  # the first decode token of a one-token prompt
        (64, FORMATS["e4m3fn"], torch.float16, None, None),  # the new token ends a full key block
        (65, INT8, torch.bfloat16, 3, None),  # ... starts one; split boundaries forced
        (200, FORMATS["e4m3fn"], torch.bfloat16, 1, 37),  # one split, a sliding window
        (300, INT8, torch.float16, None, None),
    ],
)
def test_a_new_token_with_token_head_scales_is_written_as_quantize_append_token_head_does(L, fmt, dtype, num_splits,
                                                                                         sliding_window):  # fmt: skip
    """The launch computes the new token's own scales, writes them and its codes as quantize_append_token_head does
    (every byte, every scale) and attends over them from registers."""
    _check_new_token(_token_head_new_token_case(L, fmt=fmt, dtype=dtype, seed=L), num_splits, sliding_window)


@pytest.mark.gpu
@pytest.mark.parametrize("L, sliding_window", [(4096, None), (4097, None), (32768, None), (32768, 4096)])
def test_a_new_token_on_gpu_shapes(L, sliding_window):
    """The compiled kernel at decode shapes (one-warp programs over real splits, as in generate at 8 rows), also with
    a sliding window (FP8Cache's sliding layers let the launch write their token too)."""
    case = _new_token_case(L, fmt=FMTS[0], dtype=torch.bfloat16, per_head=True, seed=L, B=8, H=8, D=128)
    _check_new_token(case, None, sliding_window)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", TOKEN_HEAD_FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize("L", [4097, 32768])
def test_a_new_token_with_token_head_scales_on_gpu_shapes(fmt, L):
    """The compiled kernel writes a decode step's token with its own scales at decode shapes (one-warp programs over
    real splits), as quantize_append_token_head does."""
    _check_new_token(_token_head_new_token_case(L, fmt=fmt, dtype=torch.bfloat16, seed=L, B=8, H=8, D=128), None,
                     None)  # fmt: skip


def _check_new_token(case, num_splits, sliding_window):
    """One launch with the new token equals quantize_append_kv (quantize_append_token_head with per-token-head
    scales) then attention: every cache byte and scale, and the output; so does the torch twin."""
    args, new = case
    dtype, fmt, L = args[0].dtype, args[7], args[3]
    token_scales = args[5].dim() == 3
    options = dict(sliding_window=sliding_window)
    # the two-launch path: quantize_append_kv (or _token_head), then attention
    separate = [tensor.clone() for tensor in (*args[1:3], *args[5:7])]
    if token_scales:
        kernels.quantize_append_token_head(new.keys, new.values, *separate, L - 1, fmt)
    else:
        kernels.quantize_append_kv(new.keys, new.values, *separate[:2], L - 1, new.key_inv_scale, new.value_inv_scale,
                                   fmt)  # fmt: skip
    separate_args = (args[0], *separate[:2], *args[3:5], *separate[2:], *args[7:])
    expected_out = attention.decode_attention(*separate_args, num_splits=num_splits, **options)
    out = attention.decode_attention(*args, num_splits=num_splits, new=new, **options)
    assert torch.equal(args[1], separate[0]) and torch.equal(args[2], separate[1])  # every byte, position L - 1 too
    for written, expected in zip(args[5:7], separate[2:]):  # (NaN where the kernel must not look: left as it was)
        assert torch.allclose(written, expected, rtol=0, atol=0, equal_nan=True)
    assert _relative_error(out, _oracle(*separate_args, **options)) < TOLERANCE[dtype]
    # the interpreter runs both paths' arithmetic identically; on the GPU they may round their last bits apart
    assert (
        torch.equal(out, expected_out)
        if DEVICE == "cpu"
        else _relative_error(out, expected_out.double().cpu()) < TOLERANCE[dtype]
    )
    twin_caches = [tensor.clone() for tensor in separate]
    for cache in twin_caches[:2]:
        cache[:, :, L - 1] = NAN_CODE
    twin_scales = twin_caches[2:] if token_scales else args[5:7]
    for scales in twin_scales if token_scales else ():
        scales[:, :, L - 1] = float("nan")
    twin = reference.decode_attention_ref(args[0], *twin_caches[:2], *args[3:5], *twin_scales, *args[7:], new=new,
                                          **options)  # fmt: skip
    assert torch.equal(twin_caches[0], separate[0]) and torch.equal(twin_caches[1], separate[1])
    for written, expected in zip(twin_scales, separate[2:]):
        assert torch.allclose(written, expected, rtol=0, atol=0, equal_nan=True)
    assert _relative_error(twin, expected_out.double().cpu()) < TOLERANCE[dtype]


@pytest.mark.parametrize(
    "change, message",
    [
        ("two query tokens", "one query token"),
        ("length on the device", "an int kv_length"),
        ("wrong heads", "new keys must be"),
        ("wrong dtype", "new values must be"),
        ("bad inverse scale", "inverse scales"),
    ],
)
def test_rejects_bad_new_tokens(change, message):
    args, new = _new_token_case(80, fmt=FMTS[0], dtype=torch.float16, per_head=True, seed=3)
    if change == "two query tokens":
        args[0] = torch.cat([args[0], args[0]], dim=2)
    elif change == "length on the device":
        args[3] = torch.tensor(80, device=DEVICE)
    elif change == "wrong heads":
        new = new._replace(keys=new.keys[:, :2])
    elif change == "wrong dtype":
        new = new._replace(values=new.values.float())
    else:
        new = new._replace(key_inv_scale=new.key_inv_scale.double())
    for backend in ("triton", "torch"):
        with (
            pytest.raises(ValueError, match=message),
            kernels.cpu_backend(backend) if DEVICE == "cpu" else nullcontext(),
        ):
            kernels.decode_attention(*args, new=new)


# -- query chunks (prefill over the cache: more than 64 query rows a KV head run in causal tiles of 128) -------------
# (B, H, G, Sq, D, L, kv_start): 68 rows in one tile; 160 rows in two (the second tile's rows start at position 32 of
# the chunk); G = 1 with 150 positions over two tiles; a chunk that is the whole cache (exact_prefill=False's first
# prefill); D = 256 (64-row tiles); padding that covers part of the chunk.
CHUNKS = [
    (2, 2, 4, 17, 64, 150, [0, 37]),
    (2, 2, 4, 40, 64, 230, [0, 100]),
    (1, 2, 1, 150, 64, 170, [5]),
    (2, 1, 2, 90, 64, 90, [0, 30]),
    (1, 2, 4, 20, 256, 100, [3]),
    (2, 2, 4, 40, 80, 100, [0, 75]),
]
# Worst relative errors against the fp64 oracle over the chunk tests below, kernel and twin together, measured here
# (triton 3.9 interpreter, 2026-12-01): fp16 4.0e-4, bf16 1.7e-3, fp32 6.7e-7 (the exact-window and per-token-head
# cases): within the decode rows' TOLERANCE (1e-3, 6e-3, 3e-6).


@pytest.mark.parametrize("index", range(len(CHUNKS)))
@pytest.mark.parametrize("num_splits", [None, 3])
def test_chunks_match_oracle_and_twin(index, num_splits):
    dtype = DTYPES[index % 3]
    args = _case(*CHUNKS[index], fmt=FMTS[index % 2], dtype=dtype, per_head=index % 2 == 1, seed=40 + index)
    B, H, G, Sq = CHUNKS[index][:4]
    assert plan_decode_attention(B, H, G, Sq, args[1].shape[3], args[3], None, 132).block_m >= 64
    _check_kernel(args, num_splits=num_splits)
    assert _relative_error(reference.decode_attention_ref(*args), _oracle(*args)) < TOLERANCE[dtype]


def test_a_tile_reads_no_key_block_past_its_last_row():
    # 400 query rows (G = 4, Sq = 100): the first tile holds positions L - 100 .. L - 69; every key block after the
    # one holding its last row is NaN, so a tile reading one would give NaN rows (0 * NaN in P @ V)
    L, Sq = 300, 100
    args = _case(2, 2, 4, Sq, 64, L, [0, 100], dtype=torch.float32, seed=3)
    expected = _oracle(*args)
    plan = plan_decode_attention(2, 2, 4, Sq, 64, L, None, 132, fp32_query=True)
    first_tile_positions = plan.block_m // 4
    poisoned_from = -(-(L - Sq + first_tile_positions) // plan.block_n) * plan.block_n
    assert poisoned_from < L
    for cache in args[1:3]:
        cache[:, :, poisoned_from:] = NAN_CODE
    for num_splits in (None, 3):
        out = attention.decode_attention(*args, num_splits=num_splits)[:, :first_tile_positions]
        assert _relative_error(out, expected[:, :first_tile_positions]) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("name", list(OPTIONS))
def test_chunks_with_window_sinks_and_softcap(name):
    index = list(OPTIONS).index(name)
    dtype = DTYPES[index % 3]
    args = _case(2, 2, 4, 40, 64, 200, [0, 150], fmt=FMTS[index % 2], dtype=dtype, seed=60 + index)
    options = dict(OPTIONS[name])
    if "sinks" in options:
        options["sinks"] = _sinks(options["sinks"], seed=index)
    expected = _oracle(*args, **options)
    for num_splits in (None, 3):
        out = attention.decode_attention(*args, num_splits=num_splits, **options)
        assert _relative_error(out, expected) < TOLERANCE[dtype]
    assert _relative_error(reference.decode_attention_ref(*args, **options), expected) < TOLERANCE[dtype]


# (slots, window): a ring shorter than the chunk (its first positions come from the fp8 bytes), one as long as the
# chunk plus history, and one with every position exact
@pytest.mark.parametrize("slots, window", [(16, 12), (64, 60), (128, 120)])
def test_chunks_with_an_exact_recent_window(slots, window):
    args = _with_window(_case(2, 2, 4, 40, 64, 120, [0, 90], dtype=torch.float16, seed=slots), slots, window, seed=1)
    expected = _oracle(*args)
    for num_splits in (None, 2):
        out = attention.decode_attention(*args, num_splits=num_splits)
        assert _relative_error(out, expected) < TOLERANCE[torch.float16]
    assert _relative_error(reference.decode_attention_ref(*args), expected) < TOLERANCE[torch.float16]
    sliding = dict(sliding_window=30)
    out = attention.decode_attention(*args, **sliding)
    assert _relative_error(out, _oracle(*args, **sliding)) < TOLERANCE[torch.float16]


def test_chunks_with_the_length_on_the_device():
    # the static cache's form: a capacity of 600, 150 filled, a chunk of 40 with a sliding window, also as the
    # operator; the splits are planned over the capacity and share the filled blocks
    args = list(_case(2, 2, 4, 40, 64, 150, [0, 40], dtype=torch.float32, seed=31, spare=450))
    options = dict(sliding_window=60, sinks=_sinks(8, seed=3), softcap=4.0)
    for extra in ({}, options):
        expected = _oracle(*args, **extra)
        device_args = (*args[:3], torch.tensor(150, device=DEVICE), *args[4:])
        assert _relative_error(kernels.decode_attention(*device_args, **extra), expected) < TOLERANCE[torch.float32]
        as_operator = ops.decode_attention(*device_args[:7], args[7].name, args[8], **extra)
        assert _relative_error(as_operator, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("fmt", TOKEN_HEAD_FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_chunks_with_token_head_scales(fmt, dtype):
    args = _token_head_case(2, 2, 4, 30, 64, 140, [0, 37], fmt=fmt, dtype=dtype, seed=5)
    expected = _oracle(*args)
    for num_splits in (None, 3):
        assert _relative_error(attention.decode_attention(*args, num_splits=num_splits), expected) < TOLERANCE[dtype]
    assert _relative_error(reference.decode_attention_ref(*args), expected) < TOLERANCE[dtype]


def test_block_m_must_be_a_power_of_two():
    args = _case(1, 1, 4, 20, 64, 50, [0])
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16, got 48"):
        attention.decode_attention(*args, block_m=48)


def _twin_error(args, **options) -> float:
    """Relative error of the compiled kernel against the torch twin (both on the GPU; the twin in fp32)."""
    out = attention.decode_attention(*args, **options)
    return _relative_error(out, reference.decode_attention_ref(*args, **options).double().cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("L, Sq, B", [(32768, 17, 4), (32768, 64, 2), (32768, 512, 2), (16384, 2048, 1)])
def test_chunks_on_gpu_shapes_match_the_twin(L, Sq, B):
    """The compiled kernel at issue 17's shapes (8 KV heads of 4 query heads, D = 128, bf16, left padding; split keys
    for short chunks, 128-row tiles for long ones) against the twin: a 32k history catches accumulation errors."""
    args = _case(B, 8, 4, Sq, 128, L, [0, 1000, 7, 0][:B], dtype=torch.bfloat16, seed=Sq)
    assert _twin_error(args) < TOLERANCE[torch.bfloat16]
    device_length = (*args[:3], torch.tensor(L, device=DEVICE), *args[4:])  # the static cache's form
    out = kernels.decode_attention(*device_length)
    assert _relative_error(out, reference.decode_attention_ref(*args).double().cpu()) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_chunk_options_on_gpu_shapes_match_the_twin():
    """A 256-token chunk over 32k keys with a 4096-token sliding window, sinks and a softcap, an exact recent window
    of 300 positions, and int8 per-token-head scales, each against the twin."""
    args = _case(2, 8, 4, 256, 128, 32768, [0, 3000], dtype=torch.bfloat16, seed=2)
    for options in (dict(sliding_window=4096), dict(sinks=_sinks(32, seed=1), softcap=30.0),
                    dict(sliding_window=1000, sinks=_sinks(32, seed=2), softcap=5.0)):  # fmt: skip
        assert _twin_error(args, **options) < TOLERANCE[torch.bfloat16]
    windowed = _with_window(_case(2, 8, 4, 256, 128, 8192, [0, 3000], dtype=torch.bfloat16, seed=3), 512, 300)
    assert _twin_error(windowed) < TOLERANCE[torch.bfloat16]
    token_head = _token_head_case(2, 8, 4, 256, 128, 8192, [0, 3000], fmt=INT8, dtype=torch.bfloat16, seed=4)
    assert _twin_error(token_head) < TOLERANCE[torch.bfloat16]


# -- FP8 queries (quantize_query: Q @ K^T on e4m3 operands, P @ V in fp16, issue 17) --------------------------------
# (B, H, G, Sq, D, L, kv_start), dtype, options: a decode step over several splits, a chunk of 40 queries (two tiles),
# per-token-head e4m3 codes, and a sliding window with sinks and a softcap.
FP8_QUERY_CASES = [
    ((2, 2, 4, 1, 64, 300, [0, 7]), torch.bfloat16, {}),
    ((2, 2, 4, 40, 64, 230, [0, 100]), torch.float16, {}),
    ((2, 2, 2, 3, 64, 100, [0, 7]), torch.float32, {"token_head": True}),
    ((2, 2, 4, 3, 64, 200, [0, 150]), torch.bfloat16, {"sliding_window": 48, "sinks": True, "softcap": 3.0}),
]
# Relative errors measured here (triton 3.9 interpreter, 2026-12-03): kernel against the twin 1.6e-4 to 7.7e-4 (both
# round the queries the same way; P @ V in fp16 against the twin's fp32); both against the exact oracle 0.026 to
# 0.050, above 3x the query-dtype kernel's TOLERANCE: the queries' rounding is there, and bounded.
FP8_QUERY_TWIN_TOLERANCE = 2e-3
FP8_QUERY_ORACLE_BOUND = 0.08
# Compiled on the H200 (triton 3.6, 2026-12-03) at 32k histories the kernel is 3.2e-3 (4x32768x1), 5.2e-3 (2x32768x256)
# and 5.8e-3 (1x16384x2048) from the twin, and 0.069 to 0.074 from the oracle: Hopper's e4m3 MMA accumulates Q @ K^T
# with fewer bits than the twin's fp32 matmul. The bound keeps 1.7x over the largest and stays 7x under the oracle's.
FP8_QUERY_GPU_TWIN_TOLERANCE = 1e-2


def _fp8_query_case(index):
    shape, dtype, options = FP8_QUERY_CASES[index]
    options = dict(options)
    if options.pop("token_head", False):
        args = _token_head_case(*shape, fmt=FORMATS["e4m3fn"], dtype=dtype, seed=index)
    else:
        args = _case(*shape, dtype=dtype, seed=30 + index)
    if options.pop("sinks", False):
        options["sinks"] = _sinks(shape[1] * shape[2], seed=index)
    return args, options


@pytest.mark.parametrize("index", range(len(FP8_QUERY_CASES)))
@pytest.mark.parametrize("num_splits", [None, 3])
def test_fp8_queries_match_the_twin_and_stay_near_the_oracle(index, num_splits):
    args, options = _fp8_query_case(index)
    expected = _oracle(*args, **options)
    twin = reference.decode_attention_ref(*args, quantize_query=True, **options)
    out = attention.decode_attention(*args, quantize_query=True, num_splits=num_splits, **options)
    assert out.dtype == twin.dtype == args[0].dtype
    twin = twin.double().cpu()
    assert _relative_error(out, twin) < FP8_QUERY_TWIN_TOLERANCE
    for fp8_queries in (out, twin):  # rounded, and not further than the measured bound
        assert 3 * TOLERANCE[args[0].dtype] < _relative_error(fp8_queries, expected) < FP8_QUERY_ORACLE_BOUND


def test_fp8_queries_over_a_ring_through_the_operator_match_the_twin():
    """The static sliding layer's read with FP8 queries: a wrapped ring of 64 slots (row 1's padding inside it)
    through the compileable operator, against the twin and near the exact oracle (the bounds above; measured with the
    interpreter: 0 against the twin, the window's 64 keys being one block whose maximum is the row's, and 0.035
    against the oracle)."""
    args = _case(2, 2, 4, 1, 64, 300, [0, 270], dtype=torch.bfloat16, seed=31, spare=0)
    ring = _as_ring(args, 64)
    out = ops.decode_attention(*ring[:7], ring[7].name, ring[8], sliding_window=64, ring=True, quantize_query=True)
    twin = reference.decode_attention_ref(*ring, sliding_window=64, ring=True, quantize_query=True).double().cpu()
    assert _relative_error(out, twin) < FP8_QUERY_TWIN_TOLERANCE
    assert (
        3 * TOLERANCE[torch.bfloat16] < _relative_error(out, _oracle(*args, sliding_window=64)) < FP8_QUERY_ORACLE_BOUND
    )


def test_fp8_queries_over_equal_keys_give_the_value_exactly():
    # every key equal: every logit is equal whatever the query's rounding, so each probability is the same and
    # P @ V gives the value itself. fp32 queries: the oracle's 3e-6 tolerance.
    args = list(_case(2, 2, 4, 3, 64, 150, [0, 7], dtype=torch.float32, seed=8))
    for cache in args[1:3]:
        for b, start in enumerate((0, 7)):  # (row 1's padding stays poisoned)
            cache[b, :, start:150] = cache[b, :, 149:150].clone()
    out = attention.decode_attention(*args, quantize_query=True, num_splits=3)
    assert _relative_error(out, _oracle(*args)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize(
    "change, message",
    [
        ("e5m2", "quantize_query needs e4m3fn codes"),
        ("int8", "quantize_query needs e4m3fn codes"),
        ("window", "quantize_query does not take an exact recent window"),
    ],
)
def test_fp8_queries_refuse_what_they_cannot_read(change, message):
    if change == "int8":
        args = _token_head_case(2, 2, 4, 1, 64, 10, [0, 1], fmt=INT8, dtype=torch.float16)
    else:
        args = _case(2, 2, 4, 1, 64, 20, [0, 1], fmt=FORMATS["e5m2" if change == "e5m2" else "e4m3fn"])
        if change == "window":
            args = _with_window(args, 8, 6)
    for run in (attention.decode_attention, kernels.decode_attention):
        with pytest.raises(ValueError, match=message):
            run(*args, quantize_query=True)


def _needle_case(L, depth, seed=0):
    """One KV head of two query heads, D = 64, bf16 queries over ``L`` random e4m3 keys and one needle key at
    position ``depth`` aligned with both queries (a +-1 pattern): its logit is 24, the others' spread about 0.6,
    so the oracle's output is the needle's value up to about 1e-6 (checked by the test)."""
    args = list(_case(1, 1, 2, 1, 64, L, [0], dtype=torch.bfloat16, seed=seed))
    pattern = torch.randint(0, 2, (64,), generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    key_scale = args[5].cpu()[0].item()
    # needle logit: sm_scale * key_scale * c * 64 * 192 = 24
    c = 24 / (64**-0.5 * key_scale * 64 * 192)
    args[0] = (pattern * c).expand(1, 2, 1, 64).to(torch.bfloat16).to(DEVICE)
    args[1][0, 0, depth] = (pattern * 192).to(FORMATS["e4m3fn"].dtype).view(torch.uint8).to(DEVICE)
    return args


@pytest.mark.parametrize("L", [2048] + ([32768] if DEVICE == "cuda" else []))
@pytest.mark.parametrize("depth_fraction", [0.0, 0.5, 0.99])
def test_fp8_queries_find_a_needle_at_every_depth_of_a_long_history(L, depth_fraction):
    # vLLM's FP8 attention lost needles through an accumulation bug: here the needle's value is the output at every
    # depth, within the FP8 queries' bound, with the values of every other key summed around it in fp32.
    depth = int(depth_fraction * (L - 1))
    args = _needle_case(L, depth)
    expected = _oracle(*args)
    needle_value = args[2][0, 0, depth].cpu().view(FORMATS["e4m3fn"].dtype).double() * args[6].cpu()[0].item()
    assert _relative_error(expected[0, 0], needle_value.expand(2, 64)) < 1e-5  # the needle dominates
    out = attention.decode_attention(*args, quantize_query=True)
    assert _relative_error(out, expected) < TOLERANCE[torch.bfloat16]  # (the needle's probability is ~1)


@pytest.mark.gpu
@pytest.mark.parametrize("L, Sq, B", [(32768, 1, 4), (32768, 256, 2), (16384, 2048, 1)])
def test_fp8_queries_on_gpu_shapes_match_the_twin(L, Sq, B):
    """The compiled kernel with FP8 queries (Q @ K^T on e4m3 tensor cores) at issue 17's shapes, against the twin and
    the oracle: a 32k history catches accumulation errors (issue 17: vLLM's FP8 path lost needles to one)."""
    args = _case(B, 8, 4, Sq, 128, L, [0, 1000, 7, 0][:B], dtype=torch.bfloat16, seed=Sq)
    twin = reference.decode_attention_ref(*args, quantize_query=True).double().cpu()
    out = attention.decode_attention(*args, quantize_query=True)
    assert _relative_error(out, twin) < FP8_QUERY_GPU_TWIN_TOLERANCE
    assert _relative_error(out, _oracle(*args)) < FP8_QUERY_ORACLE_BOUND


@pytest.mark.parametrize("capability, runs", [((8, 0), False), ((8, 9), True), ((9, 0), True)])
def test_fp8_queries_need_fp8_tensor_cores(capability, runs, monkeypatch):
    # A100 (8.0) has no e4m3 MMA; Ada (8.9) and Hopper (9.0) do. The CPU always runs them (interpreter or twin).
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert kernels.has_fp8_tensor_cores(torch.device("cuda")) is runs
    assert kernels.has_fp8_tensor_cores(torch.device("cpu"))
