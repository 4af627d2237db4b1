"""What every benchmark of the wing shares: the run's provenance (GPU, versions, ``git_sha`` with ``+dirty``), the
random-weight Llama it measures, the rows it writes (JSON + CSV, a PNG when matplotlib is installed), the copy
ceiling its bandwidths are compared with, torch SDPA's backends by name, and the device sync around host clocks.

Nothing here measures a cache; the modules beside it do, one benchmark each.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import importlib.metadata
import json
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

__all__ = [
    "MODEL_SHAPES", "LLAMA_SHAPES", "SHAPE_FAMILIES", "SDPA_BACKENDS", "model_family", "baseline_attention",
    "environment", "git_revision", "build_model", "parameter_bytes", "sync",
    "free_memory", "sdpa_backend", "copy_ceiling_tb_s", "write_rows", "plot_bars", "print_aligned", "parse_cases",
    "cases_argument", "cases_text",
]  # fmt: skip

# Config keyword arguments per shape: random weights, real published layer counts, head counts and head dims.
# Memory at 8x32768 (one H200, 141 GB), bf16 weights + bf16 K/V (K and V: 2 * H_kv * d * 2 bytes a token a layer):
# - llama-3.1-8b: 8.0e9 params = 16.1 GB; 32 layers * 4096 B * 262144 tokens = 34.4 GB of K/V.
# - gpt-oss-20b (openai/gpt-oss-20b's config.json; transformers' GptOssConfig defaults are the 120b: 36 layers,
#   128 experts): 24 layers alternating 128-token sliding / full, 64 q / 8 kv heads, d=64, 32 experts (top 4),
#   every expert kept. 20.9e9 params = 41.8 GB in bf16 (the published MXFP4 experts are 13 GB); K/V: 12 full
#   layers * 2048 B * 262144 = 6.4 GB, the 12 sliding layers ~25 MB. Fits, with ~90 GB for prefill activations.
# - gemma-3-12b (google/gemma-3-12b-it's text_config; transformers' Gemma3TextConfig defaults are the 2B: 26
#   layers, d=256): 48 layers, 5 sliding (1024 tokens) : 1 full, 16 q / 8 kv heads, d=256 (query_pre_attn_scalar
#   256), tied embeddings; the full-attention RoPE's linear factor 8 is left out (no cost difference). 11.8e9
#   params = 23.5 GB; K/V: 8 full layers * 8192 B * 262144 = 17.2 GB, the 40 sliding layers 2.7 GB. Fits.
# tiny-*: the same families for CPU tests (one sliding and one full layer, window 8).
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "gpt-oss-20b": dict(hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                        sliding_window=128, vocab_size=201088,
                        layer_types=["sliding_attention", "full_attention"] * 12),
    "tiny-gpt-oss": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                         sliding_window=8, vocab_size=256, layer_types=["sliding_attention", "full_attention"]),
    "gemma-3-12b": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=1024,
                        vocab_size=262208, layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 8),
    "tiny-gemma-3": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                         vocab_size=256, layer_types=["sliding_attention", "full_attention"]),
}  # fmt: skip
SHAPE_FAMILIES = {"gpt-oss-20b": "gpt_oss", "tiny-gpt-oss": "gpt_oss", "gemma-3-12b": "gemma3",
                  "tiny-gemma-3": "gemma3"}  # fmt: skip  # any other shape: llama
# the shapes of the modes whose arithmetic and baselines assume a Llama (compiled, forward-loop, multigpu)
LLAMA_SHAPES = tuple(name for name in MODEL_SHAPES if name not in SHAPE_FAMILIES)
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")  # names of torch.nn.attention.SDPBackend members, below


def environment(device: torch.device) -> dict[str, Any]:
    """Where the rows were measured: the GPU's name (``cpu`` otherwise), torch / transformers / triton versions and
    the checkout's ``git_sha``."""
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


def model_family(model_shape: str) -> str:
    """The transformers model type of a shape: ``llama``, ``gpt_oss`` or ``gemma3``."""
    return SHAPE_FAMILIES.get(model_shape, "llama")


def baseline_attention(family: str, device: torch.device) -> str:
    """The attention implementation a family's baseline rows use: SDPA, as transformers picks by default -- except
    GPT-OSS, whose learned sinks SDPA lacks (transformers refuses it). There transformers' default is ``eager``
    (without the kernels hub), which holds ``[B, 64, L, L]`` scores: 1.1 TB at 8x32768. So on CUDA its baseline is
    ``flex_attention``, transformers' memory-efficient implementation that applies the sinks exactly (LSE
    renormalization); on CPU, where flex attention refuses sinks, ``eager``."""
    if family != "gpt_oss":
        return "sdpa"
    return "flex_attention" if device.type == "cuda" else "eager"


def _family_classes(family: str):
    """(config class, causal-LM class, extra config keywords) of a family."""
    if family == "gpt_oss":
        from transformers import GptOssConfig, GptOssForCausalLM

        return GptOssConfig, GptOssForCausalLM, dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        return Gemma3TextConfig, Gemma3ForCausalLM, dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaConfig, LlamaForCausalLM, dict(max_position_embeddings=131072, rope_theta=500000, pad_token_id=0,
                                               bos_token_id=1, eos_token_id=2)  # fmt: skip


def build_model(model_shape: str, device: torch.device, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """A randomly initialised causal LM of the given shape (``MODEL_SHAPES``; Llama, GPT-OSS or Gemma 3 by
    ``SHAPE_FAMILIES``) with the family's ``baseline_attention``, created directly on ``device`` in ``dtype``, in
    eval mode."""
    if model_shape not in MODEL_SHAPES:
        raise ValueError(f"model_shape must be one of {sorted(MODEL_SHAPES)}, got {model_shape!r}")
    family = model_family(model_shape)
    config_class, model_class, extra = _family_classes(family)
    config = config_class(**MODEL_SHAPES[model_shape], **extra,
                          attn_implementation=baseline_attention(family, torch.device(device)))  # fmt: skip
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # never materialise fp32 weights (32 GB for the 8B shape)
    try:
        with torch.device(device):
            model = model_class(config)  # no .to(dtype): keeps the fp32 RoPE buffers, as from_pretrained does
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock read after it covers that work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def continue_generate(model, cache, input_ids: torch.Tensor, attention_mask: torch.Tensor, tokens: int) -> float:
    """Seconds of a greedy ``generate`` of exactly ``tokens`` tokens that continues ``cache`` (which holds all of
    ``input_ids`` but its last token); the cache is cropped back to that length afterwards, so a long context costs
    one prefill for any number of measurements (the GPU scripts' decode-only timing)."""
    kept = input_ids.shape[1] - 1
    sync(input_ids.device)
    start = time.perf_counter()
    model.generate(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, max_new_tokens=tokens,
                   min_new_tokens=tokens, do_sample=False, pad_token_id=0)  # fmt: skip
    sync(input_ids.device)
    seconds = time.perf_counter() - start
    cache.crop(-(cache.get_seq_length() - kept))  # a negative length removes tokens in every version
    return seconds


def free_memory(device: torch.device) -> None:
    """On CUDA, collect garbage and hand cached blocks back, so the next memory measurement starts from what is alive
    (a no-op on CPU, where nothing measures memory: a collection there costs ~0.4 s)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def sdpa_backend(name: str | None):
    """A context pinning torch SDPA to one backend (``SDPA_BACKENDS``); None keeps torch's own choice."""
    if name is None:
        return contextlib.nullcontext()
    if name not in SDPA_BACKENDS:
        raise ValueError(f"sdpa backend must be one of {SDPA_BACKENDS} or None, got {name!r}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    members = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}  # fmt: skip
    return sdpa_kernel(members[name])


def copy_ceiling_tb_s() -> float:
    """The GPU's copy bandwidth in TB/s (bytes read + written), measured now on a 2 GiB device-to-device copy:
    the ceiling bandwidth-bound kernels are compared with."""
    import triton.testing

    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / ms / 1e9


def write_rows(rows: Sequence[dict[str, Any]], out_dir: str | Path, stem: str) -> None:
    """Write the rows to ``<out_dir>/<stem>.json`` and ``.csv`` (columns: every key, in order of appearance)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(list(rows), indent=2) + "\n")
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot_bars(
    path: str | Path,
    groups: Sequence[str],
    panels: Sequence[tuple[str, dict[str, Sequence[float | None]]]],
    title: str,
    xlabel: str = "B x L",
    log: bool = False,
) -> bool:
    """Grouped bar charts side by side, written to ``path``: each panel is ``(title, {series: value per group})``
    (None draws no bar). Returns False, writing nothing, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed; skipping {Path(path).name}")
        return False
    labels = list(dict.fromkeys(label for _, series in panels for label in series))
    rows_of_legend = -(-len(labels) // 4)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels) + 1, 4 + 0.3 * rows_of_legend), squeeze=False)
    colors = {label: f"C{i}" for i, label in enumerate(labels)}  # one colour per series across the panels
    for ax, (panel_title, series) in zip(axes[0], panels, strict=True):
        width = 0.8 / max(len(series), 1)
        for j, (label, values) in enumerate(series.items()):
            offsets = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
            heights = [float("nan") if v is None else v for v in values]
            ax.bar(offsets, heights, width=width, label=label, color=colors[label])
        ax.set(xticks=range(len(groups)), xticklabels=groups, xlabel=xlabel, title=panel_title)
        if log:
            ax.set_yscale("log")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[label]) for label in labels]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize="small", frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07 * rows_of_legend, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def print_aligned(lines: Sequence[Sequence[str]]) -> None:
    """Print rows of strings as right-aligned columns."""
    widths = [max(len(x) for x in col) for col in zip(*lines, strict=True)]
    for line in lines:
        print("  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True)))


def parse_cases(text: str) -> tuple[tuple[int, int], ...]:
    """``"1x4096,8x16384"`` -> ``((1, 4096), (8, 16384))``: batch x prompt tokens, both >= 1."""
    try:
        cases = tuple((int(b), int(n)) for b, n in (item.lower().split("x") for item in text.split(",") if item))
    except ValueError:
        cases = ()
    if not cases or any(b < 1 or n < 1 for b, n in cases):
        raise ValueError(f"cases must look like 1x4096,8x16384 (batch x tokens, each >= 1), got {text!r}")
    return cases


def cases_argument(text: str) -> tuple[tuple[int, int], ...]:
    """``parse_cases`` for argparse, which then prints the message."""
    try:
        return parse_cases(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cases_text(cases: Sequence[tuple[int, int]]) -> str:
    return ",".join(f"{b}x{n}" for b, n in cases)
