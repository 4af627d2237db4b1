"""Per-token-head scales (kernels/token_head.py, issue 18): the Triton kernels (interpreter here, compiled on the GPU
machine) write exactly the bytes of their torch twins, for int8 and the fp8 formats."""

import pytest
import torch
from helpers import assert_equal
from hf_fp8cache.kernels import reference, token_head

from hf_fp8cache import kernels
from hf_fp8cache.formats import FORMATS, INT8

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow notes inside the interpreter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CODECS = [INT8, FORMATS["e4m3fn"], FORMATS["e5m2"]]


def _states(B, H, S, D, dtype, seed):
    """K/V with magnitudes from 1e-6 to 1e4 per token (a transposed view, as transformers hands them), one all-zero
    token and one of evenly spaced values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, S, D, generator=g) * torch.logspace(-6, 4, S)[torch.randperm(S, generator=g)][:, None]
    x[0, 0, 0] = 0.0
    x[0, -1, -1] = torch.arange(D) - D / 2 + 0.5
    return x.transpose(1, 2).contiguous().transpose(1, 2).to(dtype).to(DEVICE)


def _buffers(B, H, capacity, D):
    codes = [torch.full((B, H, capacity, D), 0x5A, dtype=torch.uint8, device=DEVICE) for _ in range(2)]
    scales = [torch.full((B, H, capacity), 7.0, dtype=torch.bfloat16, device=DEVICE) for _ in range(2)]
    return codes, scales


@pytest.mark.parametrize("fmt", CODECS, ids=["int8", "e4m3fn", "e5m2"])
@pytest.mark.parametrize("dtype, D, S, start", [(torch.float32, 64, 9, 3), (torch.bfloat16, 128, 1, 20),
                                                (torch.float16, 80, 33, 0)])  # fmt: skip
def test_quantize_and_dequantize_equal_their_twins_bit_for_bit(fmt, dtype, D, S, start):
    B, H, capacity = 2, 3, 40
    key, value = _states(B, H, S, D, dtype, seed=S), _states(B, H, S, D, dtype, seed=S + 1)
    (kc, vc), (ks, vs) = _buffers(B, H, capacity, D)
    (kc_ref, vc_ref), (ks_ref, vs_ref) = _buffers(B, H, capacity, D)
    token_head.quantize_append_token_head(key, value, kc, vc, ks, vs, start, fmt)
    reference.quantize_append_token_head_ref(key, value, kc_ref, vc_ref, ks_ref, vs_ref, start, fmt)
    for ours, theirs, what in ((kc, kc_ref, "key codes"), (vc, vc_ref, "value codes")):
        assert_equal(ours, theirs, what)
    for ours, theirs, what in ((ks, ks_ref, "key scales"), (vs, vs_ref, "value scales")):
        assert_equal(ours.view(torch.int16), theirs.view(torch.int16), what)
    assert (kc[:, :, :start] == 0x5A).all() and (kc[:, :, start + S :] == 0x5A).all()  # only [start, start + S)
    length = start + S
    out = [torch.empty(B, H, length, D, dtype=dtype, device=DEVICE) for _ in range(4)]
    token_head.dequantize_token_head(kc, vc, ks, vs, length, fmt, out[0], out[1])
    reference.dequantize_token_head_ref(kc, vc, ks, vs, length, fmt, out[2], out[3])
    assert_equal(out[0], out[2], "keys")
    assert_equal(out[1], out[3], "values")


def test_int8_per_token_head_error_is_half_a_step_and_scales_round_up_to_bf16():
    x = _states(2, 2, 16, 64, torch.float32, seed=5)
    (kc, vc), (ks, vs) = _buffers(2, 2, 16, 64)
    reference.quantize_append_token_head_ref(x, x, kc, vc, ks, vs, 0, INT8)
    scale = ks.float()
    amax = x.abs().amax(-1)
    assert (scale >= amax / 127).all()  # rounded up: no value saturates
    assert (scale[amax > 0] <= amax[amax > 0] / 127 * (1 + 2**-7)).all()  # by less than one bf16 step (2^-7)
    assert (scale[amax == 0] == 2.0**-126).all() and (kc[amax == 0] == 0).all()
    out, _ = torch.empty_like(x), torch.empty_like(x)
    reference.dequantize_token_head_ref(kc, vc, ks, vs, 16, INT8, out, _)
    assert ((out - x).abs() <= scale[..., None] / 2 * (1 + 1e-6)).all()  # round to nearest: at most half a step


@pytest.mark.parametrize(
    "change, message",
    [
        ("fp32_scales", r"per-token-head scales must be contiguous bfloat16 \(2, 3, 8\) .*got torch.float32"),
        ("past_capacity", r"codes \(2, 3, 8, 64\) cannot take \(2, 3, 4, 64\) at position 5"),
        ("float_start", "a start tensor must be one int32/int64 element on .*, got torch.float32"),
        ("short_output", r"output \(2, 3, 7, 64\) must be contiguous \(2, 3, 8, 64\)"),
    ],
)
def test_dispatch_checks_arguments_on_both_paths(change, message):
    x = _states(2, 3, 4, 64, torch.float32, seed=1)
    (kc, vc), (ks, vs) = _buffers(2, 3, 8, 64)
    start = {"past_capacity": 5, "float_start": torch.tensor(0.0, device=DEVICE)}.get(change, 0)
    ks = ks.float() if change == "fp32_scales" else ks
    out = torch.empty(2, 3, 7 if change == "short_output" else 8, 64, device=DEVICE)
    for backend in ("triton", "torch") if DEVICE == "cpu" else ("torch",):
        with pytest.raises(ValueError, match=message), kernels.cpu_backend(backend):
            if change == "short_output":
                kernels.dequantize_token_head(kc, vc, ks, vs, 8, INT8, out, out.clone())
            else:
                kernels.quantize_append_token_head(x, x, kc, vc, ks, vs, start, INT8)


def test_dispatch_runs_the_kernel_and_the_twin_alike():
    x = _states(2, 3, 5, 64, torch.bfloat16, seed=2)
    written = []
    for backend in ("triton", "torch") if DEVICE == "cpu" else ("torch",):
        (kc, vc), (ks, vs) = _buffers(2, 3, 8, 64)
        out = [torch.empty(2, 3, 8, 64, dtype=torch.bfloat16, device=DEVICE) for _ in "kv"]
        with kernels.cpu_backend(backend):
            kernels.quantize_append_token_head(x, x, kc, vc, ks, vs, 3, FORMATS["e4m3fn"])
            kernels.dequantize_token_head(kc, vc, ks, vs, 8, FORMATS["e4m3fn"], *out)
        written.append((kc, ks.view(torch.int16), out[0]))
    scales = written[0][1].view(torch.bfloat16)
    assert (scales[:, :, 3:].float() > 0).all() and (scales[:, :, :3] == 7.0).all()  # written at 3..7 only
    for ours, theirs, what in zip(written[0], written[-1], ("codes", "scales", "dequantized keys")):
        assert_equal(ours, theirs, what)


@pytest.mark.parametrize("fmt", CODECS, ids=["int8", "e4m3fn", "e5m2"])
def test_a_start_read_on_the_device_writes_what_an_int_start_writes(fmt):
    """The static cache's path: the position is a device tensor; tokens past the capacity are dropped (6 + 4 > 8)."""
    x = _states(2, 3, 4, 64, torch.bfloat16, seed=4)
    written = []
    for start, quantize in ((2, token_head.quantize_append_token_head),
                            (torch.tensor(2, device=DEVICE), token_head.quantize_append_token_head),
                            (torch.tensor(2, device=DEVICE), reference.quantize_append_token_head_ref),
                            (torch.tensor(6, device=DEVICE), token_head.quantize_append_token_head),
                            (6, reference.quantize_append_token_head_ref)):  # fmt: skip
        (kc, vc), (ks, vs) = _buffers(2, 3, 8, 64)
        quantize(x, x, kc, vc, ks, vs, start, fmt)
        written.append((kc, vc, ks.view(torch.int16), vs.view(torch.int16)))
    for i, what in enumerate(("key codes", "value codes", "key scales", "value scales")):
        assert_equal(written[1][i], written[0][i], f"device start: {what}")
        assert_equal(written[2][i], written[0][i], f"twin, device start: {what}")
        assert_equal(written[3][i], written[4][i], f"past the capacity: {what}")
    assert (written[3][0][:, :, :6] == 0x5A).all() and not (written[3][0][:, :, 6:] == 0x5A).all()
