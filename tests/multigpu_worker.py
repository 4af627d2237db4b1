"""Greedy tokens of every cache configuration of ``tests/test_multigpu.py`` on one placement of a saved model.

Used by that test (pytest does not collect it: the name does not start with ``test_``):

- as a module: ``save_model_and_scales`` writes the model and its scales once; ``run_configurations(model, ...)``
  gives ``{configuration: tokens}`` for a model the caller placed (one GPU, or a ``device_map`` over several);
- as a script, ``torchrun --nproc-per-node N tests/multigpu_worker.py MODEL_DIR SCALES_DIR OUT_JSON [DTYPE]``: each
  rank loads the model in DTYPE (``float32`` or ``bfloat16``; default float32) with ``tp_plan="auto"`` (so it holds
  ``H_kv / N`` KV heads) and runs the same configurations; every rank checks it generated the same tokens, and rank 0
  writes ``{"tokens": {configuration: tokens}, "scales": {configuration: [layer-0 key scales of each rank]}, ...}``.
  CUDA ranks use NCCL; without CUDA, gloo on CPU (so the script also runs where CI runs).

Configurations: ``DynamicCache`` + SDPA in the model's dtype (the baseline: its own difference between placements
is the yardstick), the fake-quantized ``DynamicCache`` with unit scales + SDPA (``ORACLE``: what any FP8 cache with
those scales must hand to SDPA; its own difference between placements is what FP8 rounding makes of the model's),
then ``FP8Cache`` and ``FP8StaticCache`` x four scale sources (unit, on the fly per tensor, on the fly per KV head,
per-head scales from a compressed-tensors checkpoint) x both read paths (our attention, SDPA over dequantized K/V).
Static caches run eager (``disable_compile``): the placements are what is compared.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

SOURCES: dict[str, dict] = {
    "unit": {},
    "onthefly-tensor": {"calculate_kv_scales": True},
    "onthefly-head": {"calculate_kv_scales": True, "strategy": "attn_head"},
    "checkpoint-head": {},  # scales from SCALES_DIR (from_pretrained)
}
ATTENTIONS = ("hf_fp8cache", "sdpa")
BASELINE = "dynamic+sdpa"
ORACLE = "fp8-oracle/unit+sdpa"
NEW_TOKENS = 16
MAX_CACHE_LEN = 64  # prompt + NEW_TOKENS fit


def save_model_and_scales(directory: str | Path, head_dim: int = 64) -> tuple[Path, Path]:
    """A random Llama of 8 layers (16 query / 8 KV heads of ``head_dim``) saved to ``directory/model`` in fp32, and
    per-head KV scales for it (a compressed-tensors checkpoint, as llm-compressor writes) in ``directory/scales``.
    Runs compare loads of this one checkpoint: a model made in memory and cast differs from a reloaded one (its
    non-persistent RoPE buffers keep another dtype)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fp8cache import KVScales

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=16 * head_dim, intermediate_size=32 * head_dim,
                         num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8, head_dim=head_dim,
                         max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    directory = Path(directory)
    LlamaForCausalLM(config).save_pretrained(directory / "model")
    heads = torch.arange(8)
    KVScales([0.004 * (1 + 0.25 * heads) for _ in range(8)], [0.002 * (1 + 0.25 * heads) for _ in range(8)],
             "attn_head").save_pretrained(directory / "scales")  # fmt: skip
    return directory / "model", directory / "scales"


def configuration_names() -> list[str]:
    """The baseline, the oracle, then ``{fp8|fp8-static}/{source}+{attention}``."""
    return [BASELINE, ORACLE] + [f"{cache}/{source}+{attention}" for cache in ("fp8", "fp8-static")
                                 for source in SOURCES for attention in ATTENTIONS]  # fmt: skip


def _cache_factory(name: str, scales_dir: str | Path) -> tuple[str, Callable]:
    """(attention implementation, a function of the model config making a fresh cache) for configuration ``name``."""
    from transformers import DynamicCache

    from hf_fp8cache import FP8Cache, FP8StaticCache

    if name == BASELINE:
        return "sdpa", lambda config: DynamicCache(config=config)
    if name == ORACLE:
        from helpers import fake_quant_cache  # tests/ is on the path: pytest's rootdir, or this script's folder

        return "sdpa", lambda config: fake_quant_cache(config, "fp8")
    kind, rest = name.split("/")
    source, attention = rest.split("+")
    if source == "checkpoint-head":
        if kind == "fp8":
            return attention, lambda config: FP8Cache.from_pretrained(scales_dir, config)
        return attention, lambda config: FP8StaticCache.from_pretrained(scales_dir, config, MAX_CACHE_LEN)
    options = SOURCES[source]
    if kind == "fp8":
        return attention, lambda config: FP8Cache(config, **options)
    return attention, lambda config: FP8StaticCache(config, MAX_CACHE_LEN, **options)


def prompts(device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded rows of random ids (the second with 9 pad positions), on ``device``."""
    ids = torch.randint(3, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def generate(model, cache, ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The new greedy tokens of each row (generate's own compilation of static caches is off: eager everywhere)."""
    from hf_fp8cache.integration import cache_keyword

    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False, pad_token_id=0, disable_compile=True,
                         **{cache_keyword(model): cache})  # fmt: skip
    return out[:, ids.shape[1] :].tolist()


def run_configurations(model, scales_dir: str | Path, ids: torch.Tensor, mask: torch.Tensor):
    """``({configuration: tokens}, {configuration: layer-0 key scales as this process holds them})``."""
    tokens, scales = {}, {}
    for name in configuration_names():
        attention, make = _cache_factory(name, scales_dir)
        model.set_attn_implementation(attention)
        cache = make(model.config)
        with torch.no_grad():
            tokens[name] = generate(model, cache, ids, mask)
        layer = cache.layers[0]
        scales[name] = layer.key_scale.tolist() if hasattr(layer, "key_scale") else None
    model.set_attn_implementation("sdpa")
    return tokens, scales


def _gathered(value) -> list:
    """``value`` of every rank, in rank order."""
    import torch.distributed as dist

    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def main(model_dir: str, scales_dir: str, out_path: str, dtype_name: str = "float32") -> None:
    """One tensor-parallel rank: load ``model_dir`` in ``dtype_name`` with ``tp_plan="auto"``, run every
    configuration."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=dtype).eval()
    device = next(model.parameters()).device
    tokens, scales = run_configurations(model, scales_dir, *prompts(device))
    every_rank = _gathered(tokens)
    if any(other != tokens for other in every_rank):
        raise AssertionError("the ranks generated different tokens")
    scales_by_rank = _gathered(scales)
    if dist.get_rank() == 0:
        result = {"tokens": tokens, "world": dist.get_world_size(), "dtype": str(dtype),
                  "scales": {name: [rank[name] for rank in scales_by_rank] for name in tokens}}  # fmt: skip
        Path(out_path).write_text(json.dumps(result) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        raise SystemExit(f"usage: torchrun --nproc-per-node N {sys.argv[0]} MODEL_DIR SCALES_DIR OUT_JSON [DTYPE]")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(*sys.argv[1:])
