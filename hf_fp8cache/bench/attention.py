"""Decode-attention kernel benchmark: our FP8 kernel vs torch SDPA in bf16, on the GPU, in one run.

For each (B, L): a query ``[B, Hq, 1, D]`` and a cache of L tokens (Llama-3.1-8B shape by default: Hq=32, H=8,
D=128). Timed with ``triton.testing.do_bench`` (CUDA events, median of many runs after warm-up):

- ``fp8``: ``kernels.decode_attention`` reading the FP8 bytes (per-tensor scales);
- ``fp8+exact16``: the same with the 16 most recent tokens read exactly from bf16 ring buffers
  (``residual_length=16``);
- ``fp8-token-head`` / ``int8-token-head``: the same kernel over e4m3 / int8 codes with a bf16 scale per token and
  KV head (``strategy="token_head"``; the scales' bytes counted);
- ``sdpa-flash`` / ``sdpa-cudnn`` / ``sdpa-efficient``: torch SDPA over bf16 K/V (GQA via ``enable_gqa``), each
  backend pinned, skipped where it does not run;
- ``dequant+sdpa``: our dequantize into bf16, then SDPA (the read path for other attention implementations).

Every variant is replayed from a CUDA graph (``do_bench_cudagraph``), so the numbers are GPU time without Python
launch overhead (which eager decode adds on top, for every variant).

Bandwidth counts the K and V bytes each variant must read (FP8: 1 byte an element, bf16: 2), against the copy
ceiling measured in the same run (a large device-to-device copy, bytes read + written). Also checks the FP8
kernel against SDPA over the dequantized values (relative error). Writes ``attention_benchmark.{json,csv,png}``.

``--window W`` times sliding-window attention instead (case ``BxLwW``): the FP8 kernel over the whole L-token cache
with the window in the kernel (it reads only the window's key blocks), against SDPA over a bf16 sliding cache, which
holds the last W tokens (as transformers' sliding layers do; one query then needs no mask). Compare with the ``BxW``
case without a window.

``--sweep`` instead times the FP8 kernel over a grid of its launch parameters (a tuning aid; prints only).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from ..formats import INT8, resolve_format
from ..kernels import RecentWindow, decode_attention, dequantize_kv, quantize_append_kv, quantize_append_token_head
from .common import cases_argument, cases_text, copy_ceiling_tb_s, environment, plot_bars, sdpa_backend, write_rows

__all__ = ["DEFAULT_CASES", "SWEEP_CASES", "SWEEP_GRIDS", "run_attention_benchmark", "run_tuning_sweep",
           "print_table", "save_rows", "add_arguments", "run"]  # fmt: skip

DEFAULT_CASES = ((1, 4096), (1, 32768), (8, 8192), (8, 32768), (32, 8192))
SWEEP_CASES = ((8, 32768), (1, 32768))
_WINDOW = 16  # exact recent tokens of the fp8+exact variant


def _time(fn) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph: the GPU time, without Python launch overhead."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


# What ``--sweep`` varies: everything, or only the split count at the kernel's own block shape and stages
SWEEP_GRIDS = {
    "all": (((None, None), (32, 1), (64, 1), (32, 2), (64, 2), (32, 4), (64, 4), (128, 8)), (None, 2, 3, 4),
            (None, 8, 16, 32, 64)),
    "splits": (((None, None),), (None,), (None, 1, 2, 4, 8, 12, 16, 24, 32)),
}  # fmt: skip


def run_tuning_sweep(
    cases=SWEEP_CASES, grid: str = "all", heads: int = 32, kv_heads: int = 8, head_dim: int = 128
) -> None:
    """Time the FP8 decode kernel over a grid (``SWEEP_GRIDS``) of (keys a step, warps), pipeline stages and split
    counts; None is the kernel's own choice (``program_shape``, ``split_plan``)."""
    import itertools

    from ..kernels.attention import decode_attention as launch

    fmt = resolve_format("fp8")
    for B, L in cases:
        q = torch.randn(B, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
        kb, vb = (torch.randint(0, 120, (B, kv_heads, L, head_dim), dtype=torch.uint8, device="cuda") for _ in "kv")
        start, scale = torch.zeros(B, dtype=torch.int32, device="cuda"), torch.ones(1, device="cuda")
        results = []
        for (block_n, warps), stages, splits in itertools.product(*SWEEP_GRIDS[grid]):
            fn = functools.partial(launch, q, kb, vb, L, start, scale, scale, fmt, head_dim**-0.5,
                                   num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)  # fmt: skip
            try:
                us = _time(fn) * 1e3
            except Exception as failure:  # noqa: BLE001 -- a config the compiler rejects (e.g. out of shared memory)
                print(f"{B}x{L} block_n={block_n} warps={warps} stages={stages} splits={splits}: {failure!s:.60}")
                continue
            results.append((us, block_n, warps, stages, splits))
        results.sort(key=lambda row: row[0])
        tb_s = 2 * B * kv_heads * L * head_dim / (results[0][0] * 1e-6) / 1e12
        print(f"{B}x{L}: best {results[0]} = {tb_s:.2f} TB/s; top 5 (us, block_n, warps, stages, splits):")
        for row in results[:5]:
            print("   ", row)
        print("    default:", next(r for r in results if r[1:] == (None, None, None, None)) if results else "-")


def _sdpa(backend: str):
    """SDPA over bf16 K/V (GQA) pinned to one backend: ``sdpa-flash`` pins ``flash``, and so on."""

    def attend(q, k, v):
        with sdpa_backend(backend.removeprefix("sdpa-")):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return attend


def run_attention_benchmark(
    cases=DEFAULT_CASES, heads: int = 32, kv_heads: int = 8, head_dim: int = 128, out_dir: str | Path = "results",
    window: int | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Time every variant at every (B, L); print the table, write JSON and PNG, return the rows."""
    if not torch.cuda.is_available():
        raise RuntimeError("the attention benchmark replays CUDA graphs and needs a CUDA GPU")
    ceiling = copy_ceiling_tb_s()
    env = {key: value for key, value in environment(torch.device("cuda")).items() if key != "gpu"}
    rows: list[dict[str, Any]] = []
    for B, L in cases:
        rows += [{**row, **env} for row in _bench_case(B, L, heads, kv_heads, head_dim, ceiling, window)]
        torch.cuda.empty_cache()
    print_table(rows)
    save_rows(rows, Path(out_dir))
    return rows


def _bench_case(
    B: int, L: int, heads: int, kv_heads: int, head_dim: int, ceiling: float, window: int | None = None
) -> list[dict[str, Any]]:

    fmt = resolve_format("fp8")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, kv_heads, L, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, kv_heads, L, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = torch.full((1,), 4.0 / fmt.max, device="cuda")
    kb, vb = (torch.empty(B, kv_heads, L, head_dim, dtype=torch.uint8, device="cuda") for _ in range(2))
    quantize_append_kv(k, v, kb, vb, 0, 1.0 / scale, 1.0 / scale, fmt)
    kd, vd = torch.empty_like(k), torch.empty_like(v)
    dequantize_kv(kb, vb, L, scale, scale, fmt, kd, vd)
    start = torch.zeros(B, dtype=torch.int32, device="cuda")
    sm = head_dim**-0.5
    fp8 = lambda: decode_attention(q, kb, vb, L, start, scale, scale, fmt, sm, sliding_window=window)
    if window is not None:  # a bf16 sliding cache holds the window's last tokens: what SDPA reads
        return _window_rows(B, L, window, q, fp8, kd[:, :, -window:], vd[:, :, -window:], ceiling)
    # (its own name: the fp8 lambda reads `window` when called)
    recent = RecentWindow(k[:, :, -_WINDOW:].contiguous(), v[:, :, -_WINDOW:].contiguous(), L - _WINDOW)  # L % 16 == 0
    fp8_window = lambda: decode_attention(q, kb, vb, L, start, scale, scale, fmt, sm, recent=recent)
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), kd.float(), vd.float(), enable_gqa=True)
    error = ((fp8().transpose(1, 2).float() - reference).norm() / reference.norm()).item()
    fp8_bytes, bf16_bytes = 2 * B * kv_heads * L * head_dim, 4 * B * kv_heads * L * head_dim
    flash = _sdpa("sdpa-flash")

    def dequant_then_sdpa():
        dequantize_kv(kb, vb, L, scale, scale, fmt, kd, vd)
        return flash(q, kd, vd)

    variants = {"fp8": (fp8, fp8_bytes), f"fp8+exact{_WINDOW}": (fp8_window, fp8_bytes),
                "dequant+sdpa": (dequant_then_sdpa, 3 * fp8_bytes + bf16_bytes)}  # fmt: skip
    for name, codes_format in (("fp8-token-head", fmt), ("int8-token-head", INT8)):
        codes = [torch.empty_like(kb) for _ in "kv"]
        scales = [torch.empty(B, kv_heads, L, dtype=torch.bfloat16, device="cuda") for _ in "kv"]
        quantize_append_token_head(k, v, *codes, *scales, 0, codes_format)
        variants[name] = (functools.partial(decode_attention, q, *codes, L, start, *scales, codes_format, sm),
                          fp8_bytes + 2 * scales[0].numel() * 2)  # fmt: skip
    for name in ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient"):
        variants[name] = (functools.partial(_sdpa(name), q, k, v), bf16_bytes)
    return _timed_rows(f"{B}x{L}", B, L, variants, error, ceiling)


def _window_rows(B, L, window, q, fp8, kd, vd, ceiling) -> list[dict[str, Any]]:
    """Rows of a sliding-window case: the FP8 kernel with its window vs SDPA over the window's bf16 K/V."""
    reference = torch.nn.functional.scaled_dot_product_attention(q.float(), kd.float(), vd.float(), enable_gqa=True)
    error = ((fp8().transpose(1, 2).float() - reference).norm() / reference.norm()).item()
    k, v = kd.contiguous(), vd.contiguous()
    fp8_bytes = 2 * k.numel()  # the window's K and V, one byte an element
    variants = {"fp8": (fp8, fp8_bytes)}
    for name in ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient"):
        variants[name] = (functools.partial(_sdpa(name), q, k, v), 2 * fp8_bytes)
    return _timed_rows(f"{B}x{L}w{window}", B, L, variants, error, ceiling)


def _timed_rows(case, B, L, variants, error, ceiling) -> list[dict[str, Any]]:
    """One row per variant that runs: its median time and bandwidth."""
    rows = []
    for name, (fn, nbytes) in variants.items():
        try:
            ms = _time(fn)
        except RuntimeError as failure:  # a backend that does not take these shapes
            print(f"{case} {name}: not run ({str(failure).splitlines()[0][:80]})")
            continue
        rows.append({"case": case, "B": B, "L": L, "variant": name, "us": ms * 1e3, "bytes": nbytes,
                     "tb_s": nbytes / ms / 1e9, "ceiling_tb_s": ceiling, "fp8_rel_error": error,
                     "gpu": torch.cuda.get_device_name()})  # fmt: skip
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per case: each variant's us (TB/s, % of the copy ceiling), the best bf16 SDPA over fp8, fp8's error."""
    ceiling = rows[0]["ceiling_tb_s"]
    print(f"decode attention, {rows[0]['gpu']}, copy ceiling {ceiling:.2f} TB/s; times in us (TB/s, % of ceiling)")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    print(f"{'case':>9} " + " ".join(f"{v:>24}" for v in variants) + f" {'best bf16 / fp8':>16} {'fp8 rel err':>12}")
    for case in dict.fromkeys(r["case"] for r in rows):
        by = {r["variant"]: r for r in rows if r["case"] == case}
        cells = [f"{by[v]['us']:8.1f} ({by[v]['tb_s']:4.2f}, {100 * by[v]['tb_s'] / ceiling:3.0f}%)" if v in by
                 else "-" for v in variants]  # fmt: skip
        bf16 = [by[v]["us"] for v in variants if v.startswith("sdpa") and v in by]
        speedup = f"{min(bf16) / by['fp8']['us']:.2f}x" if bf16 and "fp8" in by else "-"
        print(
            f"{case:>9} " + " ".join(f"{c:>24}" for c in cells) + f" {speedup:>16} {by['fp8']['fp8_rel_error']:12.2e}"
        )


def save_rows(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Write ``attention_benchmark.json``, ``.csv`` and (with matplotlib) ``.png`` (log-scale us) under ``out_dir``."""
    write_rows(rows, out_dir, "attention_benchmark")
    cases = list(dict.fromkeys(r["case"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["case"], r["variant"]): r["us"] for r in rows}
    series = {variant: [by.get((case, variant)) for case in cases] for variant in variants}
    title = f"decode attention (32 q / 8 kv heads, d=128), {rows[0]['gpu']}: us"
    plot_bars(Path(out_dir) / "attention_benchmark.png", cases, [("us", series)], title, log=True)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--cases",
        type=cases_argument,
        default=None,
        help=f"default {cases_text(DEFAULT_CASES)}; with --sweep {cases_text(SWEEP_CASES)}",
    )
    parser.add_argument(
        "--sweep", nargs="?", const="all", choices=sorted(SWEEP_GRIDS), default=None,
        help="tuning sweep of the FP8 decode kernel instead: all knobs, or only the split count",
    )  # fmt: skip
    parser.add_argument("--window", type=int, default=None, help="sliding window (tokens) of every case, e.g. 4096")
    parser.add_argument("--out-dir", default="results")


def run(args) -> list[dict[str, Any]] | None:
    if args.sweep:
        return run_tuning_sweep(args.cases or SWEEP_CASES, args.sweep)
    return run_attention_benchmark(args.cases or DEFAULT_CASES, out_dir=args.out_dir, window=args.window)
