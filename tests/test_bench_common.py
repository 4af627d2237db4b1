"""What every benchmark shares: provenance, the model, the cases, the rows it writes."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from hf_fp8cache.bench.common import build_model, git_revision, parse_cases, sdpa_backend, write_rows


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


def test_cases_parse_and_bad_ones_are_named():
    assert parse_cases("1x4096,8X16384,") == ((1, 4096), (8, 16384))
    for bad in ("", "8by4", "1x", "0x16", "2x-1", "1x4096,x"):
        with pytest.raises(ValueError, match=f"cases must look like 1x4096,8x16384 .*got {bad!r}"):
            parse_cases(bad)


def test_rows_of_different_keys_share_one_csv(tmp_path):
    rows = [{"case": "1x16", "ms": 1.5}, {"case": "1x16", "status": "OOM"}]
    write_rows(rows, tmp_path / "new", "stem")
    assert json.loads((tmp_path / "new" / "stem.json").read_text()) == rows
    assert (tmp_path / "new" / "stem.csv").read_text().splitlines() == ["case,ms,status", "1x16,1.5,", "1x16,,OOM"]


def test_model_shapes_and_sdpa_backends_are_checked_by_name():
    model = build_model("tiny", torch.device("cpu"), torch.bfloat16)
    assert model.config.num_hidden_layers == 2 and model.config.head_dim == 16 and not model.training
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="model_shape must be one of .*got 'llama-7b'"):
        build_model("llama-7b", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match=r"sdpa backend must be one of \('flash', .*got 'fast'"):
        sdpa_backend("fast")
    with sdpa_backend("math"):  # a real backend pins torch SDPA for the block
        q = torch.randn(1, 2, 3, 4)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
