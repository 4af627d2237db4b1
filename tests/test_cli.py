"""The hf-fp8cache command on the embedded model (fully offline)."""

import re

import pytest

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
    with pytest.raises(SystemExit, match="not yet supported"):
        main(["generate", "--scales", "org/model-FP8-KV"])
