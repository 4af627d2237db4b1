"""Decode-step benchmark: transformers' ``DynamicCache`` (bf16 K/V) and ``QuantizedCache(backend="fp8")`` against
``FP8Cache``.

A random-weight Llama (``llama-3.1-8b`` shape, or ``tiny`` for CPU smoke runs; SDPA, built on the device in
``dtype``, eval, no grad) prefills random ids ``[B, L]`` in 2048-token chunks into a fresh cache of each kind, then
runs ``warmup`` untimed and ``steps`` timed one-token decode steps (one fixed random token sequence, shared by both
caches). Per (B, L, cache): median wall ms per step (``cuda.synchronize`` around the clock reads, so it includes
Python/launch overhead), median GPU ms (CUDA event pair; None on CPU), KV bytes (DynamicCache: K+V of all layers;
FP8Cache: ``nbytes``, with ``allocated_nbytes`` and ``workspace_nbytes``), peak ``max_memory_allocated`` over
prefill + decode minus parameter bytes (CUDA only; mostly prefill activations at long L), and the fraction of rows
whose greedy token after the last step matches across caches (sanity only: random weights give flat logits).
Prints a table; writes ``<out_dir>/decode_benchmark.{json,csv,png}``. GPU: ``python -m hf_fp8cache.benchmark``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib.metadata
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from .attention import ATTENTION_NAME
from .cache import FP8Cache
from .integration import cache_keyword

__all__ = ["run_decode_benchmark", "main"]

PREFILL_CHUNK = 2048
# DynamicCache + SDPA; FP8 cache + SDPA (dequantize path); FP8 cache + our attention reading FP8 directly;
# transformers' own QuantizedCache(backend="fp8") + SDPA (transformers >= 5.21; left out where it does not exist)
CACHES = ("dynamic", "fp8", "fp8+attn", "hf-quantized-fp8")
LAYER_KINDS = ("dynamic", "fp8")
MODEL_SHAPES: dict[str, dict[str, int]] = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}  # fmt: skip
# the run's conditions, printed above the table
CONDITIONS = (
    "model_shape",
    "dtype",
    "sdpa_backend",
    "steps",
    "warmup",
    "gpu",
    "torch",
    "transformers",
    "triton",
    "git_sha",
)
# (row key, table/plot label, divisor, decimals) of the metrics compared side by side
METRICS = [("wall_ms_median", "wall ms", 1, 3), ("gpu_ms_median", "gpu ms", 1, 3), ("kv_bytes", "KV MiB", 2**20, 2),
           ("peak_extra_bytes", "peak+ MiB", 2**20, 1)]  # fmt: skip


def _environment(device: torch.device) -> dict[str, Any]:
    try:
        triton_version: str | None = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "triton": triton_version, "git_sha": git_revision()}  # fmt: skip


def git_revision() -> str:
    """The short sha of the checkout this package runs from, with ``+dirty`` when tracked files differ from it (the
    rows then describe uncommitted code); ``unknown`` outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha or "unknown"


def build_model(model_shape: str, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """A randomly initialised Llama of the given shape, created directly on ``device`` in ``dtype``."""
    config = LlamaConfig(**MODEL_SHAPES[model_shape], max_position_embeddings=131072, rope_theta=500000,
                         attn_implementation="sdpa")  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # never materialise fp32 weights (32 GB for the 8B shape)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)  # no .to(dtype): keeps the fp32 RoPE buffers, as from_pretrained does
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sdpa_backend(name: str | None):
    """Pin torch SDPA to one backend (``flash``, ``cudnn``, ``efficient``, ``math``); None keeps torch's choice."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
    return sdpa_kernel(backends[name])


def _run_one(model: LlamaForCausalLM, kind: str, prompt: torch.Tensor, decode_tokens: torch.Tensor, warmup: int,
             param_bytes: int, sdpa_backend: str | None) -> tuple[dict[str, Any], torch.Tensor]:  # fmt: skip
    """Prefill + decode with one fresh cache; returns the row and the greedy token after the last step."""
    device, kw, cuda = prompt.device, cache_keyword(model), prompt.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model.set_attn_implementation(ATTENTION_NAME if kind == "fp8+attn" else "sdpa")
    cache = _new_cache(kind, model.config)
    wall_ms: list[float] = []
    gpu_ms: list[float] = []
    with torch.no_grad(), _sdpa_backend(sdpa_backend):
        for start in range(0, prompt.shape[1], PREFILL_CHUNK):
            chunk = prompt[:, start : start + PREFILL_CHUNK]
            logits = model(input_ids=chunk, **{kw: cache}, use_cache=True, logits_to_keep=1).logits
        for i, token in enumerate(decode_tokens):
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else None
            _sync(device)
            t0 = time.perf_counter()
            if events:
                events[0].record()
            logits = model(input_ids=token, **{kw: cache}, use_cache=True, logits_to_keep=1).logits
            if events:
                events[1].record()
            _sync(device)
            if i >= warmup:
                wall_ms.append((time.perf_counter() - t0) * 1e3)
                if events:
                    gpu_ms.append(events[0].elapsed_time(events[1]))
    if isinstance(cache, FP8Cache):
        kv, allocated, workspace = cache.nbytes, cache.allocated_nbytes, cache.workspace_nbytes
    elif kind == "hf-quantized-fp8":  # fp8 tensors (torch.cat per step) and one fp32 scale each
        pairs = [(lay._quantized_keys, lay._quantized_values) for lay in cache.layers]
        kv = allocated = sum(t[0].nbytes + 4 for pair in pairs for t in pair)
        workspace = 0
    else:  # DynamicCache holds exactly-sized tensors and no workspace
        kv = allocated = sum(t.numel() * t.element_size() for lay in cache.layers for t in (lay.keys, lay.values))
        workspace = 0
    peak = torch.cuda.max_memory_allocated(device) - param_bytes if cuda else None
    row = {"cache": kind, "wall_ms_median": statistics.median(wall_ms),
           "gpu_ms_median": statistics.median(gpu_ms) if gpu_ms else None, "kv_bytes": kv,
           "allocated_bytes": allocated, "workspace_bytes": workspace, "peak_extra_bytes": peak}  # fmt: skip
    next_token = logits[:, -1].argmax(dim=-1).cpu()
    del cache, logits
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row, next_token


def available_caches() -> tuple[str, ...]:
    """The cache kinds this transformers version has (``QuantizedCache``'s fp8 backend came in 5.21)."""
    from transformers import cache_utils

    return tuple(k for k in CACHES if k != "hf-quantized-fp8" or hasattr(cache_utils, "Fp8QuantizedLayer"))


def _new_cache(kind: str, config):
    if kind == "dynamic":
        return DynamicCache(config=config)
    if kind == "hf-quantized-fp8":
        from transformers import QuantizedCache

        return QuantizedCache("fp8", config)
    return FP8Cache(config=config)


def run_decode_benchmark(
    cases: tuple[tuple[int, int], ...] = ((1, 4096), (8, 8192)),
    model_shape: str = "llama-3.1-8b",
    steps: int = 20,
    warmup: int = 3,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    out_dir: str | Path = "results",
    sdpa_backend: str | None = None,
) -> list[dict[str, Any]]:
    """Benchmark decode steps with each cache for every ``(B, L)`` case; print, save and return the rows."""
    if steps < 1 or warmup < 0:
        raise ValueError("need steps >= 1 and warmup >= 0")
    dev = torch.device(device)
    model = build_model(model_shape, dev, dtype)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    env = {"model_shape": model_shape, "dtype": str(dtype).removeprefix("torch."), "steps": steps, "warmup": warmup,
           "sdpa_backend": sdpa_backend or "default"}  # fmt: skip
    env.update(_environment(dev))
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rows: list[dict[str, Any]] = []
    for B, L in cases:
        prompt = torch.randint(vocab, (B, L), generator=generator).to(dev)
        decode_tokens = torch.randint(vocab, (warmup + steps, B, 1), generator=generator).to(dev)
        results = [_run_one(model, kind, prompt, decode_tokens, warmup, param_bytes, sdpa_backend)
                   for kind in available_caches()]  # fmt: skip
        model.set_attn_implementation("sdpa")
        for row, token in results:
            ratio = row["kv_bytes"] / results[0][0]["kv_bytes"]
            match = (token == results[0][1]).float().mean().item()
            rows.append({"case": f"{B}x{L}", "B": B, "L": L, **row, "kv_ratio_vs_dynamic": ratio,
                         "greedy_match": match, **env})  # fmt: skip
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    print_table(rows)
    save_rows(rows, Path(out_dir))
    return rows


def _kinds(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["cache"] for r in rows))


def _pair(rows: list[dict[str, Any]], case: str, kinds=None) -> list[dict[str, Any]]:
    return [next(r for r in rows if r["case"] == case and r["cache"] == kind) for kind in kinds or _kinds(rows)]


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per case and metric group: DynamicCache, then each FP8 variant with its ratio to DynamicCache."""
    kinds = _kinds(rows)
    head = ["case"]
    for _, label, _, _ in METRICS:
        head += [f"{label} dyn"] + [f"{label} {kind}{suffix}" for kind in kinds[1:] for suffix in ("", " /dyn")]
    head += [f"greedy= {kind}" for kind in kinds[1:]]
    lines = [head]
    for case in dict.fromkeys(r["case"] for r in rows):
        dyn, *others = _pair(rows, case)
        line = [case]
        for key, _, div, digits in METRICS:
            line.append("-" if dyn[key] is None else f"{dyn[key] / div:.{digits}f}")
            for other in others:
                value = other[key]
                line.append("-" if value is None else f"{value / div:.{digits}f}")
                line.append(f"{value / dyn[key]:.3f}" if dyn[key] and value is not None else "-")
        lines.append([*line, *(f"{other['greedy_match']:.2f}" for other in others)])
    print(" | ".join(f"{k}={rows[0][k]}" for k in CONDITIONS))
    print_aligned(lines)


def print_aligned(lines: list) -> None:
    """Print rows of strings as right-aligned columns."""
    widths = [max(len(x) for x in col) for col in zip(*lines, strict=True)]
    for line in lines:
        print("  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True)))


def write_rows(rows: list[dict[str, Any]], out_dir: Path, stem: str):
    """Write ``<stem>.json`` and ``.csv`` under ``out_dir``; return ``matplotlib.pyplot`` (Agg) for the plot, or None
    when matplotlib is not installed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(out_dir / f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; skipping {stem}.png")
        return None
    return plt


def save_rows(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Write ``decode_benchmark.json``, ``.csv`` and (if matplotlib is available) ``.png`` under ``out_dir``."""
    plt = write_rows(rows, out_dir, "decode_benchmark")
    if plt is None:
        return
    cases = list(dict.fromkeys(r["case"] for r in rows))
    metrics = [m for m in METRICS if rows[0][m[0]] is not None]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False)
    for ax, (key, label, div, _) in zip(axes[0], metrics, strict=True):
        kinds = _kinds(rows)
        for j, kind in enumerate(kinds):
            values = [_pair(rows, case)[j][key] / div for case in cases]
            width = 0.8 / len(kinds)
            ax.bar([i + (j - (len(kinds) - 1) / 2) * width for i in range(len(cases))], values, width=width, label=kind)
        ax.set(xticks=range(len(cases)), xticklabels=cases, xlabel="B x L", title=label)
        ax.legend()
    fig.suptitle(f"decode step: DynamicCache vs FP8Cache ({rows[0]['model_shape']}, {rows[0]['gpu']})")
    fig.tight_layout()
    fig.savefig(out_dir / "decode_benchmark.png", dpi=120)
    plt.close(fig)


def run_layer_benchmark(
    cases: tuple[tuple[int, int], ...], heads: int = 8, head_dim: int = 128, iters: int = 50, device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16, out_dir: str | Path = "results",
) -> list[dict[str, Any]]:  # fmt: skip
    """GPU time of one layer's decode-step cache update: FP8 (quantize 1 token + dequantize the history) vs
    DynamicLayer (``torch.cat`` of the history); CUDA events around each of ``iters`` updates, median. A GPU
    spin before each keeps the CPU's launch overhead out of the events."""
    from transformers.cache_utils import DynamicLayer

    dev = torch.device(device)
    if dev.type != "cuda":
        raise ValueError(f"the layer benchmark times CUDA events and needs a CUDA device, got {device!r}")
    rows: list[dict[str, Any]] = []
    for B, L in cases:
        prompt = torch.randn(B, heads, L, head_dim, device=dev, dtype=dtype)
        steps = torch.randn(iters, B, heads, 1, head_dim, device=dev, dtype=dtype)
        for kind in LAYER_KINDS:
            if kind == "fp8":
                store = FP8Cache()
                update = lambda x, store=store: store.update(x, x, 0)
            else:
                store = DynamicLayer()
                update = lambda x, store=store: store.update(x, x)
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
    print(f"one layer's decode-step cache update ({heads} KV heads, d={head_dim}, {dtype}), median of {iters}")
    print(f"{'case':>8} {'dynamic us':>11} {'fp8 us':>9} {'fp8/dyn':>8} {'fp8 TB/s':>9}")
    for case in dict.fromkeys(r["case"] for r in rows):
        dyn, fp8 = _pair(rows, case, LAYER_KINDS)
        ratio = fp8["update_us_median"] / dyn["update_us_median"]
        print(f"{case:>8} {dyn['update_us_median']:>11.1f} {fp8['update_us_median']:>9.1f} {ratio:>8.3f} "
              f"{fp8['tb_per_s']:>9.2f}")  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_update.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _parse_cases(text: str) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(b), int(n)) for b, n in (item.lower().split("x") for item in text.split(",") if item))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"cases must look like 1x4096,8x8192, got {text!r}") from exc


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=_parse_cases, default=((1, 4096), (8, 8192)), help="e.g. 1x4096,8x8192")
    parser.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="llama-3.1-8b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--sdpa-backend", choices=["flash", "cudnn", "efficient", "math"], default=None)
    parser.add_argument("--layer", action="store_true", help="time one layer's cache update on the GPU instead")
    parser.add_argument("--attention", action="store_true", help="time the decode attention kernels instead")
    parser.add_argument("--sweep", action="store_true", help="tuning sweep of the FP8 decode attention kernel")
    parser.add_argument(
        "--compiled", action="store_true", help="compiled decode: FP8StaticCache vs StaticCache and the floors"
    )
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.layer:
        return run_layer_benchmark(args.cases, device=args.device, dtype=dtype, out_dir=args.out_dir)
    if args.sweep:
        from .benchmark_attention import run_tuning_sweep

        return run_tuning_sweep()
    if args.compiled:
        from .benchmark_compiled import run_compiled_benchmark

        return run_compiled_benchmark(args.cases, args.model_shape, args.steps, args.warmup, args.out_dir)
    if args.attention:
        from .benchmark_attention import run_attention_benchmark

        return run_attention_benchmark(args.cases, out_dir=args.out_dir)
    return run_decode_benchmark(
        args.cases, args.model_shape, args.steps, args.warmup, args.device, dtype, args.out_dir, args.sdpa_backend
    )


if __name__ == "__main__":
    main()
