"""Kernel exactness: the Triton kernels (interpreter here, compiled on the GPU machine) write exactly the bytes of
their torch twins in kernels/reference.py, for every format, input dtype, head dim, length and layout."""

import contextlib

import pytest
import torch
from helpers import assert_equal
from hf_fp8cache.kernels import dispatch, ops, recent_window, reference
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_fp8cache import kernels
from hf_fp8cache.formats import FORMATS

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow notes inside the interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FMTS = list(FORMATS.values())


def _special_values(D):
    fmax = 448.0
    return torch.tensor([float("inf"), -float("inf"), -0.0, 0.0, 1e30, -1e30, fmax * 1.03, 2.0**-9 * 0.5, 2.0**-9 * 1.5,
                         -(2.0**-10), 2.0**-7 * 1.0625, 124.2, 2.0**-126, 57344.0 * 1.2][:D])  # fmt: skip


def _inputs(B, H, S, D, dtype, seed=0, transposed=False):
    g = torch.Generator().manual_seed(seed)
    # magnitudes from 1e-9 to 1e5: subnormals, normals and saturation in every format
    x = (
        torch.randn(B, H, S, D, generator=g)
        * torch.logspace(-9, 5, S * D).reshape(S, D)[torch.randperm(S, generator=g)]
    )
    x[0, 0, 0, : min(D, 14)] = _special_values(min(D, 14))
    if transposed:  # what transformers hands the cache: a transposed view
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(dtype).to(DEVICE)


def _run_both(key, value, fmt, capacity, start, inv_k, inv_v):
    B, H, _, D = key.shape
    caches = [torch.full((B, H, capacity, D), 0xAA, dtype=torch.uint8, device=DEVICE) for _ in range(4)]
    kernels.quantize_append_kv(key, value, caches[0], caches[1], start, inv_k, inv_v, fmt)
    reference.quantize_append_kv_ref(key, value, caches[2], caches[3], start, inv_k, inv_v, fmt)
    return caches


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_head", [False, True], ids=["tensor", "attn_head"])
def test_quantize_append_matches_reference(fmt, dtype, per_head):
    B, H, S, D = 2, 3, 7, 80
    key, value = _inputs(B, H, S, D, dtype, 1, transposed=True), _inputs(B, H, S, D, dtype, 2)
    inv = (torch.rand(H if per_head else 1) * 4 + 0.1).to(DEVICE)
    k, v, k_ref, v_ref = _run_both(key, value, fmt, 16, 5, inv, inv.flip(0).contiguous())
    assert_equal(k, k_ref, "key bytes")
    assert_equal(v, v_ref, "value bytes")
    assert (k[:, :, :5] == 0xAA).all() and (k[:, :, 12:] == 0xAA).all()  # nothing outside [start, start + S)


@pytest.mark.parametrize("D", [64, 80, 128, 256])
@pytest.mark.parametrize("S", [1, 7, 127, 1000])
def test_quantize_append_shapes(D, S):
    if S * D > 127 * 128 and DEVICE == "cpu":
        B, H = 1, 1  # keep the interpreter quick for the largest tiles
    else:
        B, H = 2, 2
    key, value = _inputs(B, H, S, D, torch.float16, S + D), _inputs(B, H, S, D, torch.float16, S * D, transposed=True)
    inv = torch.tensor([0.5], device=DEVICE)
    k, v, k_ref, v_ref = _run_both(key, value, FORMATS["e4m3fn"], S + 3, 3, inv, inv)
    assert_equal(k, k_ref, "key bytes")
    assert_equal(v, v_ref, "value bytes")


def test_saturates_never_nan_or_inf():
    fmt = FORMATS["e4m3fn"]
    key = torch.tensor([1e4, -1e4, float("inf"), -float("inf"), 464.0, 449.0], device=DEVICE).reshape(1, 1, 6, 1)
    k, _, _, _ = _run_both(key, key, fmt, 6, 0, torch.ones(1, device=DEVICE), torch.ones(1, device=DEVICE))
    decoded = reference.decode_fp8_ref(k, fmt).flatten().tolist()
    assert decoded == [448.0, -448.0, 448.0, -448.0, 448.0, 448.0]


def test_round_to_nearest_even_and_exponent_carry():
    # the interpreter's own cast gets these wrong (ties away, 124.2 -> 64); the torch cast and ours must not
    fmt = FORMATS["e4m3fn"]
    x = torch.tensor([124.2, 8.5, 9.5, 10.5, 0.5 * 2.0**-9, 1.5 * 2.0**-9, 2.5 * 2.0**-9], device=DEVICE)
    k, _, _, _ = _run_both(x.reshape(1, 1, -1, 1), x.reshape(1, 1, -1, 1), fmt, 7, 0,
                           torch.ones(1, device=DEVICE), torch.ones(1, device=DEVICE))  # fmt: skip
    decoded = reference.decode_fp8_ref(k, fmt).flatten().tolist()
    # step 1 in [8, 16): 8.5 -> 8, 9.5 -> 10, 10.5 -> 10 (ties to even); step 8 in [64, 128): 124.2 -> 128 (carry);
    # subnormal step 2^-9: 0.5 step -> 0, 1.5 -> 2, 2.5 -> 2 (ties to even)
    assert decoded == [128.0, 8.0, 10.0, 10.0, 0.0, 2.0 * 2.0**-9, 2.0 * 2.0**-9]


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2), H=st.integers(1, 3), S=st.integers(1, 20), D=st.sampled_from([8, 16, 24, 64, 80]),
    start=st.integers(0, 5), fmt=st.sampled_from(FMTS), dtype=st.sampled_from([torch.float32, torch.float16]),
    exponent=st.floats(-12, 6), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_quantize_append_property(B, H, S, D, start, fmt, dtype, exponent, seed):
    g = torch.Generator().manual_seed(seed)
    key = (torch.randn(B, H, S, D, generator=g) * 10.0**exponent).to(dtype).to(DEVICE)
    value = (torch.randn(B, H, D, S, generator=g) * 10.0**exponent).to(dtype).to(DEVICE).transpose(2, 3)
    inv = (torch.rand(H, generator=g) * 8 + 0.01).to(DEVICE)
    k, v, k_ref, v_ref = _run_both(key, value, fmt, start + S, start, inv, inv)
    assert_equal(k, k_ref, "key bytes")
    assert_equal(v, v_ref, "value bytes")


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2), H=st.integers(1, 3), length=st.integers(1, 40), spare=st.integers(0, 9),
    D=st.sampled_from([8, 24, 64, 80]), fmt=st.sampled_from(FMTS),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), per_head=st.booleans(),
    seed=st.integers(0, 2**16),
)  # fmt: skip
def test_dequantize_property(B, H, length, spare, D, fmt, dtype, per_head, seed):
    g = torch.Generator().manual_seed(seed)
    caches = [torch.randint(0, 256, (B, H, length + spare, D), generator=g, dtype=torch.uint8).to(DEVICE) for _ in "kv"]
    scale = (torch.rand(H if per_head else 1, generator=g) * 10 + 1e-3).to(DEVICE)
    outs = [torch.empty(B, H, length, D, dtype=dtype, device=DEVICE) for _ in range(4)]
    kernels.dequantize_kv(*caches, length, scale, scale, fmt, outs[0], outs[1])
    reference.dequantize_kv_ref(*caches, length, scale, scale, fmt, outs[2], outs[3])
    _assert_bits_equal(outs[0], outs[2], "dequantized keys")
    _assert_bits_equal(outs[1], outs[3], "dequantized values")


@pytest.mark.parametrize("start, written", [(3, 5), (30, 2), (32, 0)])  # 32 slots: the last two drop 3 / 5 tokens
def test_quantize_append_at_a_device_position(start, written):
    g = torch.Generator().manual_seed(start)
    key, value = (torch.randn(2, 3, 5, 16, generator=g).to(DEVICE) for _ in "kv")
    inv = torch.tensor([4.0], device=DEVICE)
    caches = {}
    for path in ("kernel", "reference"):
        with kernels.cpu_backend("torch") if path == "reference" else contextlib.nullcontext():
            k, v = (torch.full((2, 3, 32, 16), 0x7F, dtype=torch.uint8, device=DEVICE) for _ in "kv")
            ops.quantize_append_kv(key, value, k, v, torch.tensor(start, device=DEVICE), inv, inv, "e4m3fn")
        caches[path] = k, v
    k, v = caches["kernel"]
    assert_equal(k, caches["reference"][0], "key bytes")
    assert_equal(v, caches["reference"][1], "value bytes")
    expected = torch.full_like(k, 0x7F)
    expected[:, :, start : start + written] = reference.encode_fp8_ref(key[:, :, :written] * 4.0, FMTS[0])
    assert_equal(k, expected)


def test_quantize_append_rejects_a_bad_device_position():
    key = torch.zeros(1, 1, 2, 16, device=DEVICE)
    cache = torch.zeros(1, 1, 8, 16, dtype=torch.uint8, device=DEVICE)
    one = torch.ones(1, device=DEVICE)
    bad_start = torch.tensor([1.0], device=DEVICE)
    with pytest.raises(ValueError, match="start tensor must be one int32/int64 element"):
        kernels.quantize_append_kv(key, key, cache, cache.clone(), bad_start, one, one, FMTS[0])


@settings(max_examples=40, deadline=None)
@given(R=st.integers(1, 9), start=st.integers(0, 30), S=st.integers(1, 25), seed=st.integers(0, 2**16))
def test_ring_write_then_read_keeps_the_last_r_positions(R, start, S, seed):
    g = torch.Generator().manual_seed(seed)
    ring = torch.randn(2, 3, R, 4, generator=g)
    previous = ring.clone()
    states = torch.randn(2, 3, S, 4, generator=g)
    recent_window.ring_write(ring, states, start)
    expected = previous.clone()  # position p lives at slot p % R; only the last R written positions are kept
    for p in range(max(start, start + S - R), start + S):
        expected[:, :, p % R] = states[:, :, p - start]
    assert_equal(ring, expected)
    first = max(start, start + S - R)
    read = recent_window.ring_read(ring, first, start + S)
    assert_equal(read, states[:, :, first - start :])
    out = torch.zeros(2, 3, start + S - first, 4, dtype=torch.float64)
    recent_window.ring_read(ring, first, start + S, out=out)
    assert_equal(out, states[:, :, first - start :].double())


def _assert_bits_equal(actual, expected, what=""):
    """Bit for bit (so -0.0 is not 0.0), except that any NaN equals any NaN: compared as integers."""
    ints = {2: torch.int16, 4: torch.int32}[actual.element_size()]
    both_nan = actual.isnan() & expected.isnan()
    assert_equal(actual.view(ints).masked_fill(both_nan, 0), expected.view(ints).masked_fill(both_nan, 0), what)


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
def test_decode_all_256_codes(fmt):
    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE).reshape(1, 1, 256, 1).repeat(1, 1, 1, 2).contiguous()
    one = torch.ones(1, device=DEVICE)
    out_k, out_v = (torch.empty(1, 1, 256, 2, device=DEVICE) for _ in range(2))
    kernels.dequantize_kv(codes, codes, 256, one, one, fmt, out_k, out_v)
    _assert_bits_equal(out_k, reference.decode_fp8_ref(codes, fmt), "decoded codes")


@pytest.mark.parametrize("fmt", FMTS, ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_head", [False, True], ids=["tensor", "attn_head"])
def test_dequantize_matches_reference(fmt, dtype, per_head):
    B, H, capacity, length, D = 2, 3, 50, 37, 80
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randint(0, 256, (B, H, capacity, D), generator=g, dtype=torch.uint8).to(DEVICE)
    v_cache = torch.randint(0, 256, (B, H, capacity, D), generator=g, dtype=torch.uint8).to(DEVICE)
    scale = (torch.rand(H if per_head else 1, generator=g) * 3 + 0.01).to(DEVICE)
    outs = [torch.full((B, H, length, D), 7.0, dtype=dtype, device=DEVICE) for _ in range(4)]
    kernels.dequantize_kv(k_cache, v_cache, length, scale, scale * 2, fmt, outs[0], outs[1])
    reference.dequantize_kv_ref(k_cache, v_cache, length, scale, scale * 2, fmt, outs[2], outs[3])
    _assert_bits_equal(outs[0], outs[2], "dequantized keys")
    _assert_bits_equal(outs[1], outs[3], "dequantized values")


def test_dequantize_reads_a_token_range_of_the_caches_in_place():
    # a sliding layer dequantizes only the tokens it serves: a view from token 13 on of the whole buffers
    B, H, capacity, D = 2, 3, 50, 64
    g = torch.Generator().manual_seed(4)
    caches = [torch.randint(0, 256, (B, H, capacity, D), generator=g, dtype=torch.uint8).to(DEVICE) for _ in "kv"]
    scale = torch.tensor([0.5, 2.0, 3.0], device=DEVICE)
    whole = [torch.empty(B, H, 40, D, device=DEVICE) for _ in "kv"]
    kernels.dequantize_kv(*caches, 40, scale, scale, FMTS[0], *whole)
    tail = [torch.empty(B, H, 27, D, device=DEVICE) for _ in "kv"]
    kernels.dequantize_kv(*(c[:, :, 13:] for c in caches), 27, scale, scale, FMTS[0], *tail)
    for part, full in zip(tail, whole):
        _assert_bits_equal(part, full[:, :, 13:], "dequantized token range")
    strided = [torch.empty(B, H, 40, D // 2, device=DEVICE) for _ in "kv"]
    with pytest.raises(ValueError, match="token ranges of"):  # every other head dim: rows not contiguous
        kernels.dequantize_kv(*(c[..., ::2] for c in caches), 40, scale, scale, FMTS[0], *strided)


def test_round_trip_error_is_within_half_ulp():
    fmt = FORMATS["e4m3fn"]
    x = _inputs(1, 2, 33, 64, torch.float32, 9).clamp(-400, 400)
    x = x.masked_fill(x.abs() < 2.0**-6, 1.0)  # normal range: relative error <= 2^-4 (half of 2^-3)
    k, _, _, _ = _run_both(x, x, fmt, 33, 0, torch.ones(1, device=DEVICE), torch.ones(1, device=DEVICE))
    back = torch.empty_like(x)
    kernels.dequantize_kv(k, k, 33, torch.ones(1, device=DEVICE), torch.ones(1, device=DEVICE), fmt, back, back.clone())
    assert ((back - x).abs() / x.abs()).max().item() <= 2.0**-4


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(inv=torch.ones(2)), r"float32 with 1 or 3 elements, got torch.float32 \(2,\)"),
        (dict(inv=torch.ones(1, dtype=torch.float64)), r"float32 with 1 or 3 elements, got torch.float64 \(1,\)"),
        (dict(start=14), r"cache \(1, 3, 16, 8\) cannot take \(1, 3, 5, 8\) at position 14"),
        (dict(cache_dtype=torch.float16), r"must be contiguous 4-D uint8 views of fp8 buffers, got torch.float16"),
        (dict(value_shape=(1, 3, 4, 8)), r"key \(1, 3, 5, 8\) and value \(1, 3, 4, 8\) must be the same"),
    ],
)
def test_quantize_append_rejects_bad_arguments(change, message):
    key = torch.randn(1, 3, 5, 8)
    value = torch.randn(*change.get("value_shape", key.shape))
    cache = torch.zeros(1, 3, 16, 8, dtype=change.get("cache_dtype", torch.uint8))
    inv = change.get("inv", torch.ones(1))
    with pytest.raises(ValueError, match=message):
        kernels.quantize_append_kv(
            key, value, cache, cache.clone(), change.get("start", 0), inv, inv, FORMATS["e4m3fn"]
        )
    # with a launch memo, after a good write into good buffers (only a write of the same form is checked by its
    # position alone): the bad one still raises
    memo, good = kernels.LaunchMemo(), torch.zeros(1, 3, 16, 8, dtype=torch.uint8)
    good_caches, good_inv = (good, good.clone()), torch.ones(1)
    kernels.quantize_append_kv(key, key, *good_caches, 0, good_inv, good_inv, FORMATS["e4m3fn"], memo=memo)
    caches = good_caches if cache.dtype == torch.uint8 else (cache, cache.clone())
    inv = inv if "inv" in change else good_inv
    with pytest.raises(ValueError, match=message):
        kernels.quantize_append_kv(key, value, *caches, change.get("start", 0), inv, inv, FORMATS["e4m3fn"], memo=memo)


def test_a_launch_memo_checks_a_write_like_the_last_by_its_position_only(monkeypatch):
    memo, checked = kernels.LaunchMemo(), []
    full_check = dispatch.check_quantize_append_kv
    monkeypatch.setattr(dispatch, "check_quantize_append_kv", lambda *a: checked.append(1) or full_check(*a))
    key, cache, inv = torch.randn(1, 3, 5, 8), torch.zeros(1, 3, 16, 8, dtype=torch.uint8), torch.ones(1)
    caches = (cache, cache.clone())
    for start in (0, 5, 10):  # a step's write at the next position: the same form
        kernels.quantize_append_kv(key, key, *caches, start, inv, inv, FORMATS["e4m3fn"], memo=memo)
    assert len(checked) == 1
    kernels.quantize_append_kv(key, key, *caches, 0, inv.clone(), inv, FORMATS["e4m3fn"], memo=memo)  # new scales
    assert len(checked) == 2


def test_the_cpu_backend_is_read_once_and_switched_explicitly(monkeypatch):
    cpu = torch.zeros(1)
    interpreted = kernels.uses_triton(cpu)  # TRITON_INTERPRET as the kernels were imported: 1 here, 0 on the GPU
    monkeypatch.setenv("TRITON_INTERPRET", "0" if interpreted else "1")
    assert kernels.uses_triton(cpu) == interpreted  # the environment is not read again
    with kernels.cpu_backend("torch"):
        assert not kernels.uses_triton(cpu)
        if DEVICE == "cuda":
            assert kernels.uses_triton(cpu.to(DEVICE))
    with pytest.raises(RuntimeError, match="inside"), kernels.cpu_backend("torch"):
        raise RuntimeError("inside")
    assert kernels.uses_triton(cpu) == interpreted  # restored, after an error too


def test_cpu_backend_rejects_unknown_names_and_triton_without_the_interpreter(monkeypatch):
    with pytest.raises(ValueError, match="'cuda'"), kernels.cpu_backend("cuda"):
        pass
    monkeypatch.setattr(dispatch, "_INTERPRETER", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"), kernels.cpu_backend("triton"):
        pass
