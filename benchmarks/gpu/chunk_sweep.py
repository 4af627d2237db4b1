"""Issue 17 tuning sweep on the GPU: our kernel over a query chunk of an FP8 history at the prefill benchmark's shapes
(B = 8, 32 query / 8 KV heads, D = 128, bf16), with its launch knobs varied one at a time from the default plan.

    python benchmarks/gpu/chunk_sweep.py OUT_DIR [--cases 32768x17,32768x2048] [--budget-s 150]

Each line: case, the knobs changed, the plan launched, us (``triton.testing.do_bench``: CUDA events, median over
~50 ms of calls), and the ratio to the default plan. Rows go to OUT_DIR/chunk_sweep.json after every case, so a run
cut short keeps what it measured; variants stop when the time budget runs out. What the numbers decide: the split
target for chunk tiles (``_CHUNK_PROGRAMS_PER_SM``), the tile (``block_rows``) and keys a step, warps, stages.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton.testing
from hf_fp8cache.kernels.attention import decode_attention, plan_decode_attention

from hf_fp8cache.bench.common import environment, parse_cases
from hf_fp8cache.bench.prefill import make_chunk

VARIANTS = (
    {},
    {"num_splits": 1}, {"num_splits": 2}, {"num_splits": 4}, {"num_splits": 8}, {"num_splits": 16},
    {"block_m": 64}, {"block_m": 64, "num_warps": 4},
    {"block_n": 32}, {"block_n": 128},
    {"num_warps": 4},
    {"num_stages": 2}, {"num_stages": 4},
    {"block_n": 128, "num_stages": 2},
)  # fmt: skip


def sweep_case(history: int, new: int, sm_count: int, deadline: float, env: dict) -> list[dict]:
    """Every variant of one ``history x new`` case still started before ``deadline``: its rows."""
    device = torch.device("cuda")
    chunk = make_chunk(8, 32, 8, 128, history, new, torch.bfloat16, device)
    start = torch.zeros(8, dtype=torch.int32, device=device)
    rows: list[dict] = []
    default_us = None
    for knobs in VARIANTS:
        if time.monotonic() > deadline:
            print(f"  budget spent: {history}x{new} {knobs} not run")
            continue
        plan_knobs = {k: v for k, v in knobs.items() if k != "num_stages"}
        plan = plan_decode_attention(8, 8, 4, new, 128, chunk.kv_length, None, sm_count, **plan_knobs)

        def call(knobs=knobs):
            return decode_attention(chunk.query, chunk.key_bytes, chunk.value_bytes, chunk.kv_length, start,
                                    chunk.scale, chunk.scale, chunk.fmt, 128**-0.5, **knobs)  # fmt: skip

        try:
            us = triton.testing.do_bench(call, rep=50, return_mode="median") * 1e3
        except Exception as failure:  # noqa: BLE001 -- a variant that does not compile: say so, go on
            print(f"  {history}x{new} {knobs}: failed ({type(failure).__name__}: {str(failure)[:100]})")
            continue
        default_us = default_us or us
        described = f"{plan.block_m}x{plan.block_n} w{plan.num_warps} s{plan.splits} t{plan.row_tiles}"
        rows.append({"case": f"{history}x{new}", "knobs": knobs, "plan": described, "us": us,
                     "vs_default": us / default_us, **env})  # fmt: skip
        print(f"{history}x{new}  {json.dumps(knobs):40s} {described:22s} {us:9.1f} us  {us / default_us:5.2f}x")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--cases", default="32768x17,32768x64,32768x512,32768x2048")
    parser.add_argument("--budget-s", type=float, default=150.0)
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    env = environment(device)
    rows: list[dict] = []
    deadline = time.monotonic() + args.budget_s
    for history, new in parse_cases(args.cases):
        rows += sweep_case(history, new, sm_count, deadline, env)
        (out / "chunk_sweep.json").write_text(json.dumps(rows, indent=1))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
