"""One layer's decode-step cache update on the GPU: FP8 (quantize 1 token + dequantize the history) against
transformers' ``DynamicLayer`` (``torch.cat`` of the history).

Per (B, L): random K/V ``[B, H, L, D]`` prefilled, one warm-up update (compiles the kernels), then ``iters`` timed
one-token updates, CUDA events around each after ~1 ms of GPU spin (so the launches queue up and the events time
the GPU, not the host); the median, and the bytes an update must move over it. Writes ``layer_update.json``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from ..cache import FP8Cache
from .common import cases_argument, write_rows

__all__ = ["LAYER_KINDS", "run_layer_benchmark", "add_arguments", "run"]

LAYER_KINDS = ("dynamic", "fp8")


def _updater(kind: str):
    if kind == "fp8":
        store = FP8Cache()
        return lambda x: store.update(x, x, 0)
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    return lambda x: layer.update(x, x)


def run_layer_benchmark(
    cases: tuple[tuple[int, int], ...] = ((1, 4096), (8, 8192)), heads: int = 8, head_dim: int = 128, iters: int = 50,
    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, out_dir: str | Path = "results",
) -> list[dict[str, Any]]:  # fmt: skip
    """Time both layers' decode-step updates at every ``(B, L)``; print, save and return the rows."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"the layer benchmark times CUDA events and needs a CUDA device, got {device!r}")
    rows: list[dict[str, Any]] = []
    for B, L in cases:
        prompt = torch.randn(B, heads, L, head_dim, device=dev, dtype=dtype)
        steps = torch.randn(iters, B, heads, 1, head_dim, device=dev, dtype=dtype)
        for kind in LAYER_KINDS:
            update = _updater(kind)
            update(prompt)  # prefill
            update(steps[0])  # warm-up (compiles the kernels on first use)
            times = []
            for x in steps:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda._sleep(2_000_000)  # ~1 ms of GPU spin so the launches queue up: events time the GPU only
                start.record()
                update(x)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            us = statistics.median(times)
            history = B * heads * (L + iters) * head_dim
            bytes_moved = 2 * history * (1 + dtype.itemsize) if kind == "fp8" else 2 * history * 2 * dtype.itemsize
            rows.append({"case": f"{B}x{L}", "B": B, "L": L, "cache": kind, "update_us_median": us,
                         "bytes_per_update": bytes_moved, "tb_per_s": bytes_moved / us / 1e6})  # fmt: skip
    print_table(rows, heads, head_dim, dtype, iters)
    write_rows(rows, out_dir, "layer_update")
    return rows


def print_table(rows: list[dict[str, Any]], heads: int, head_dim: int, dtype: torch.dtype, iters: int) -> None:
    print(f"one layer's decode-step cache update ({heads} KV heads, d={head_dim}, {dtype}), median of {iters}")
    print(f"{'case':>8} {'dynamic us':>11} {'fp8 us':>9} {'fp8/dyn':>8} {'fp8 TB/s':>9}")
    for case in dict.fromkeys(r["case"] for r in rows):
        dyn, fp8 = (next(r for r in rows if r["case"] == case and r["cache"] == kind) for kind in LAYER_KINDS)
        ratio = fp8["update_us_median"] / dyn["update_us_median"]
        print(f"{case:>8} {dyn['update_us_median']:>11.1f} {fp8['update_us_median']:>9.1f} {ratio:>8.3f} "
              f"{fp8['tb_per_s']:>9.2f}")  # fmt: skip


def add_arguments(parser) -> None:
    parser.add_argument("--cases", type=cases_argument, default=((1, 4096), (8, 8192)), help="e.g. 1x4096,8x8192")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--out-dir", default="results")


def run(args) -> list[dict[str, Any]]:
    return run_layer_benchmark(args.cases, iters=args.iters, device=args.device, dtype=getattr(torch, args.dtype),
                               out_dir=args.out_dir)  # fmt: skip
