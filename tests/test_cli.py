"""The hf-fp8cache command on the embedded model (fully offline)."""

import json
import re

import pytest
from helpers import write_checkpoint

from hf_fp8cache import KVScales
from hf_fp8cache.benchmark import available_caches
from hf_fp8cache.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.mark.slow
def test_generate_on_embedded_model_reports_half_the_kv_bytes(capsys, torch_path):
    assert main(["generate", "--max-new-tokens", "6", "--scales", "dynamic", "--strategy", "attn_head"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"KV cache: (\d+) tokens, ([\d,]+) bytes in FP8 vs ([\d,]+) bytes in bf16 \((\S+)x\)", out)
    assert match, out
    tokens, fp8, bf16 = int(match[1]), int(match[2].replace(",", "")), int(match[3].replace(",", ""))
    # SmolLM2: 30 layers x K and V x 3 KV heads x head dim 64, one byte each, plus 3 fp32 scales a tensor
    assert fp8 == tokens * 30 * 2 * 3 * 64 + 30 * 2 * 3 * 4
    assert bf16 == tokens * 30 * 2 * 3 * 64 * 2
    assert "generated tokens identical" in out


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'fp6'"):
        main(["generate", "--kv-cache-dtype", "fp6"])


@pytest.mark.slow
def test_generate_with_checkpoint_scales(tmp_path, capsys, torch_path):
    scales = KVScales([[0.02, 0.03, 0.04]] * 30, [[0.01, 0.02, 0.005]] * 30, "attn_head")  # SmolLM2: 30 x 3 heads
    scales.save_pretrained(tmp_path)
    args = ["generate", "--max-new-tokens", "4", "--scales", str(tmp_path), "--no-compare", "--residual-length", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "attn_head" in out
    match = re.search(r"KV cache: (\d+) tokens, ([\d,]+) bytes in FP8 \(with the 4 most recent a layer exact\)", out)
    assert match, out
    # 30 layers x K and V x 3 heads x 64: one byte a token, plus 4 exact tokens in fp32 (CPU), plus 3 scales a tensor
    assert int(match[2].replace(",", "")) == int(match[1]) * 30 * 2 * 3 * 64 + 30 * 2 * 3 * 64 * 4 * 4 + 30 * 2 * 3 * 4
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        main(["generate", "--scales", str(tmp_path / "missing")])


def test_inspect_prints_scheme_table_and_verdict(tmp_path, capsys):
    write_checkpoint(tmp_path / "good", layers=3, strategy="attn_head", q_scale=1e28)
    assert main(["inspect", str(tmp_path / "good")]) == 0
    out = capsys.readouterr().out
    assert "compressed-tensors, strategy attn_head, 3 layers, 2 KV heads" in out
    assert out.count("\n") >= 5 and "usable: KVScales(layers=3" in out and "(with q scales)" not in out
    assert out.count("1e+28  BAD") == 3  # garbage q_scale flagged, and not used
    write_checkpoint(tmp_path / "bad", layers=3, skip_layers=(2,))
    assert main(["inspect", str(tmp_path / "bad")]) == 1
    out = capsys.readouterr().out
    assert "missing" in out and "NOT USABLE" in out and "[2]" in out


@pytest.mark.slow
def test_calibrate_then_eval_on_local_data(tmp_path, capsys, torch_path):
    from hf_fp8cache import load_kv_scales

    (tmp_path / "data.txt").write_text(
        "\n\n".join(f"Paragraph {i} talks about caches, keys and values." for i in range(6))
    )
    args = ["calibrate", "--dataset", str(tmp_path / "data.txt"), "--num-samples", "4", "--max-seq-len", "64",
            "--strategy", "attn_head", "--scales-only", "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 0
    scales = load_kv_scales(tmp_path / "out")
    assert scales.num_layers == 30 and scales.num_heads == 3  # SmolLM2
    assert (
        main(
            [
                "eval",
                "--scales",
                str(tmp_path / "out"),
                "--sequences",
                "1",
                "--seq-len",
                "136",
                "--prefix",
                "128",
                "--step",
                "4",
                "--formats",
                "fp8",
                "--residual-lengths",
                "0,8",
                "--calibration-samples",
                "2",
                "--calibration-seq-len",
                "32",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("e4m3fn")]
    # unit, 2 on-the-fly, 4 calibrated, checkpoint; then the same with an exact window of 8 tokens
    assert len(rows) == 16 and rows[7].startswith("e4m3fn checkpoint ")
    assert rows[8].startswith("e4m3fn unit +8 exact ") and rows[15].startswith("e4m3fn checkpoint +8 exact ")


def test_bench_passes_its_options_through(tmp_path, capsys, torch_path):
    assert main(["bench", "--model-shape", "tiny", "--device", "cpu", "--cases", "1x16", "--steps", "1",
                 "--warmup", "0", "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "decode_benchmark.json").read_text())
    kinds = [r["cache"] for r in rows]
    assert kinds[:3] == ["dynamic", "fp8", "fp8+attn"] and kinds == list(available_caches())
    # 17 tokens x 2 layers x (K, V) x 2 KV heads x d=16 = 2176 FP8 bytes + 16 of scales, over 4352 bf16 bytes
    assert rows[1]["kv_ratio_vs_dynamic"] == pytest.approx((2176 + 16) / 4352)
    if "hf-quantized-fp8" in kinds:  # transformers >= 5.21: its fp8 cache holds the same bytes, per-tensor scales
        assert rows[3]["kv_ratio_vs_dynamic"] == pytest.approx((2176 + 16) / 4352)
    assert "1x16" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["generate", "--no-such-option"])
