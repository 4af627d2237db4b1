"""Prefill over an FP8 history: one layer's attention of a chunk of q new tokens over L cached ones (issue 17), our
kernel beside its SDPA baselines in the same run.

Case ``LxQ``: a query ``[B, Hq, q, D]`` and K/V of L + q tokens (the cache after it took the chunk), the chunk's row
i at position L + i seeing keys 0 .. L + i (bottom-right causal). Defaults on the GPU: B = 8, 32 query / 8 KV heads,
D = 128, bf16 (Llama-3.1-8B); on CPU a tiny shape in fp32 (the tests' run). Columns, one row per case:

1. ``sdpa_mask``: what a bf16 cache gets today: transformers' ``sdpa_attention_forward`` with the boolean mask its
   ``sdpa_mask`` builds (it repeats K/V for GQA, as transformers does with a mask), torch's default backend.
2. ``sdpa_<backend>`` and ``best_backend``: torch SDPA pinned to flash / efficient / cuDNN with
   ``causal_lower_right`` instead of a mask, GQA native where the backend takes it, else over K/V expanded to the
   query heads beforehand (the expansion is not timed: a lower bound for bf16); the fastest that runs.
3. ``dequant_sdpa``: the FP8 path for such chunks before issue 17: ``kernels.dequantize_kv`` of the whole FP8
   history into a workspace, then (1) over it.
4. ``kernel``: our kernel (``kernels.decode_attention`` with Sq = q, what ``attn_implementation="hf_fp8cache"`` runs
   for such chunks) over the FP8 bytes; its largest difference to (3)'s output is ``kernel_max_abs_diff`` (the same
   bytes, so float noise only); ``kernel_plan`` its launch on the Triton path: ``<rows>x<keys> w<warps>
   s<splits> t<row tiles a KV head>``.
   ``kernel_fp8q``: the same launch with FP8 queries (``quantize_query=True``: Q @ K^T on e4m3 operands, fp32
   accumulation, P @ V in fp16), where the device has FP8 tensor cores (CPU: the torch twin);
   ``kernel_fp8q_max_abs_diff`` its largest difference to (3)'s output (the quantized queries' error, not float
   noise).
5. ``fp8_read_floor``: the FP8 K+V bytes over the copy bandwidth measured in the same run; ``flop_floor``: the bf16
   FLOPs of Q.K^T and P.V over every (query, key) pair, 4 * B * Hq * q * (L + q) * D, at 900 TFLOP/s (the issue's
   convention: the masked upper triangle of the chunk is counted too).

On the GPU every column is replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``: the median of 10
replays, each of as many calls as fill 100 ms, CUDA-event timed), falling back to CUDA events around eager calls
(``triton.testing.do_bench``) where a capture fails; on CPU the median of ``repeats`` host-timed calls. Times in us;
``*_vs_mask`` divide by column (1); ``kernel_vs_best_backend`` and ``kernel_vs_read_floor`` divide the kernel's time
by column (2)'s and by the FP8 read floor (issue 17's targets: <= 0.25 x SDPA + mask for q <= 512, <= 2 x the read
floor at q = 17, <= 1 x the best backend at q = 2048; with FP8 queries <= 0.6 x it).
Writes ``prefill_benchmark.{json,csv,png}``.
"""

from __future__ import annotations

import inspect
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..formats import FP8Format, resolve_format
from ..kernels import decode_attention, dequantize_kv, has_fp8_tensor_cores, quantize_append_kv, uses_triton
from .common import (
    cases_argument,
    cases_text,
    copy_ceiling_tb_s,
    environment,
    plot_bars,
    print_aligned,
    sdpa_backend,
    write_rows,
)

__all__ = ["GPU_CASES", "CPU_CASES", "FORCED_BACKENDS", "transformers_mask", "run_prefill_benchmark", "print_table",
           "table_line", "save_rows", "add_arguments", "run"]  # fmt: skip

GPU_CASES = ((32768, 17), (32768, 64), (32768, 256), (32768, 512), (32768, 2048), (16384, 2048))
CPU_CASES = ((96, 3), (96, 80))  # 80 new tokens: 160 query rows a KV head (3 row tiles), 2 key blocks causal
GPU_SHAPE = {"batch": 8, "heads": 32, "kv_heads": 8, "head_dim": 128}
CPU_SHAPE = {"batch": 1, "heads": 4, "kv_heads": 2, "head_dim": 64}
FORCED_BACKENDS = ("flash", "efficient", "cudnn")
FLOP_RATE = 900e12  # bf16 dense tensor-core FLOP/s the floor assumes (H200 class)
GRAPH_REP_MS = 100  # calls captured per graph: as many as fill this long
STEM = "prefill_benchmark"  # <out-dir>/prefill_benchmark.{json,csv,png}


@dataclass
class Chunk:
    """One case's tensors: the chunk's query, the exact K/V of history + chunk, their FP8 bytes (one per-tensor scale
    for K and V), the dequantize workspace and transformers' mask."""

    history: int
    query: torch.Tensor  # [B, Hq, q, D]
    key: torch.Tensor  # [B, H, L + q, D], exact
    value: torch.Tensor
    key_bytes: torch.Tensor  # [B, H, L + q, D] uint8
    value_bytes: torch.Tensor
    scale: torch.Tensor  # fp32 [1], K and V alike
    fmt: FP8Format
    workspace: tuple[torch.Tensor, torch.Tensor]  # dequantized K and V
    mask: torch.Tensor  # [B, 1, q, L + q] bool

    @property
    def kv_length(self) -> int:
        return self.key.shape[2]

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]


def transformers_mask(batch: int, history: int, new: int, device: torch.device | str) -> torch.Tensor:
    """The boolean mask ``[B, 1, q, L + q]`` transformers' ``sdpa_mask`` builds for ``new`` query tokens after
    ``history`` cached ones (no padding): its newer signature (``q_length`` / ``q_offset``) or its older one
    (``cache_position``), whichever the installed version has."""
    from transformers.masking_utils import sdpa_mask

    kv_length = history + new
    common = {"batch_size": batch, "kv_length": kv_length, "allow_is_causal_skip": False}
    if "q_length" in inspect.signature(sdpa_mask).parameters:
        mask = sdpa_mask(q_length=new, q_offset=history, device=device, **common)
    else:
        mask = sdpa_mask(cache_position=torch.arange(history, kv_length, device=device), **common)
    if mask is None or mask.dtype != torch.bool or tuple(mask.shape) != (batch, 1, new, kv_length):
        raise RuntimeError(f"transformers' sdpa_mask gave {None if mask is None else (mask.dtype, mask.shape)}")
    return mask


def make_chunk(batch, heads, kv_heads, head_dim, history, new, dtype, device) -> Chunk:
    """Random query and K/V (seeded), quantized to e4m3 with scale 4 / 448 (|x| up to 4 fits, as in the decode
    benchmark), dequantized once into the workspace."""
    g = torch.Generator(device=device).manual_seed(0)
    kv_shape = (batch, kv_heads, history + new, head_dim)
    query = torch.randn(batch, heads, new, head_dim, device=device, dtype=dtype, generator=g)
    key, value = (torch.randn(kv_shape, device=device, dtype=dtype, generator=g) for _ in "kv")
    fmt = resolve_format("fp8")
    scale = torch.full((1,), 4.0 / fmt.max, device=device)
    key_bytes, value_bytes = (torch.empty(kv_shape, dtype=torch.uint8, device=device) for _ in "kv")
    quantize_append_kv(key, value, key_bytes, value_bytes, 0, 1.0 / scale, 1.0 / scale, fmt)
    workspace = (torch.empty_like(key), torch.empty_like(value))
    dequantize_kv(key_bytes, value_bytes, history + new, scale, scale, fmt, *workspace)
    mask = transformers_mask(batch, history, new, device)
    return Chunk(history, query, key, value, key_bytes, value_bytes, scale, fmt, workspace, mask)


def _transformers_sdpa(chunk: Chunk, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """transformers' SDPA attention with the chunk's mask over ``key`` / ``value``: ``[B, q, Hq, D]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = SimpleNamespace(num_key_value_groups=chunk.groups, is_causal=True)  # what it reads of the module
    scaling = chunk.query.shape[-1] ** -0.5
    return sdpa_attention_forward(module, chunk.query, key, value, chunk.mask, scaling=scaling)[0]


def columns(chunk: Chunk) -> dict[str, Callable[[], torch.Tensor]]:
    """Columns (1), (3) and (4): each a call returning ``[B, q, Hq, D]``."""

    def dequant_sdpa():
        dequantize_kv(chunk.key_bytes, chunk.value_bytes, chunk.kv_length, chunk.scale, chunk.scale, chunk.fmt,
                      *chunk.workspace)  # fmt: skip
        return _transformers_sdpa(chunk, *chunk.workspace)

    start = torch.zeros(chunk.query.shape[0], dtype=torch.int32, device=chunk.query.device)  # no left padding

    def kernel(quantize_query: bool = False):
        return decode_attention(chunk.query, chunk.key_bytes, chunk.value_bytes, chunk.kv_length, start, chunk.scale,
                                chunk.scale, chunk.fmt, chunk.query.shape[-1] ** -0.5,
                                quantize_query=quantize_query)  # fmt: skip

    calls = {"sdpa_mask": lambda: _transformers_sdpa(chunk, chunk.key, chunk.value),
             "dequant_sdpa": dequant_sdpa, "kernel": kernel}  # fmt: skip
    if has_fp8_tensor_cores(chunk.query.device):
        calls["kernel_fp8q"] = lambda: kernel(quantize_query=True)
    return calls


def forced_backend(chunk: Chunk, backend: str) -> tuple[Callable[[], torch.Tensor], str] | None:
    """Column (2) for one backend: SDPA pinned to it with ``causal_lower_right``, as ``(call -> [B, q, Hq, D],
    label)``; GQA native when the backend takes it, else over K/V expanded beforehand (label ``+expanded``); None
    when it runs neither way."""
    from torch.nn.attention.bias import causal_lower_right

    bias = causal_lower_right(chunk.query.shape[2], chunk.kv_length)
    attend = torch.nn.functional.scaled_dot_product_attention

    def pinned(key, value, gqa):
        def call():
            with sdpa_backend(backend):
                return attend(chunk.query, key, value, attn_mask=bias, enable_gqa=gqa).transpose(1, 2)

        return call

    native = pinned(chunk.key, chunk.value, True)
    if _runs(native):
        return native, backend
    expanded = pinned(*(x.repeat_interleave(chunk.groups, dim=1) for x in (chunk.key, chunk.value)), False)
    return (expanded, f"{backend}+expanded") if _runs(expanded) else None


def _runs(call: Callable[[], Any]) -> bool:
    """Whether ``call`` runs: a backend that refuses the shapes raises (after warning why; the warnings are muted)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            call()
        return True
    except RuntimeError:
        return False


def time_us(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, str]:
    """(median us of ``fn``, how it was timed): CUDA-graph replays on the GPU (CUDA events around eager calls
    where a capture fails), host clock over ``repeats`` calls after one warm-up call on CPU."""
    if device.type == "cuda":
        import triton.testing

        try:
            return triton.testing.do_bench_cudagraph(fn, rep=GRAPH_REP_MS, return_mode="median") * 1e3, "graph"
        except RuntimeError as failure:
            print(f"  CUDA graph capture failed ({str(failure).splitlines()[0][:80]}); timing eager calls")
            torch.cuda.synchronize()
            return triton.testing.do_bench(fn, rep=GRAPH_REP_MS, return_mode="median") * 1e3, "events"
    fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e6, "host"


def copy_bandwidth_tb_s(device: torch.device) -> float:
    """Copy bandwidth (bytes read + written) in TB/s: ``common.copy_ceiling_tb_s`` on the GPU; on CPU a 32 MiB
    copy, host-timed (only so the CPU rows have a floor)."""
    if device.type == "cuda":
        return copy_ceiling_tb_s()
    src = torch.empty(32 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    us, _ = time_us(lambda: dst.copy_(src), device, 5)
    return 2 * src.numel() / us / 1e6


def floors_us(chunk: Chunk, copy_tb_s: float) -> tuple[float, float]:
    """(FP8 read floor, bf16 FLOP floor) in us: FP8 K+V bytes over the copy bandwidth; 4 * B * Hq * q * (L + q) * D
    FLOPs at ``FLOP_RATE``."""
    fp8_bytes = chunk.key_bytes.numel() + chunk.value_bytes.numel()
    B, Hq, q, D = chunk.query.shape
    flops = 4 * B * Hq * q * chunk.kv_length * D
    return fp8_bytes / (copy_tb_s * 1e6), flops / FLOP_RATE * 1e6


def _max_abs_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    return None if a is None or b is None else (a.float() - b.float()).abs().max().item()


def _measure(name: str, call: Callable[[], torch.Tensor], device, repeats) -> tuple[torch.Tensor | None, float | None,
                                                                                       str | None]:  # fmt: skip
    """(output, median us, timer) of one column; (None, None, None), said on the console, when it fails: one
    column that does not run must not cost the others' numbers."""
    try:
        output = call()
        return (output, *time_us(call, device, repeats))
    except Exception as failure:  # noqa: BLE001 -- any backend or kernel error: report it, keep measuring
        print(f"  {name}: failed ({type(failure).__name__}: {str(failure).splitlines()[0][:100]})")
        return None, None, None


def _forced_cells(chunk: Chunk, device, repeats, reference) -> tuple[dict[str, Any], list[str]]:
    """Column (2): each backend's us (None when it does not run), the fastest, and its largest difference to
    ``reference`` (column (1)'s output), plus the timers used."""
    cells: dict[str, Any] = {}
    best, diffs = None, []
    timers: list[str] = []
    for backend in FORCED_BACKENDS:
        found = forced_backend(chunk, backend)
        cells[f"sdpa_{backend}_us"] = None
        if found is None:
            print(f"  {backend}: not run (no kernel for these shapes)")
            continue
        call, label = found
        output, us, timer = _measure(label, call, device, repeats)
        if us is None:
            continue
        diffs.append(_max_abs_diff(output, reference))
        cells[f"sdpa_{backend}_us"], timers = us, timers + [timer]
        best = min(best or (us, label), (us, label))
    cells["best_backend_us"], cells["best_backend"] = best or (None, None)
    cells["backend_max_abs_diff"] = max((d for d in diffs if d is not None), default=None)
    return cells, timers


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def bench_case(chunk: Chunk, device: torch.device, repeats: int, copy_tb_s: float) -> dict[str, Any]:
    """One row: every column's us, the floors, the ratios to column (1) and the kernel's difference to (3)."""
    B, Hq, q, D = chunk.query.shape
    row: dict[str, Any] = {"case": f"{chunk.history}x{q}", "L": chunk.history, "q": q, "B": B, "heads": Hq,
                           "kv_heads": chunk.key.shape[1], "head_dim": D,
                           "dtype": str(chunk.query.dtype).removeprefix("torch.")}  # fmt: skip
    outputs: dict[str, torch.Tensor | None] = {"kernel_fp8q": None}
    timers: list[str | None] = []
    row["kernel_fp8q_us"] = None  # (no FP8 tensor cores: the column stays empty)
    for name, call in columns(chunk).items():
        outputs[name], row[f"{name}_us"], timer = _measure(name, call, device, repeats)
        timers.append(timer)
    forced, forced_timers = _forced_cells(chunk, device, repeats, outputs["sdpa_mask"])
    row.update(forced)
    row["fp8_read_floor_us"], row["flop_floor_us"] = floors_us(chunk, copy_tb_s)
    for name in ("best_backend", "dequant_sdpa", "kernel", "kernel_fp8q"):
        row[f"{name}_vs_mask"] = _ratio(row[f"{name}_us"], row["sdpa_mask_us"])
    row["kernel_vs_read_floor"] = _ratio(row["kernel_us"], row["fp8_read_floor_us"])
    for name in ("kernel", "kernel_fp8q"):
        row[f"{name}_vs_best_backend"] = _ratio(row[f"{name}_us"], row["best_backend_us"])
        row[f"{name}_max_abs_diff"] = _max_abs_diff(outputs[name], outputs["dequant_sdpa"])
    row["kernel_path"] = "triton" if uses_triton(chunk.query) else "torch twin"
    row["kernel_plan"] = kernel_plan(chunk) if uses_triton(chunk.query) else None
    row["timer"] = "+".join(sorted({t for t in timers + forced_timers if t}))
    row["copy_tb_s"] = copy_tb_s
    return row


def kernel_plan(chunk: Chunk) -> str:
    """The Triton launch of column (4): ``<rows>x<keys> w<warps> s<splits> t<row tiles a KV head>``."""
    from ..kernels.attention import plan_decode_attention  # (imports triton)

    B, Hq, q, D = chunk.query.shape
    H = chunk.key.shape[1]
    device = chunk.query.device
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    fp32_query = chunk.query.dtype == torch.float32
    plan = plan_decode_attention(B, H, Hq // H, q, D, chunk.kv_length, None, sm_count, fp32_query=fp32_query)
    return f"{plan.block_m}x{plan.block_n} w{plan.num_warps} s{plan.splits} t{plan.row_tiles}"


def _defaults(device, cases, dtype, shape) -> tuple[torch.device, tuple, torch.dtype, dict[str, int]]:
    """The device's defaults for what is None: CUDA when available, then GPU_CASES / GPU_SHAPE in bf16 there and
    CPU_CASES / CPU_SHAPE in fp32 on CPU; ``shape`` entries override the default shape's."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    cases = tuple(cases) if cases is not None else (GPU_CASES if cuda else CPU_CASES)
    if not cases or any(len(case) != 2 or min(case) < 1 for case in cases):
        raise ValueError(f"cases must be (history, new tokens) pairs, each >= 1, got {cases!r}")
    shape = {**(GPU_SHAPE if cuda else CPU_SHAPE), **{k: v for k, v in (shape or {}).items() if v is not None}}
    if shape["heads"] % shape["kv_heads"]:
        raise ValueError(f"heads must be a multiple of kv_heads, got {shape['heads']} and {shape['kv_heads']}")
    return dev, cases, dtype or (torch.bfloat16 if cuda else torch.float32), shape


def run_prefill_benchmark(
    cases: Sequence[tuple[int, int]] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    repeats: int = 3,
    out_dir: str | Path = "results",
    **shape: int | None,
) -> list[dict[str, Any]]:
    """Time every column at every ``(L, q)``; print the table, write the rows, return them. ``shape``: ``batch``,
    ``heads``, ``kv_heads``, ``head_dim`` (None: the device's default, see ``_defaults``)."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    dev, cases, dtype, sizes = _defaults(device, cases, dtype, shape)
    copy_tb_s = copy_bandwidth_tb_s(dev)
    env = environment(dev)
    rows = []
    for history, new in cases:
        print(f"case {history}x{new} ...")
        chunk = make_chunk(sizes["batch"], sizes["heads"], sizes["kv_heads"], sizes["head_dim"], history, new, dtype,
                           dev)  # fmt: skip
        rows.append({**bench_case(chunk, dev, repeats, copy_tb_s), **env})
        write_rows(rows, out_dir, STEM)  # the cases so far survive a run cut short
        print("  " + " | ".join(table_line(rows[-1])))
        del chunk
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows)
    save_rows(rows, Path(out_dir))
    return rows


def _cell(us: float | None, ratio: float | None = None) -> str:
    if us is None:
        return "-"
    return f"{us:.1f}" if ratio is None else f"{us:.1f} ({ratio:.2f}x)"


def _times(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _diff(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """One line per case: us of every column, ratios to column (1) in brackets, the kernel's difference to (3)."""
    first = rows[0]
    print(f"prefill over an FP8 history, {first['gpu']}, B={first['B']}, {first['heads']} q / {first['kv_heads']} kv "
          f"heads, d={first['head_dim']}, {first['dtype']}; us (x SDPA + mask); "
          f"copy {first['copy_tb_s']:.2f} TB/s")  # fmt: skip
    header = ["case", "SDPA + mask", "best backend", "", "dequant + SDPA", "our kernel", "x best", "x floor",
              "FP8 read floor", "FLOP floor", "kernel diff", "kernel plan", "FP8 queries", "x best",
              "FP8 q diff"]  # fmt: skip
    print_aligned([header] + [table_line(r) for r in rows])


def table_line(r: dict[str, Any]) -> list[str]:
    """A row's cells in ``print_table``'s columns."""
    return [r["case"], _cell(r["sdpa_mask_us"]), _cell(r["best_backend_us"], r["best_backend_vs_mask"]),
            r["best_backend"] or "-", _cell(r["dequant_sdpa_us"], r["dequant_sdpa_vs_mask"]),
            _cell(r["kernel_us"], r["kernel_vs_mask"]), _times(r["kernel_vs_best_backend"]),
            _times(r["kernel_vs_read_floor"]), _cell(r["fp8_read_floor_us"]), _cell(r["flop_floor_us"]),
            _diff(r["kernel_max_abs_diff"]), r["kernel_plan"] or "-",
            _cell(r["kernel_fp8q_us"], r["kernel_fp8q_vs_mask"]), _times(r["kernel_fp8q_vs_best_backend"]),
            _diff(r["kernel_fp8q_max_abs_diff"])]  # fmt: skip


def save_rows(rows: Sequence[dict[str, Any]], out_dir: Path) -> None:
    """Write ``prefill_benchmark.json``, ``.csv`` and (with matplotlib) ``.png`` (log-scale us) under ``out_dir``."""
    write_rows(rows, out_dir, STEM)
    cases = [r["case"] for r in rows]
    names = {"SDPA + mask": "sdpa_mask_us", "best backend": "best_backend_us",
             "dequant + SDPA": "dequant_sdpa_us", "our kernel": "kernel_us", "FP8 queries": "kernel_fp8q_us",
             "FP8 read floor": "fp8_read_floor_us", "FLOP floor": "flop_floor_us"}  # fmt: skip
    series = {label: [r[key] for r in rows] for label, key in names.items()}
    title = f"prefill over an FP8 history (B={rows[0]['B']}), {rows[0]['gpu']}: us"
    plot_bars(Path(out_dir) / f"{STEM}.png", cases, [("us", series)], title, xlabel="L x q", log=True)


def add_arguments(parser) -> None:
    default = f"GPU {cases_text(GPU_CASES)}, CPU {cases_text(CPU_CASES)}"
    parser.add_argument("--cases", type=cases_argument, default=None,
                        help=f"history L x new tokens q (default {default})")  # fmt: skip
    for name in ("batch", "heads", "kv_heads", "head_dim"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default {GPU_SHAPE[name]} on GPU, {CPU_SHAPE[name]} on CPU")  # fmt: skip
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="default bfloat16 on GPU, float32 on CPU")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed calls on CPU (the GPU replays CUDA graphs)")
    parser.add_argument("--device", default=None, help="default cuda when available, else cpu")
    parser.add_argument("--out-dir", default="results")


def run(args) -> list[dict[str, Any]]:
    return run_prefill_benchmark(
        args.cases, args.device, getattr(torch, args.dtype) if args.dtype else None, args.repeats, args.out_dir,
        batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
    )  # fmt: skip
