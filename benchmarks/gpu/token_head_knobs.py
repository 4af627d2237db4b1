"""Issue 18: the per-token-head decode kernel at 8x32768 (32 q / 8 KV heads, d=128, bf16 queries) with its launch
knobs overridden, beside the per-tensor kernel of the same run. Why: the default one-warp, 32-keys-a-step program
spills with per-token-head scales (255 registers; the per-tensor build does not), and a 16-keys-a-step build does not
spill (ptxas, triton 3.9, sm_90a), so what it costs in loop overhead against what it saves in spills is measured here.

    python benchmarks/gpu/token_head_knobs.py OUT_DIR     (nvidia-h200, ~60 s) -> OUT_DIR/token_head_knobs.json
"""

import functools
import json
import sys
from pathlib import Path

import torch
import triton.testing
from hf_fp8cache.kernels import decode_attention, quantize_append_kv, quantize_append_token_head

from hf_fp8cache.formats import INT8, resolve_format

KNOBS = [{}, {"block_n": 16, "num_warps": 1}, {"block_n": 32, "num_warps": 2}, {"block_n": 16, "num_warps": 2},
         {"block_n": 64, "num_warps": 4}]  # fmt: skip


def main(out_dir: Path, B: int = 8, L: int = 32768) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, heads, S, 128, device="cuda", dtype=torch.bfloat16, generator=g)
               for heads, S in ((32, 1), (8, L), (8, L)))  # fmt: skip
    start = torch.zeros(B, dtype=torch.int32, device="cuda")
    fmt = resolve_format("fp8")
    scale = torch.full((1,), 4.0 / fmt.max, device="cuda")
    codes = [torch.empty(B, 8, L, 128, dtype=torch.uint8, device="cuda") for _ in "kv"]
    quantize_append_kv(k, v, *codes, 0, 1.0 / scale, 1.0 / scale, fmt)

    def time_us(fn) -> float:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3

    per_tensor = time_us(lambda: decode_attention(q, *codes, L, start, scale, scale, fmt, 128**-0.5))
    rows = [{"codes": "e4m3", "scales": "per tensor", "knobs": "{}", "us": per_tensor}]
    for name, codes_format in (("e4m3", fmt), ("int8", INT8)):
        scales = [torch.empty(B, 8, L, dtype=torch.bfloat16, device="cuda") for _ in "kv"]
        quantize_append_token_head(k, v, *codes, *scales, 0, codes_format)
        for knobs in KNOBS:
            attend = functools.partial(decode_attention, q, *codes, L, start, *scales, codes_format, 128**-0.5, **knobs)
            us = time_us(attend)
            rows.append({"codes": name, "scales": "per token and head", "knobs": json.dumps(knobs), "us": us,
                         "vs_per_tensor": us / per_tensor})  # fmt: skip
            print(f"{name:5s} {json.dumps(knobs):36s} {us:7.1f} us {us / per_tensor:5.2f}x per tensor", flush=True)
    (out_dir / "token_head_knobs.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
