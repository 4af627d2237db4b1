"""What FP8 buys on several GPUs and on one: tensor parallelism over two GPUs, and the batch one GPU holds.

Two parts, one run (``hf-fp8cache bench multigpu``; ``--parts capacity,tp``, run in that order), a random-weight
Llama-3.1-8B shape in bf16 on CUDA (the ``tiny`` shape in fp32 on CPU, for smoke runs):

- ``tp``: TP=2 (``tp_plan="auto"`` under ``torchrun --nproc-per-node 2``, started by this module) at B x L = 8 x 32768
  through ``model.generate``, by ``bench/generate.py``'s method (per token = (t(N+1 tokens) - t(1 token)) / N, same
  warm-ups): ms per token, tokens/s, and each rank's peak memory, for ``DynamicCache`` + SDPA, ``FP8Cache`` + our
  attention and ``FP8StaticCache`` + our attention (compiled by generate). The model is saved once to
  ``--checkpoint-dir`` (the ranks load it sharded; a reused directory is not rewritten).
- ``capacity``: on ONE GPU, the largest batch of L = 32768 cached tokens whose decode fits, bf16 ``DynamicCache``
  vs ``FP8Cache`` (+ our attention), and tokens/s at that batch. The caches are filled directly with random K/V
  (``cache.update`` per layer, as a server with chunked prefill would hold them; a one-shot prefill of so many
  tokens would run out of memory in its MLP activations first), then ``generate`` decodes from them (one new prompt
  token, then N): per token by the same difference, the cache cropped back between calls. The batch comes from
  memory arithmetic (free bytes / KV bytes per sequence), then is verified: the estimate and the next batch up
  (or down until one fits), a few tries at most.

Rows go to ``<out-dir>/multigpu_benchmark.{json,csv}``; a table with ratios to ``DynamicCache`` is printed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from ..attention import ATTENTION_NAME
from ..cache import FP8Cache
from ..integration import cache_keyword
from ..kernels import cpu_backend
from ..static_cache import FP8StaticCache
from .common import LLAMA_SHAPES, MODEL_SHAPES, build_model, environment, free_memory, print_aligned, sync, write_rows

__all__ = ["fp8_capacity_tokens", "kv_bytes_per_sequence", "estimated_batch", "largest_fitting_batch", "add_ratios",
           "table_lines", "add_arguments", "run"]  # fmt: skip

STEM = "multigpu_benchmark"
# name -> (attention, make_cache(config, max_cache_len), one cache reused with reset() for every call): the same
# configurations as bench/generate.py's of these names
TP_CONFIGS: dict[str, tuple[str, Callable, bool]] = {
    "dynamic": ("sdpa", lambda config, _: DynamicCache(config=config), False),
    "fp8+attn": (ATTENTION_NAME, lambda config, _: FP8Cache(config), False),
    "fp8-static+attn": (ATTENTION_NAME, lambda config, length: FP8StaticCache(config, max_cache_len=length), True),
}  # fmt: skip
CAPACITY_CONFIGS = {"dynamic": (2, "sdpa"), "fp8+attn": (1, ATTENTION_NAME)}  # bytes per K/V element, attention


def _head_dim(shape: dict[str, int]) -> int:
    return shape["hidden_size"] // shape["num_attention_heads"]


def fp8_capacity_tokens(prefilled: int, total: int) -> int:
    """Tokens an ``FP8Cache`` layer allocates for ``total`` tokens written as ``prefilled`` at once, then one at a
    time (its buffers grow amortized): asked of a one-head, one-dim cache on the CPU, so it follows the layer's rule."""
    cache = FP8Cache()
    with cpu_backend("torch"):
        cache.update(torch.zeros(1, 1, prefilled, 1), torch.zeros(1, 1, prefilled, 1), 0)
        for _ in range(total - prefilled):
            cache.update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 0)
    return cache.layers[0].capacity


def kv_bytes_per_sequence(model_shape: str, tokens: int, element_bytes: int) -> int:
    """K and V bytes of one sequence of ``tokens`` in every layer (scales left out: 8 bytes a layer)."""
    shape = MODEL_SHAPES[model_shape]
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * _head_dim(shape) * tokens * element_bytes


def estimated_batch(free_bytes: int, per_sequence: int, reserve_fraction: float = 0.06) -> int:
    """The batch whose cache fills ``free_bytes`` less a reserve for decode activations and growth, at least 1."""
    return max(1, math.floor(free_bytes * (1 - reserve_fraction) / per_sequence))


def largest_fitting_batch(fits: Callable[[int], bool], estimate: int, max_tries: int = 5) -> tuple[int | None, list]:
    """The largest batch ``fits`` accepts near ``estimate``: the estimate and the next batch up while they fit, or
    the next batch down until one fits; at most ``max_tries`` calls. Returns (batch or None, [(batch, fits)])."""
    tried: list[tuple[int, bool]] = []
    batch = estimate
    while len(tried) < max_tries and batch >= 1:
        ok = fits(batch)
        tried.append((batch, ok))
        if ok and not any(b == batch + 1 for b, _ in tried):
            batch += 1
        elif ok or any(b == batch - 1 and fitted for b, fitted in tried):
            break
        else:
            batch -= 1
    fitting = [b for b, ok in tried if ok]
    return (max(fitting) if fitting else None), tried


def add_ratios(rows: list[dict[str, Any]], keys: tuple[str, ...] = ("ms_per_token", "tokens_per_s", "batch")) -> None:
    """``<key>_vs_dynamic``: each row's value over the dynamic row of the same part (None where either is missing)."""
    for part in {row["part"] for row in rows}:
        same = [row for row in rows if row["part"] == part]
        base = next((row for row in same if row["config"] == "dynamic"), {})
        for row in same:
            for key in keys:
                value, reference = row.get(key), base.get(key)
                row[f"{key}_vs_dynamic"] = value / reference if value is not None and reference else None


def _cell(value, digits: int = 1, divisor: float = 1) -> str:
    return "-" if value is None else f"{value / divisor:.{digits}f}"


def table_lines(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Header and one line per row: part, config, batch x L, ms/token, tok/s, each with its ratio to dynamic, and the
    peak memory of each GPU in GiB."""
    lines = [["part", "config", "B x L", "ms/token", "/dyn", "tok/s", "/dyn", "peak GiB per GPU", "status"]]
    for row in rows:
        peaks = ", ".join(_cell(p, 1, 2**30) for p in row.get("peak_bytes_per_gpu") or []) or "-"
        case = "-" if row.get("batch") is None else f"{row['batch']}x{row['L']}"
        lines.append([row["part"], row["config"], case, _cell(row.get("ms_per_token"), 2),
                      _cell(row.get("ms_per_token_vs_dynamic"), 3), _cell(row.get("tokens_per_s")),
                      _cell(row.get("tokens_per_s_vs_dynamic"), 3), peaks, row.get("status", "ok")])  # fmt: skip
    return lines


# -- part 1: tensor parallelism, run inside each torchrun rank -------------------------------------------------------
def _generate_seconds(model, ids: torch.Tensor, tokens: int, cache) -> float:
    """Seconds of one greedy ``generate`` of exactly ``tokens`` new tokens into ``cache`` (synced on both ends)."""
    sync(ids.device)
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                   do_sample=False, pad_token_id=0, **{cache_keyword(model): cache})  # fmt: skip
    sync(ids.device)
    return time.perf_counter() - start


def _measure_tp(model, name: str, ids: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    """bench/generate.py's method for one configuration: warm-up (N+1, then 1 token; Triton and torch.compile compile
    there), then one timed pair; per token = (t(N+1) - t(1)) / N; peak memory above what was allocated before."""
    attention, make, reuse = TP_CONFIGS[name]
    model.set_attn_implementation(attention)
    cuda = ids.device.type == "cuda"
    before = torch.cuda.memory_allocated(ids.device) if cuda else 0
    length = ids.shape[1] + new_tokens + 1
    shared = make(model.config, length) if reuse else None

    def seconds(tokens: int) -> float:
        if shared is not None:
            shared.reset()
        return _generate_seconds(model, ids, tokens, shared if shared is not None else make(model.config, length))

    seconds(new_tokens + 1)
    seconds(1)
    if cuda:
        torch.cuda.reset_peak_memory_stats(ids.device)
    long = seconds(new_tokens + 1)
    peak = torch.cuda.max_memory_allocated(ids.device) - before if cuda else None
    per_token = (long - seconds(1)) / new_tokens
    return {"ms_per_token": per_token * 1e3, "tokens_per_s": ids.shape[0] / per_token if per_token > 0 else None,
            "peak_bytes": peak, "compiled": "_compiled_call" in model.__dict__, "status": "ok"}  # fmt: skip


def _tp_rank(checkpoint: str, batch: int, length: int, new_tokens: int, out_path: str) -> None:
    """One rank: load the checkpoint sharded, time each of ``TP_CONFIGS``."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(checkpoint, tp_plan="auto", dtype=dtype).eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), generator=generator).to(device)
    rows = []
    for name in TP_CONFIGS:
        try:
            measured = _measure_tp(model, name, ids, new_tokens)
        except Exception as error:  # a row says what failed; the other configurations still run
            measured = {"ms_per_token": None, "tokens_per_s": None, "peak_bytes": None, "compiled": None,
                        "status": f"error: {type(error).__name__}: {str(error)[:200]}"}  # fmt: skip
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, measured["peak_bytes"])
        rows.append({"part": "tp2", "config": name, "batch": batch, "L": length, "ms_per_token":
                     measured["ms_per_token"], "tokens_per_s": measured["tokens_per_s"], "peak_bytes_per_gpu": peaks,
                     "compiled": measured["compiled"], "status": measured["status"]})  # fmt: skip
        if dist.get_rank() == 0:  # after each configuration: a run cut by the timeout keeps the finished rows
            Path(out_path).write_text(json.dumps(rows) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def _save_checkpoint(model_shape: str, directory: Path, device: torch.device, dtype: torch.dtype) -> None:
    """The random-weight model saved once (the ranks of the TP part load it sharded)."""
    if (directory / "config.json").is_file():
        return
    model = build_model(model_shape, device, dtype)
    model.save_pretrained(directory)
    del model
    free_memory(device)


def _run_tp(args, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Save the checkpoint, then run ``_tp_rank`` on two ranks through torchrun; the rank-0 rows."""
    checkpoint = Path(args.checkpoint_dir or Path(tempfile.gettempdir()) / f"hf_fp8cache_{args.model_shape}")
    _save_checkpoint(args.model_shape, checkpoint, device, dtype)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "tp_rows.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", __name__,
                   "--tp-rank", str(checkpoint), str(args.tp_batch), str(args.length), str(args.new_tokens),
                   str(out)]  # fmt: skip
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ),
                                  timeout=args.tp_timeout)  # fmt: skip
            stderr = done.stderr
            failure = None if done.returncode == 0 and out.is_file() else f"torchrun exit {done.returncode}"
        except subprocess.TimeoutExpired as expired:  # its output is bytes, whatever text= said
            output = expired.stderr or b""
            stderr = output.decode(errors="replace") if isinstance(output, bytes) else output
            failure = f"torchrun over {args.tp_timeout} s"
        print(f"tp2: torchrun took {time.perf_counter() - started:.0f} s")
        finished = json.loads(out.read_text()) if out.is_file() else []
        if failure:
            print(stderr[-3000:], file=sys.stderr)
            done_names = {row["config"] for row in finished}
            finished += [{"part": "tp2", "config": name, "status": f"failed ({failure})"}
                         for name in TP_CONFIGS if name not in done_names]  # fmt: skip
        return finished


# -- part 2: capacity on one GPU --------------------------------------------------------------------------------------
def _filled_cache(name: str, model, batch: int, length: int):
    """A cache of ``name`` holding ``length`` random K/V tokens of ``batch`` rows in every layer."""
    config = model.config
    cache = DynamicCache(config=config) if name == "dynamic" else FP8Cache(config)
    shape = (batch, config.num_key_value_heads, length, config.head_dim)
    device, dtype = model.device, model.dtype
    for layer in range(config.num_hidden_layers):
        key = torch.randn(shape, device=device, dtype=dtype)
        # DynamicCache keeps the tensors it is given: V must be its own; FP8Cache copies them into its FP8 buffers,
        # so K serves as V too (one bf16 temporary of a layer, not two, next to a nearly full GPU)
        value = torch.randn(shape, device=device, dtype=dtype) if name == "dynamic" else key
        cache.update(key, value, layer)
        del key, value
    return cache


def _decode_seconds(model, cache, ids: torch.Tensor, new_tokens: int) -> float:
    """Seconds of one generate of ``new_tokens`` from ``cache`` (the prompt's last token is new), then the cache is
    cropped back to what it held."""
    held = cache.get_seq_length()
    seconds = _generate_seconds(model, ids, new_tokens, cache)
    cache.crop(-(cache.get_seq_length() - held))
    return seconds


def _decode_at(model, name: str, batch: int, length: int, new_tokens: int) -> dict[str, Any]:
    """Fill a cache of ``batch`` x ``length``, decode: warm-up, then per token by the difference, and peak memory."""
    device = model.device
    model.set_attn_implementation(CAPACITY_CONFIGS[name][1])
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = _filled_cache(name, model, batch, length)
    ids = torch.randint(3, model.config.vocab_size, (batch, length + 1), device=device)
    _decode_seconds(model, cache, ids, new_tokens + 1)
    _decode_seconds(model, cache, ids, 1)
    long, short = _decode_seconds(model, cache, ids, new_tokens + 1), _decode_seconds(model, cache, ids, 1)
    per_token = (long - short) / new_tokens
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    return {"ms_per_token": per_token * 1e3, "tokens_per_s": batch / per_token if per_token > 0 else None,
            "peak_bytes_per_gpu": [peak]}  # fmt: skip


def _fits(model, name: str, length: int, new_tokens: int, measured: dict[int, dict]) -> Callable[[int], bool]:
    def fits(batch: int) -> bool:
        try:
            measured[batch] = _decode_at(model, name, batch, length, new_tokens)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            model.set_attn_implementation("sdpa")
            free_memory(model.device)

    return fits


def _run_capacity(args, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """For each of ``CAPACITY_CONFIGS``: the largest batch at ``args.length`` tokens and its decode speed."""
    model = build_model(args.model_shape, device, dtype)
    rows = []
    for name, (element_bytes, _) in CAPACITY_CONFIGS.items():
        free_memory(device)
        total = args.length + args.new_tokens + 1
        tokens = total if name == "dynamic" else fp8_capacity_tokens(args.length, total)
        per_sequence = kv_bytes_per_sequence(args.model_shape, tokens, element_bytes)
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            estimate = estimated_batch(free, per_sequence)
        else:
            estimate = args.cpu_batch
        measured: dict[int, dict] = {}
        batch, tried = largest_fitting_batch(_fits(model, name, args.length, args.new_tokens, measured), estimate)
        rows.append({"part": "capacity-1gpu", "config": name, "batch": batch, "L": args.length,
                     "estimated_batch": estimate, "kv_bytes_per_sequence": per_sequence, "tried": tried,
                     **measured.get(batch, {}), "status": "ok" if batch else "nothing fits"})  # fmt: skip
    del model
    free_memory(device)
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("--parts", default="capacity,tp", help="comma list among capacity, tp (default both)")
    parser.add_argument("--model-shape", choices=LLAMA_SHAPES, default=None,
                        help="default llama-3.1-8b on GPU, tiny on CPU")  # fmt: skip
    parser.add_argument("--length", type=int, default=None, help="cached tokens per sequence (default 32768; CPU 32)")
    parser.add_argument("--tp-batch", type=int, default=8, help="batch of the TP part (default 8)")
    parser.add_argument("--new-tokens", type=int, default=32, help="N: per token = (t(N+1) - t(1)) / N")
    parser.add_argument("--cpu-batch", type=int, default=2, help="capacity part's starting batch on CPU (no memory)")
    parser.add_argument("--tp-timeout", type=int, default=240, help="seconds the TP part's torchrun may take")
    parser.add_argument("--checkpoint-dir", default=None, help="where the TP part's checkpoint is saved / reused")
    parser.add_argument("--out-dir", default="results")


def run(args) -> list[dict[str, Any]]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    args.model_shape = args.model_shape or ("llama-3.1-8b" if cuda else "tiny")
    args.length = args.length or (32768 if cuda else 32)
    parts = [p for p in args.parts.split(",") if p]
    if not set(parts) <= {"tp", "capacity"} or not parts:
        raise ValueError(f"parts must be among tp, capacity, got {args.parts!r}")
    env = {"model_shape": args.model_shape, "dtype": str(dtype).removeprefix("torch."), "new_tokens": args.new_tokens,
           "gpus": torch.cuda.device_count(), **environment(device)}  # fmt: skip
    rows: list[dict[str, Any]] = []
    for part, runner in (("capacity", _run_capacity), ("tp", _run_tp)):  # the single-GPU headline first
        if part in parts:
            rows += runner(args, device, dtype)
            add_ratios(rows)
            write_rows([{**row, **env} for row in rows], args.out_dir, STEM)
    print(f"multi-GPU / capacity, model.generate greedy, {args.new_tokens} new tokens, per token = (t(N+1) - t(1)) / N"
          f" | {args.model_shape} {env['dtype']} | {env['gpus']} x {env['gpu']} | torch {env['torch']} | "
          f"transformers {env['transformers']} | {env['git_sha']}")  # fmt: skip
    print_aligned(table_lines(rows))
    return rows


if __name__ == "__main__":  # a torchrun rank of the TP part
    if sys.argv[1:2] != ["--tp-rank"] or len(sys.argv) != 7:
        raise SystemExit("usage: torchrun ... -m hf_fp8cache.bench.multigpu --tp-rank CHECKPOINT B L N OUT_JSON")
    _tp_rank(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
