"""What every benchmark shares: provenance and the rows it writes (the timings themselves run on the GPU machine)."""

import json
import subprocess
from pathlib import Path

from hf_fp8cache.benchmark import git_revision


def test_rows_name_the_code_they_measured():
    # HEAD's sha, marked when tracked files differ from it; "unknown" outside a checkout
    repo = Path(__file__).parent
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True)
    if head.returncode != 0:
        assert git_revision() == "unknown"
        return
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    assert git_revision() == head.stdout.strip() + ("+dirty" if status.strip() else "")


def test_attention_report_writes_its_rows(tmp_path, capsys):
    from hf_fp8cache.benchmark_attention import _report

    row = {"case": "8x32768", "B": 8, "L": 32768, "us": 160.0, "bytes": 537_000_000, "tb_s": 3.36,
           "ceiling_tb_s": 4.24, "fp8_rel_error": 2.8e-3, "gpu": "test"}  # fmt: skip
    rows = [{**row, "variant": "fp8"}, {**row, "variant": "sdpa-cudnn", "us": 240.0}]
    _report(rows, tmp_path)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("8x32768"))
    assert line.split()[-2] == "1.50x"  # best bf16 240 us over fp8 160 us
    assert json.loads((tmp_path / "attention_benchmark.json").read_text()) == rows
    assert (tmp_path / "attention_benchmark.csv").read_text().splitlines()[0].startswith("case,B,L,us")
