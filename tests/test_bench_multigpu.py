"""The multi-GPU benchmark's arithmetic and table, on CPU (its measurements run on the two-GPU machine)."""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import torch

from hf_fp8cache.bench import MODES, multigpu
from hf_fp8cache.bench.multigpu import (
    add_ratios,
    estimated_batch,
    fp8_capacity_tokens,
    kv_bytes_per_sequence,
    largest_fitting_batch,
    table_lines,
)


def test_kv_bytes_of_the_8b_shape_match_the_issue():
    # 32 layers x (K, V) x 8 KV heads x d=128 x 32768 tokens: 4.3 GB in bf16, 2.1 GB in FP8
    assert kv_bytes_per_sequence("llama-3.1-8b", 32768, 2) == 2 * 32 * 8 * 128 * 32768 * 2 == 4_294_967_296
    assert kv_bytes_per_sequence("llama-3.1-8b", 32768, 1) == 2_147_483_648
    assert kv_bytes_per_sequence("tiny", 10, 1) == 2 * 2 * 2 * 16 * 10


def test_fp8_capacity_follows_the_layers_amortized_growth():
    assert fp8_capacity_tokens(32768, 32768) == 32768  # a multiple of 256: no spare
    assert fp8_capacity_tokens(32768, 32801) == 32768 + 2048  # one growth by 1/16
    assert fp8_capacity_tokens(100, 100) == 256
    assert fp8_capacity_tokens(256, 300) == 512  # 256 + 16, rounded up to the step


def test_estimated_batch_leaves_a_reserve_and_is_at_least_one():
    per_sequence = kv_bytes_per_sequence("llama-3.1-8b", 32801, 2)
    assert estimated_batch(125 * 2**30, per_sequence) == 29  # 125 GiB free x 0.94 / 4.3 GB
    assert estimated_batch(125 * 2**30, per_sequence, reserve_fraction=0) == 31
    assert estimated_batch(10, per_sequence) == 1


def test_largest_fitting_batch_verifies_the_estimate_and_its_neighbours():
    fits_up_to = lambda limit: lambda batch: batch <= limit
    assert largest_fitting_batch(fits_up_to(29), 29) == (29, [(29, True), (30, False)])
    assert largest_fitting_batch(fits_up_to(31), 29) == (31, [(29, True), (30, True), (31, True), (32, False)])
    assert largest_fitting_batch(fits_up_to(27), 29) == (27, [(29, False), (28, False), (27, True)])
    assert largest_fitting_batch(fits_up_to(0), 3) == (None, [(3, False), (2, False), (1, False)])
    batch, tried = largest_fitting_batch(fits_up_to(100), 29, max_tries=3)  # bounded: the best seen
    assert (batch, len(tried)) == (31, 3)


def test_ratios_and_table():
    rows = [{"part": "capacity-1gpu", "config": "dynamic", "batch": 29, "L": 32768, "ms_per_token": 40.0,
             "tokens_per_s": 725.0, "peak_bytes_per_gpu": [120 * 2**30]},
            {"part": "capacity-1gpu", "config": "fp8+attn", "batch": 55, "L": 32768, "ms_per_token": 50.0,
             "tokens_per_s": 1100.0, "peak_bytes_per_gpu": [121 * 2**30]},
            {"part": "tp2", "config": "dynamic", "batch": 8, "L": 32768, "ms_per_token": None, "tokens_per_s": None,
             "peak_bytes_per_gpu": None, "status": "failed (torchrun exit 1)"}]  # fmt: skip
    add_ratios(rows)
    assert rows[1]["batch_vs_dynamic"] == 55 / 29 and rows[1]["tokens_per_s_vs_dynamic"] == 1100 / 725
    assert rows[0]["ms_per_token_vs_dynamic"] == 1.0 and rows[2]["ms_per_token_vs_dynamic"] is None
    lines = table_lines(rows)
    assert lines[2] == ["capacity-1gpu", "fp8+attn", "55x32768", "50.00", "1.250", "1100.0", "1.517", "121.0", "ok"]
    assert lines[3][-2:] == ["-", "failed (torchrun exit 1)"]
    assert "multigpu" in MODES


def test_tp_part_cut_by_its_timeout_keeps_the_finished_rows(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text("{}")  # a saved checkpoint: nothing is built
    first = next(iter(multigpu.TP_CONFIGS))

    def cut_after_one_configuration(command, **kwargs):  # the rank wrote one row, then the timeout struck
        Path(command[-1]).write_text(json.dumps([{"part": "tp2", "config": first, "status": "ok"}]))
        raise subprocess.TimeoutExpired(command, kwargs["timeout"], stderr=b"compiling \xe2\x96\x88")

    monkeypatch.setattr(multigpu.subprocess, "run", cut_after_one_configuration)
    args = SimpleNamespace(checkpoint_dir=str(tmp_path), model_shape="tiny", tp_batch=1, length=8, new_tokens=2,
                           tp_timeout=7)  # fmt: skip
    rows = multigpu._run_tp(args, torch.device("cpu"), torch.float32)
    assert [row["config"] for row in rows] == list(multigpu.TP_CONFIGS)
    assert [row["status"] for row in rows] == ["ok"] + ["failed (torchrun over 7 s)"] * (len(rows) - 1)
    assert "compiling \u2588" in capsys.readouterr().err  # the ranks' output, decoded
