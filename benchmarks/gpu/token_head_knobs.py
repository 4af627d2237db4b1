"""Issue 18: the per-token-head decode kernel at 8x32768 (32 q / 8 KV heads, d=128, bf16 queries) beside the
per-tensor kernel of the same run, CUDA-graph replay, median: the default launch, a few launch knobs overridden, and
the launch a decode step of ``FP8Cache`` makes (``new``: the step's own K/V quantized and written by the attention
launch itself; on 2026-12-03 it cost 170.7 us e4m3 and 189.6 us int8 against 157.2 / 187.7 without).

    python benchmarks/gpu/token_head_knobs.py OUT_DIR     (nvidia-h200, ~90 s) -> OUT_DIR/token_head_knobs.json
"""

import functools
import json
import sys
from pathlib import Path

import torch
import triton.testing
from hf_fp8cache.kernels import NewTokens, quantize_append_kv, quantize_append_token_head
from hf_fp8cache.kernels.attention import decode_attention  # the kernel's launcher: it takes the launch knobs

from hf_fp8cache.formats import INT8, resolve_format

KNOBS = [{}, {"block_n": 16, "num_warps": 1}, {"block_n": 32, "num_warps": 2}, {"block_n": 64, "num_warps": 4}]


def main(out_dir: Path, B: int = 8, L: int = 32768) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, new_k, new_v = (torch.randn(B, heads, S, 128, device="cuda", dtype=torch.bfloat16, generator=g)
                             for heads, S in ((32, 1), (8, L), (8, L), (8, 1), (8, 1)))  # fmt: skip
    start = torch.zeros(B, dtype=torch.int32, device="cuda")
    fmt = resolve_format("fp8")
    scale = torch.full((1,), 4.0 / fmt.max, device="cuda")
    codes = [torch.empty(B, 8, L, 128, dtype=torch.uint8, device="cuda") for _ in "kv"]
    quantize_append_kv(k, v, *codes, 0, 1.0 / scale, 1.0 / scale, fmt)

    def time_us(fn) -> float:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3

    rows = []

    def record(name: str, scales: str, knobs: str, us: float) -> None:
        rows.append({"codes": name, "scales": scales, "knobs": knobs, "us": us, "vs_per_tensor": us / rows[0]["us"]
                     if rows else 1.0})  # fmt: skip
        print(f"{name:5s} {scales:18s} {knobs:36s} {us:7.1f} us {rows[-1]['vs_per_tensor']:5.2f}x per tensor",
              flush=True)  # fmt: skip

    record("e4m3", "per tensor", "{}", time_us(lambda: decode_attention(q, *codes, L, start, scale, scale, fmt,
                                                                          128**-0.5)))  # fmt: skip
    new = NewTokens(new_k, new_v, 1.0 / scale, 1.0 / scale)
    record("e4m3", "per tensor", "new token", time_us(lambda: decode_attention(q, *codes, L, start, scale, scale, fmt,
                                                                                 128**-0.5, new=new)))  # fmt: skip
    for name, codes_format in (("e4m3", fmt), ("int8", INT8)):
        scales = [torch.empty(B, 8, L, dtype=torch.bfloat16, device="cuda") for _ in "kv"]
        quantize_append_token_head(k, v, *codes, *scales, 0, codes_format)
        for knobs in KNOBS:
            attend = functools.partial(decode_attention, q, *codes, L, start, *scales, codes_format, 128**-0.5, **knobs)
            record(name, "per token and head", json.dumps(knobs), time_us(attend))
        attend = functools.partial(decode_attention, q, *codes, L, start, *scales, codes_format, 128**-0.5, new=new)
        record(name, "per token and head", "new token", time_us(attend))
    (out_dir / "token_head_knobs.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
