"""Issue 18's design question, measured on the CPU: which 8-bit format and which dtype for per-token-head scales.

Every cached K/V entry is fake-quantized (quantized and decoded back in torch) with one scale per (token, KV head)
computed from that entry's own values at write time, as a per-token-head cache would store it; the first prefill
attends over exact K/V and caches the fake-quantized ones (the FP8 caches' ``exact_prefill``). Scale of an entry
``x[b, h, s, :]``: ``amax(|x|) / FMAX`` (FMAX 448 for e4m3, 127 for int8), kept in the scale dtype -- fp32 as
computed, or bf16 / fp16 rounded up so that ``|x| / scale`` never exceeds FMAX; an all-zero entry gets the
smallest normal of the scale dtype. int8: symmetric, ``round-half-even(x / scale)`` clamped to +-127. Baselines:
e4m3 with a unit scale (the cache's default) and with one amax scale per KV head from the first prefill (vLLM's
on-the-fly rule, amax / FMAX without headroom). Metrics: ``hf_fp8cache.evaluation`` (top-1 agreement, KL,
perplexity change against a full-precision ``DynamicCache``, generation mode).

    python benchmarks/token_head_scales.py [--sequences 16] [--seq-len 512] [--prefix 64] [--step 4] [--out FILE]

SmolLM2-135M-Instruct (the package's embedded model) in fp32 on the CPU; bytes per cached element are printed per
configuration: 1 + scale bytes / head dim (64 for SmolLM2, 128 for most 7-70B models).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import torch
import transformers
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from hf_fp8cache.evaluation import evaluate_configurations, evaluation_ids, format_table
from hf_fp8cache.models import load_model_and_tokenizer

E4M3_MAX, INT8_MAX = 448.0, 127.0


def _scale_in(amax: torch.Tensor, fmax: float, dtype: torch.dtype) -> torch.Tensor:
    """amax / fmax in ``dtype`` (rounded up outside fp32, so the scaled values stay within +-fmax), as fp32."""
    scale = amax / fmax
    if dtype != torch.float32:
        rounded = scale.to(dtype)
        scale = torch.where(rounded.float() < scale, torch.nextafter(rounded, torch.tensor(float("inf"), dtype=dtype)),
                            rounded).float()  # fmt: skip
    return torch.where(amax > 0, scale, torch.finfo(dtype).smallest_normal)


def fake_quant(x: torch.Tensor, fmt: str, scale: torch.Tensor) -> torch.Tensor:
    """decode(encode(x / scale)) * scale in x's dtype; ``scale`` broadcasts against x."""
    y = x.float() / scale
    if fmt == "int8":
        codes = torch.round(y).clamp(-INT8_MAX, INT8_MAX)  # torch.round is round-half-even
    else:
        codes = y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    return (codes * scale).to(x.dtype)


class TokenHeadLayer(DynamicLayer):
    """Caches fake-quantized K/V: per (token, head) scales (``per_head=False``) or one amax scale per head from the
    first prefill (``per_head=True``, e4m3) or unit scales (``scale_dtype=None``, e4m3)."""

    def __init__(self, fmt: str, scale_dtype: torch.dtype | None, per_head: bool = False) -> None:
        super().__init__()
        self.fmt, self.scale_dtype, self.per_head = fmt, scale_dtype, per_head
        self.head_scales: tuple[torch.Tensor, torch.Tensor] | None = None

    def _quantized(self, x: torch.Tensor, which: int) -> torch.Tensor:
        fmax = INT8_MAX if self.fmt == "int8" else E4M3_MAX
        if self.scale_dtype is None:
            return fake_quant(x, self.fmt, torch.ones((), device=x.device))
        if self.per_head:
            if self.head_scales is None or len(self.head_scales) <= which:
                amax = x.float().abs().amax(dim=(0, 2, 3), keepdim=True)
                self.head_scales = (*(self.head_scales or ()), _scale_in(amax, fmax, torch.float32))
            return fake_quant(x, self.fmt, self.head_scales[which])
        amax = x.float().abs().amax(dim=-1, keepdim=True)
        return fake_quant(x, self.fmt, _scale_in(amax, fmax, self.scale_dtype))

    def update(self, key_states, value_states, *args, **kwargs):
        first = not self.is_initialized or self.get_seq_length() == 0
        keys, values = super().update(self._quantized(key_states, 0), self._quantized(value_states, 1))
        if first:  # the first prefill attends over its exact K/V (exact_prefill), as the FP8 caches do
            return key_states, value_states
        return keys, values


def cache_of(config, fmt: str, scale_dtype: torch.dtype | None, per_head: bool = False) -> DynamicCache:
    cache = DynamicCache(config=config)
    cache.layers = [TokenHeadLayer(fmt, scale_dtype, per_head) for _ in range(config.num_hidden_layers)]
    return cache


# name -> (format, scale dtype, one scale per head from the first prefill, scale bytes per token and head)
CONFIGURATIONS = {
    "e4m3, unit scale": ("e4m3", None, False, 0),
    "e4m3, per KV head (first prefill amax)": ("e4m3", torch.float32, True, 0),
    "e4m3, per token and head, fp32 scale": ("e4m3", torch.float32, False, 4),
    "e4m3, per token and head, bf16 scale": ("e4m3", torch.bfloat16, False, 2),
    "e4m3, per token and head, fp16 scale": ("e4m3", torch.float16, False, 2),
    "int8, per token and head, fp32 scale": ("int8", torch.float32, False, 4),
    "int8, per token and head, bf16 scale": ("int8", torch.bfloat16, False, 2),
    "int8, per token and head, fp16 scale": ("int8", torch.float16, False, 2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sequences", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--prefix", type=int, default=64)
    parser.add_argument("--step", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/token_head_scales.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(dtype=torch.float32)
    ids = evaluation_ids(tokenizer, sequences=args.sequences, seq_len=args.seq_len)
    head_dim = model.config.head_dim if getattr(model.config, "head_dim", None) else (
        model.config.hidden_size // model.config.num_attention_heads)  # fmt: skip
    factories = {name: (lambda f=f, s=s, p=p: cache_of(model.config, f, s, p))
                 for name, (f, s, p, _) in CONFIGURATIONS.items()}  # fmt: skip
    start = time.perf_counter()
    with torch.no_grad():
        rows = evaluate_configurations(model, ids, args.prefix, factories, step=args.step)
    seconds = time.perf_counter() - start
    for row in rows:
        scale_bytes = CONFIGURATIONS[row["configuration"]][3]
        row["bytes_per_element"] = 1 + scale_bytes / head_dim
    print(format_table(rows))
    sizes = ", ".join(f"{r['configuration']}: {r['bytes_per_element']:.4f}" for r in rows)
    print(f"bytes per cached element (head dim {head_dim}): {sizes}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = dict(command="python benchmarks/token_head_scales.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        model="SmolLM2-135M-Instruct (embedded)", dtype="float32", device="cpu", sequences=args.sequences,
        seq_len=args.seq_len, prefix=args.prefix, step=args.step, head_dim=head_dim, seconds=seconds,
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        git_sha=commit)  # fmt: skip
    with open(args.out, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=2)


if __name__ == "__main__":
    main()
