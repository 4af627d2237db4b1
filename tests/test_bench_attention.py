"""The decode-attention kernel benchmark's report (its timings need a CUDA GPU: the device machine runs them)."""

import json

import pytest
import torch

from hf_fp8cache.bench.attention import print_table, run_attention_benchmark, save_rows


def test_report_gives_the_speedup_and_writes_its_rows(tmp_path, capsys):
    row = {"case": "8x32768", "B": 8, "L": 32768, "us": 160.0, "bytes": 537_000_000, "tb_s": 3.36,
           "ceiling_tb_s": 4.24, "fp8_rel_error": 2.8e-3, "gpu": "test"}  # fmt: skip
    rows = [{**row, "variant": "fp8"}, {**row, "variant": "sdpa-cudnn", "us": 240.0}]
    print_table(rows)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("8x32768"))
    assert line.split()[-2] == "1.50x"  # best bf16 240 us over fp8 160 us
    save_rows(rows, tmp_path)
    assert json.loads((tmp_path / "attention_benchmark.json").read_text()) == rows
    assert (tmp_path / "attention_benchmark.csv").read_text().splitlines()[0].startswith("case,B,L,us")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_it_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="attention benchmark .* needs a CUDA GPU"):
        run_attention_benchmark(out_dir=tmp_path)
