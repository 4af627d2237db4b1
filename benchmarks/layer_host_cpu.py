"""Host (Python) time of one eager decode layer of ``FP8Cache``, on this machine's CPU (issue 14).

The eager decode step is host-bound on the H200 (docs/benchmarks.md, "Decode through ``model.generate``"), and the
Python our cache and attention run each layer is part of that host time. This script measures it without a GPU, at
the Llama-8B head shape (1x4096, 32 q / 8 KV heads, d=128, bf16 CPU tensors), with the Triton launches replaced by
no-ops, so only our Python is timed (the launch itself, Triton's launcher, is measured on the GPU machine by
``benchmarks/gpu/layer_profile.py``). Two paths: ``our attention`` (the layer's ``update`` and
``fp8_attention_forward``) and ``dequantize`` (``update`` for another attention: the token's quantize-append and the
history dequantized into the workspace; the model's SDPA after it is not ours). Two variants, interleaved in rounds:

- ``validated once``: the shipped path, where the layer's launch memo remembers the last validated call form of each
  kernel and a step like it checks only its lengths or position (``kernels/attention.py``, ``kernels/dispatch.py``);
- ``every call checked``: the same with the memo's ``check_once`` checking every call (every step runs each kernel's
  checks in full, as before that change, plus the memo's bookkeeping of the call form).

    TRITON_INTERPRET=1 python benchmarks/layer_host_cpu.py [OUT_DIR]   (~1 min) -> OUT_DIR/layer_host_cpu.json
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1 (CPU tensors take the Triton path only under the interpreter)")

import hf_fp8cache.kernels.attention as attention_kernel
import hf_fp8cache.kernels.dequantize as dequantize_kernel
import hf_fp8cache.kernels.quantize as quantize_kernel
import torch
from hf_fp8cache.kernels import LaunchMemo
from transformers import LlamaConfig

from hf_fp8cache import FP8Cache
from hf_fp8cache.attention import fp8_attention_forward

H, HQ, D, B, L = 8, 32, 128, 1, 4096
ROUNDS, STEPS = 7, 2000


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = HQ // H


def layer_step(path: str):
    """One layer's decode step over a 4096-token FP8Cache on ``path``, the length kept fixed."""
    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=HQ, num_key_value_heads=H, head_dim=D,
                         hidden_size=HQ * D)  # fmt: skip
    config._attn_implementation = "hf_fp8cache" if path == "our attention" else "sdpa"
    module, generator = _Module(), torch.Generator().manual_seed(0)
    query = torch.randn(B, 1, HQ, D, generator=generator, dtype=torch.bfloat16).transpose(1, 2)
    token = torch.randn(B, H, 1, D, generator=generator, dtype=torch.bfloat16)
    prompt = torch.randn(B, H, L, D, generator=generator, dtype=torch.bfloat16)
    cache = FP8Cache(config)
    cache.update(prompt, prompt, 0)
    layer = cache.layers[0]

    def step() -> None:
        key, value = cache.update(token, token, 0)
        if path == "our attention":
            fp8_attention_forward(module, query, key, value, None, scaling=D**-0.5)
        layer.length -= 1

    return step


def _check_every_call(memo, kernel, form, tensors, check, arguments) -> bool:
    check(*arguments)
    return True


def us_per_step(step) -> float:
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    return (time.perf_counter() - start) / STEPS * 1e6


def main(out_dir: Path) -> None:
    for module in (attention_kernel, quantize_kernel, dequantize_kernel):
        module.launch = lambda *args, **kwargs: None  # our Python only
    remembered = LaunchMemo.check_once
    variants = {"validated once": remembered, "every call checked": _check_every_call}
    print(f"one eager decode layer's Python, 1x{L}, {HQ} q / {H} KV heads, d={D}, launches stubbed; median of "
          f"{ROUNDS} interleaved rounds of {STEPS} steps (torch {torch.__version__})")  # fmt: skip
    rows = []
    for path in ("our attention", "dequantize"):
        step = layer_step(path)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(ROUNDS):
            for name, check_once in variants.items():
                LaunchMemo.check_once = check_once
                step()  # (re)validates under this variant
                times[name].append(us_per_step(step))
        LaunchMemo.check_once = remembered
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, values in times.items():
            ratio = medians[name] / medians["every call checked"]
            print(f"{path:14s} {name:20s} {medians[name]:6.2f} us a layer ({ratio:.2f}x)")
            rows.append({"path": path, "variant": name, "us_per_layer": round(medians[name], 2),
                         "rounds_us": [round(t, 2) for t in values]})  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "layer_host_cpu.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
