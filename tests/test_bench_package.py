"""The benchmark wing's command (``hf-fp8cache bench [MODE]``); who may import it is in test_imports.py."""

import json

import helpers
import pytest

from hf_fp8cache.bench import MODES
from hf_fp8cache.bench import main as bench_main
from hf_fp8cache.bench.forward_loop import available_caches
from hf_fp8cache.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture
def quick_cpu():
    with helpers.quick_cpu():
        yield


def test_modes_and_bad_arguments_are_named(capsys):
    bench_main(["--help"])
    out = capsys.readouterr().out
    assert all(f"  {mode} " in out for mode in MODES)
    with pytest.raises(SystemExit):
        main(["bench", "atention"])
    assert "unknown benchmark 'atention'; choose from generate, forward-loop" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main(["generate", "--cases", "8by4"])
    assert "cases must look like 1x4096,8x16384 (batch x tokens, each >= 1), got '8by4'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_main(["forward-loop", "--new-tokens", "4"])  # an option of another mode
    assert "unrecognized arguments: --new-tokens 4" in capsys.readouterr().err


def test_bench_command_runs_generate_by_default(tmp_path, capsys, quick_cpu):
    assert main(["bench", "--configs", "dynamic,fp8", "--cases", "1x8", "--new-tokens", "2", "--device", "cpu",
                 "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "generate_benchmark.json").read_text())
    assert [r["config"] for r in rows] == ["dynamic", "fp8"] and rows[0]["model_shape"] == "tiny"
    assert rows[1]["kv_bytes"] == 2 * 2 * 2 * 10 * 16 + 16  # 2 layers x (K, V) x 2 KV heads x 10 tokens x d=16 + scales
    assert "model.generate, greedy, 2 new tokens" in capsys.readouterr().out


def test_forward_loop_passes_its_options_through(tmp_path, capsys, quick_cpu):
    assert main(["bench", "forward-loop", "--model-shape", "tiny", "--device", "cpu", "--cases", "1x16", "--steps",
                 "1", "--warmup", "0", "--out-dir", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "forward_loop_benchmark.json").read_text())
    kinds = [r["cache"] for r in rows]
    assert kinds[:3] == ["dynamic", "fp8", "fp8+attn"] and kinds == list(available_caches())
    # 17 tokens x 2 layers x (K, V) x 2 KV heads x d=16 = 2176 FP8 bytes + 16 of scales, over 4352 bf16 bytes
    assert rows[1]["kv_ratio_vs_dynamic"] == pytest.approx((2176 + 16) / 4352)
    if "hf-quantized-fp8" in kinds:  # transformers >= 5.21: its fp8 cache holds the same bytes, per-tensor scales
        assert rows[3]["kv_ratio_vs_dynamic"] == pytest.approx((2176 + 16) / 4352)
    assert "bare forward loop (no generate)" in capsys.readouterr().out
