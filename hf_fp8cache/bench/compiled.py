"""Compiled decode benchmark: ``FP8StaticCache`` + our attention against transformers' ``StaticCache`` in bf16 + SDPA,
both under ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`` (CUDA graphs), on the GPU.

A random-weight Llama (``llama-3.1-8b`` shape by default) prefills random ids ``[B, L]`` eagerly in 2048-token
chunks into each static cache (``max_cache_len = L + warmup + 2 * steps``), then runs ``warmup`` compiled steps (the
first compiles, the next ones record the CUDA graph) and ``steps`` timed ones, twice:

- synced: the host waits for each step (as ``generate`` does, which reads every step's tokens); CUDA events around
  the compiled call, so the GPU time includes the ~1.5 ms the host spends in torch.compile's guards and CUDA-graph
  bookkeeping before the replay starts (H200 host; about the same for both caches);
- pipelined: ``steps`` calls back to back, events around all of them: the GPU time of a step when the host runs
  ahead, i.e. the graph's own time.

Per (B, L, cache): the median synced GPU ms and wall ms, the pipelined GPU ms, the first compiled call's seconds
(compile time), and dynamo's recompiles over the run (graphs beyond the first).

Floors: the bytes a decode step must read at least -- every weight once plus the filled K/V (bf16: 2 bytes an
element, FP8: 1) -- over the copy bandwidth measured in the same run (a large device-to-device copy). Prints a
table with the ratios; writes ``compiled_benchmark.{json,csv,png}``. GPU: ``hf-fp8cache bench compiled``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..attention import ATTENTION_NAME
from ..integration import cache_keyword
from ..static_cache import FP8StaticCache
from .common import (
    LLAMA_SHAPES,
    build_model,
    cases_argument,
    copy_ceiling_tb_s,
    environment,
    free_memory,
    parameter_bytes,
    plot_bars,
    print_aligned,
    write_rows,
)

__all__ = ["KINDS", "run_compiled_benchmark", "print_table", "save_rows", "add_arguments", "run"]

KINDS = ("bf16-static", "fp8-static")
PREFILL_CHUNK = 2048


def _new_cache(kind: str, config, max_cache_len: int):
    if kind == "fp8-static":
        return FP8StaticCache(config, max_cache_len=max_cache_len)
    from transformers import StaticCache

    return StaticCache(config=config, max_cache_len=max_cache_len)


def _run_one(model, kind: str, prompt: torch.Tensor, tokens: torch.Tensor, warmup: int) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model.set_attn_implementation(ATTENTION_NAME if kind == "fp8-static" else "sdpa")
    steps = tokens.shape[0] - warmup
    cache = _new_cache(kind, model.config, prompt.shape[1] + warmup + 2 * steps)
    kw = cache_keyword(model)
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    gpu_ms, wall_ms = [], []
    with torch.no_grad():
        for start in range(0, prompt.shape[1], PREFILL_CHUNK):
            model(input_ids=prompt[:, start : start + PREFILL_CHUNK], **{kw: cache}, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        for i, token in enumerate(tokens):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            t0 = time.perf_counter()
            events[0].record()
            forward(input_ids=token, **{kw: cache}, use_cache=True, logits_to_keep=1)
            events[1].record()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            if i == 0:
                compile_s = seconds
            if i >= warmup:
                wall_ms.append(seconds * 1e3)
                gpu_ms.append(events[0].elapsed_time(events[1]))
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        events[0].record()
        for token in tokens[warmup:]:
            forward(input_ids=token, **{kw: cache}, use_cache=True, logits_to_keep=1)
        events[1].record()
        torch.cuda.synchronize()
        pipelined_ms = events[0].elapsed_time(events[1]) / steps
    row = {"cache": kind, "gpu_ms_median": statistics.median(gpu_ms), "wall_ms_median": statistics.median(wall_ms),
           "pipelined_ms": pipelined_ms, "compile_s": compile_s,
           "recompiles": max(counters["stats"]["unique_graphs"] - 1, 0)}  # fmt: skip
    del cache, forward
    torch._dynamo.reset()
    free_memory(torch.device("cuda"))
    return row


def run_compiled_benchmark(
    cases: tuple[tuple[int, int], ...] = ((1, 4096), (8, 32768)),
    model_shape: str = "llama-3.1-8b",
    steps: int = 20,
    warmup: int = 3,
    out_dir: str | Path = "results",
) -> list[dict[str, Any]]:
    """Benchmark compiled decode steps with both static caches for every ``(B, L)``; print, save and return rows."""
    if steps < 1 or warmup < 2:
        raise ValueError("need steps >= 1 and warmup >= 2 (compile, then record the CUDA graph)")
    if not torch.cuda.is_available():
        raise RuntimeError("the compiled benchmark runs CUDA graphs and needs a CUDA GPU")
    device = torch.device("cuda")
    ceiling = copy_ceiling_tb_s()
    model = build_model(model_shape, device, torch.bfloat16)
    config = model.config
    weight_bytes = parameter_bytes(model)
    env = {"model_shape": model_shape, "steps": steps, "warmup": warmup, "copy_tb_s": ceiling, **environment(device)}
    generator = torch.Generator().manual_seed(0)
    rows: list[dict[str, Any]] = []
    for B, L in cases:
        prompt = torch.randint(config.vocab_size, (B, L), generator=generator).to(device)
        tokens = torch.randint(config.vocab_size, (warmup + steps, B, 1), generator=generator).to(device)
        kv_elements = 2 * config.num_hidden_layers * B * config.num_key_value_heads * L * config.head_dim
        for kind in KINDS:
            row = _run_one(model, kind, prompt, tokens, warmup)
            kv_bytes = kv_elements * (1 if kind == "fp8-static" else 2)
            floor_ms = (weight_bytes + kv_bytes) / (ceiling * 1e12) * 1e3
            rows.append({"case": f"{B}x{L}", "B": B, "L": L, **row, "floor_ms": floor_ms,
                         "vs_floor": row["gpu_ms_median"] / floor_ms,
                         "pipelined_vs_floor": row["pipelined_ms"] / floor_ms, **env})  # fmt: skip
    model.set_attn_implementation("sdpa")
    del model
    free_memory(device)
    print_table(rows)
    save_rows(rows, Path(out_dir))
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    first = rows[0]
    print(f"compiled decode step (reduce-overhead, fullgraph), {first['model_shape']}, {first['gpu']}, "
          f"copy {first['copy_tb_s']:.2f} TB/s, torch {first['torch']}, transformers {first['transformers']}, "
          f"triton {first['triton']}, {first['git_sha']}; GPU ms per step: synced (median of {first['steps']}) / "
          "pipelined (mean of as many back to back)")  # fmt: skip
    head = ("case", "bf16 ms", "bf16 floor", "bf16/floor", "fp8 ms", "fp8 floor", "fp8/floor", "fp8/bf16",
            "compile s bf16/fp8", "recompiles bf16/fp8")  # fmt: skip
    lines = [head]
    for case in dict.fromkeys(r["case"] for r in rows):
        bf16, fp8 = (next(r for r in rows if r["case"] == case and r["cache"] == k) for k in KINDS)
        lines.append((case, _both(bf16, "gpu_ms_median", "pipelined_ms"), f"{bf16['floor_ms']:.2f}",
                      _both(bf16, "vs_floor", "pipelined_vs_floor"), _both(fp8, "gpu_ms_median", "pipelined_ms"),
                      f"{fp8['floor_ms']:.2f}", _both(fp8, "vs_floor", "pipelined_vs_floor"),
                      f"{fp8['gpu_ms_median'] / bf16['gpu_ms_median']:.3f} / "
                      f"{fp8['pipelined_ms'] / bf16['pipelined_ms']:.3f}",
                      f"{bf16['compile_s']:.0f}/{fp8['compile_s']:.0f}",
                      f"{bf16['recompiles']}/{fp8['recompiles']}"))  # fmt: skip
    print_aligned(lines)


def _both(row: dict[str, Any], synced: str, pipelined: str) -> str:
    return f"{row[synced]:.2f} / {row[pipelined]:.2f}"


def save_rows(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Write ``compiled_benchmark.json``, ``.csv`` and (with matplotlib) ``.png`` under ``out_dir``."""
    write_rows(rows, out_dir, "compiled_benchmark")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    names = {"gpu_ms_median": "synced", "pipelined_ms": "pipelined", "floor_ms": "floor"}
    series = {f"{kind} {name}": [next(r for r in rows if r["case"] == case and r["cache"] == kind)[key]
                                 for case in cases] for kind in KINDS for key, name in names.items()}  # fmt: skip
    title = f"compiled decode: StaticCache bf16 vs FP8StaticCache ({rows[0]['gpu']})"
    plot_bars(Path(out_dir) / "compiled_benchmark.png", cases, [("GPU ms per decode step", series)], title)


def add_arguments(parser) -> None:
    parser.add_argument("--cases", type=cases_argument, default=((1, 4096), (8, 32768)), help="e.g. 1x4096,8x32768")
    parser.add_argument("--model-shape", choices=LLAMA_SHAPES, default="llama-3.1-8b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out-dir", default="results")


def run(args) -> list[dict[str, Any]]:
    return run_compiled_benchmark(args.cases, args.model_shape, args.steps, args.warmup, args.out_dir)
