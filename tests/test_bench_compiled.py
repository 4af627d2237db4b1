"""The compiled benchmark's checks and report (its timings need a CUDA GPU: the device machine runs them)."""

import json

import pytest
import torch

from hf_fp8cache.bench.compiled import print_table, run_compiled_benchmark, save_rows


def test_bad_settings_and_no_gpu_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="steps >= 1 and warmup >= 2"):
        run_compiled_benchmark(steps=0, out_dir=tmp_path)
    with pytest.raises(ValueError, match="steps >= 1 and warmup >= 2"):
        run_compiled_benchmark(warmup=1, out_dir=tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            run_compiled_benchmark(out_dir=tmp_path)


def _row(cache: str, synced: float, pipelined: float, floor: float) -> dict:
    return {"case": "8x32768", "B": 8, "L": 32768, "cache": cache, "gpu_ms_median": synced, "wall_ms_median": synced,
            "pipelined_ms": pipelined, "compile_s": 40.0, "recompiles": 0, "floor_ms": floor,
            "vs_floor": synced / floor, "pipelined_vs_floor": pipelined / floor, "model_shape": "llama-3.1-8b",
            "steps": 20, "warmup": 3, "copy_tb_s": 4.24, "gpu": "test", "torch": "t", "transformers": "tf",
            "triton": "tr", "git_sha": "abc"}  # fmt: skip


def test_table_gives_synced_and_pipelined_times_and_ratios(tmp_path, capsys):
    rows = [_row("bf16-static", 80.0, 64.0, 16.0), _row("fp8-static", 12.0, 10.0, 8.0)]
    print_table(rows)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("8x32768"))
    # bf16 80 / 64 ms over a 16 ms floor; fp8 12 / 10 ms over 8 ms; fp8 / bf16 = 0.15 synced, 0.15625 pipelined
    for cell in ("80.00 / 64.00", "5.00 / 4.00", "12.00 / 10.00", "1.50 / 1.25", "0.150 / 0.156"):
        assert cell in line
    save_rows(rows, tmp_path)
    assert json.loads((tmp_path / "compiled_benchmark.json").read_text()) == rows
    assert (tmp_path / "compiled_benchmark.csv").read_text().splitlines()[0].startswith("case,B,L,cache")
