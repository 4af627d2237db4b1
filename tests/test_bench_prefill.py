"""The prefill benchmark (issue 17) on CPU: its tiny run gives every column, and our kernel run over a whole chunk
(Sq = q, more query rows than one row tile) computes what the path before it computed: dequantize + SDPA with
transformers' mask. Its timings are the GPU's (``benchmarks/gpu/issue17_check.sh``)."""

import json

import pytest
import torch
from hf_fp8cache.kernels import uses_triton

from hf_fp8cache.bench import main as bench_main
from hf_fp8cache.bench.prefill import columns, make_chunk, run_prefill_benchmark, transformers_mask

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

COLUMNS = ("sdpa_mask_us", "best_backend_us", "best_backend", "dequant_sdpa_us", "kernel_us", "fp8_read_floor_us",
           "flop_floor_us", "best_backend_vs_mask", "dequant_sdpa_vs_mask", "kernel_vs_mask", "kernel_vs_best_backend",
           "kernel_vs_read_floor", "kernel_max_abs_diff", "kernel_fp8q_us", "kernel_fp8q_vs_best_backend",
           "kernel_fp8q_max_abs_diff")  # fmt: skip
# fp32 on CPU, measured: kernel vs dequantize + SDPA at most 2.1e-7 (96x3) and 6.0e-7 (96x80): the same FP8 bytes,
# the scale folded into the logits and the output instead of into K and V, so a few fp32 roundings of outputs below
# 1 apart. 2e-6 leaves 3.3x of that; no causal mask inside the chunk is off by 0.54 (the third test).
FP32_TOLERANCE = 2e-6
# bf16, measured: 3.9e-3 in both cases, one bf16 ulp in [0.5, 1) (SDPA reads K/V dequantized to bf16, 2^-9
# relative; the kernel reads the exact fp8 * scale and rounds only its output). Two ulps there: 2^-7.
BF16_TOLERANCE = 2**-7
# FP8 queries against dequantize + SDPA, measured (torch twin, 2026-12-02): 0.017 (96x3) and 0.036 (96x80), the
# e4m3 roundings of the queries and probabilities: above float noise, bounded.
FP8_QUERY_BAND = (1e-3, 0.08)


def test_cpu_run_gives_every_column_and_writes_its_rows(tmp_path, capsys):
    rows = bench_main(["prefill", "--device", "cpu", "--repeats", "1", "--out-dir", str(tmp_path)])
    assert [r["case"] for r in rows] == ["96x3", "96x80"]
    # 2 x 80 = 160 query rows a KV head: two chunk tiles of 128 (128 x 64 elements: four warps) over 64 keys a step
    # (fp32 queries), 3 splits (one a key block of the 176); 3 queries: one decode tile of 16 rows. (The torch twin,
    # without the interpreter: no plan.)
    plans = ["16x64 w4 s2 t1", "128x64 w4 s3 t2"] if uses_triton(torch.empty(0)) else [None, None]
    assert [r["kernel_plan"] for r in rows] == plans
    for r in rows:
        assert all(r[key] is not None for key in COLUMNS), r
        assert r["best_backend"].split("+")[0] in ("flash", "efficient", "cudnn")
        assert r["kernel_max_abs_diff"] <= FP32_TOLERANCE and r["backend_max_abs_diff"] <= FP32_TOLERANCE
        assert r["kernel_vs_mask"] == pytest.approx(r["kernel_us"] / r["sdpa_mask_us"])
        assert r["kernel_vs_best_backend"] == pytest.approx(r["kernel_us"] / r["best_backend_us"])
        assert FP8_QUERY_BAND[0] < r["kernel_fp8q_max_abs_diff"] < FP8_QUERY_BAND[1]
        # B=1, Hq=4, H=2, D=64: 4 * 1 * 4 * q * (96 + q) * 64 FLOPs at 900 TFLOP/s; 2 * 2 * (96 + q) * 64 FP8 bytes
        assert r["flop_floor_us"] == pytest.approx(4 * 4 * r["q"] * (96 + r["q"]) * 64 / 900e12 * 1e6)
        assert r["fp8_read_floor_us"] == pytest.approx(4 * (96 + r["q"]) * 64 / (r["copy_tb_s"] * 1e6))
        assert r["gpu"] == "cpu" and r["dtype"] == "float32"
    assert json.loads((tmp_path / "prefill_benchmark.json").read_text()) == rows
    assert (tmp_path / "prefill_benchmark.csv").read_text().startswith("case,L,q,B,heads")
    out = capsys.readouterr().out
    assert "prefill over an FP8 history, cpu" in out
    assert any(line.strip().startswith("96x80") for line in out.splitlines())


def test_the_mask_is_transformers_bottom_right_causal_one():
    mask = transformers_mask(2, 5, 3, "cpu")
    expected = torch.ones(3, 8, dtype=torch.bool).tril(diagonal=5)  # row i (position 5 + i) sees keys 0 .. 5 + i
    assert mask.shape == (2, 1, 3, 8) and torch.equal(mask[1, 0], expected)


def test_the_kernel_over_a_long_bf16_chunk_matches_dequantize_plus_sdpa_and_the_check_has_teeth():
    chunk = make_chunk(1, 4, 2, 64, 96, 80, torch.bfloat16, torch.device("cpu"))
    calls = columns(chunk)
    kernel, today = calls["kernel"]().float(), calls["dequant_sdpa"]().float()
    assert (kernel - today).abs().max().item() <= BF16_TOLERANCE
    # without the causal mask inside the chunk the same SDPA is far off: the tolerance above would catch it
    chunk.mask = torch.ones_like(chunk.mask)
    assert (kernel - calls["dequant_sdpa"]().float()).abs().max().item() > 20 * BF16_TOLERANCE


def test_bad_settings_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        run_prefill_benchmark(repeats=0, device="cpu", out_dir=tmp_path)
    with pytest.raises(ValueError, match="heads must be a multiple of kv_heads"):
        run_prefill_benchmark(device="cpu", heads=3, kv_heads=2, out_dir=tmp_path)
    with pytest.raises(ValueError, match="cases must be"):
        run_prefill_benchmark(cases=[(96, 0)], device="cpu", out_dir=tmp_path)
