"""Where an eager decode step's host time goes inside ``model.generate`` (issue 14), 8B shape, on the GPU machine.

Forward hooks read ``time.perf_counter`` (host time: the device runs behind) at the edges of the decoder
(``model.model``), of every decoder layer and its ``self_attn``, and of ``lm_head``. For each decode step of one
generate call of 33 tokens the host time splits into:

- ``before_layers``: decoder entry to the first layer (embedding, the mask functions, rotary);
- ``attention``: the sum over layers of ``self_attn`` (projections, rotary, the cache update, the attention);
- ``rest_of_layers``: the layers' other host time (norms, MLP);
- ``after_layers``: last layer's end to the decoder's end (final norm);
- ``head``: ``lm_head``;
- ``outside_forward``: the decoder's end to the next step's decoder entry (generate's own work: logits processing,
  stopping criteria and their device sync, ``prepare_inputs_for_generation``, cache bookkeeping).

and ``device_step``: the device's time from one decode step's decoder entry to the next (CUDA events recorded at
each entry); a step whose device time is close to its host time is device-bound, one with the device idle half the
time host-bound. ``threads``: the process's OS threads during the call (another busy thread would slow every op).

Medians over the decode steps, per configuration of ``bench generate`` (default dynamic, fp8+attn; ``+nofuse``
appended to a configuration makes its layers leave the step's K/V write to a quantize launch instead of the
attention kernel, ``+nomemo`` launches every kernel through Triton's own ``kernel[grid]``), case 1x4096 by default.
Writes step_split.json to $OUT.

    python benchmarks/gpu/step_split.py [configs] [cases]
"""

import json
import os
import statistics
import sys
import time

import torch
from hf_fp8cache.kernels import launch

from hf_fp8cache.bench.common import build_model
from hf_fp8cache.bench.generate import CONFIGURATIONS, _timed_generate
from hf_fp8cache.cache_layer import FP8CacheLayer

out = os.environ.get("OUT", ".")
configs = (sys.argv[1] if len(sys.argv) > 1 else "dynamic,fp8+attn").split(",")
cases = [tuple(map(int, c.split("x"))) for c in (sys.argv[2] if len(sys.argv) > 2 else "1x4096").split(",")]
dev = torch.device("cuda")
model = build_model("llama-3.1-8b", dev, torch.bfloat16)
clock = time.perf_counter
marks: list[tuple[str, float]] = []  # (event, time) in call order
device_marks: list[torch.cuda.Event] = []  # one per decoder entry


def record_device_mark(*_args, **_kwargs):
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    device_marks.append(event)


def mark(name):
    return lambda *_args, **_kwargs: marks.append((name, clock()))


decoder = model.model
decoder.register_forward_pre_hook(mark("decoder_in"))
decoder.register_forward_pre_hook(record_device_mark)
decoder.register_forward_hook(mark("decoder_out"))
for layer in decoder.layers:
    layer.register_forward_pre_hook(mark("layer_in"))
    layer.register_forward_hook(mark("layer_out"))
    layer.self_attn.register_forward_pre_hook(mark("attn_in"))
    layer.self_attn.register_forward_hook(mark("attn_out"))
model.lm_head.register_forward_pre_hook(mark("head_in"))
model.lm_head.register_forward_hook(mark("head_out"))


def split_steps() -> list[dict[str, float]]:
    """Per decode step (the prefill dropped), the host time of each part in ms."""
    steps, current = [], None
    last_out = None
    for name, t in marks:
        if name == "decoder_in":
            if current is not None:
                current["outside_forward"] = t - last_out
                steps.append(current)
            current = dict(before_layers=0.0, attention=0.0, rest_of_layers=0.0, after_layers=0.0, head=0.0)
            entered = t
            first_layer = None
        elif name == "layer_in":
            if first_layer is None:
                first_layer = t
                current["before_layers"] = t - entered
            layer_in = t
        elif name == "attn_in":
            attn_in = t
        elif name == "attn_out":
            current["attention"] += t - attn_in
        elif name == "layer_out":
            current["rest_of_layers"] += t - layer_in
            layer_out = t
        elif name == "decoder_out":
            current["after_layers"] = t - layer_out
            last_out = t
        elif name == "head_in":
            head_in = t
        elif name == "head_out":
            current["head"] = t - head_in
            last_out = t
    for step in steps:
        step["rest_of_layers"] -= step["attention"]
    return [{k: v * 1e3 for k, v in s.items()} for s in steps[1:]]  # steps[0] is the prefill


rows = []
direct = launch._DIRECT
claims = FP8CacheLayer._decode_write_waits
for B, L in cases:
    ids = torch.randint(100, 20000, (B, L), device=dev, generator=torch.Generator(device=dev).manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for name in configs:
        cfg = CONFIGURATIONS[name.removesuffix("+nomemo").removesuffix("+nofuse")]
        FP8CacheLayer._decode_write_waits = claims if "+nofuse" not in name else lambda *_: False
        launch._DIRECT = direct and "+nomemo" not in name
        model.set_attn_implementation(cfg.attention)

        def gen(n, cfg=cfg, inputs=inputs, L=L):
            return _timed_generate(model, inputs, n, cfg.make_cache(model.config, L + 40), {})[0]

        gen(33), gen(1)
        per_token = statistics.median((gen(33) - gen(1)) / 32 * 1e3 for _ in range(3))
        marks.clear()
        device_marks.clear()
        gen(33)
        threads = len(os.listdir("/proc/self/task"))
        steps = split_steps()
        parts = {k: statistics.median(s[k] for s in steps) for k in steps[0]}
        parts["device_step"] = statistics.median(
            a.elapsed_time(b) for a, b in zip(device_marks[1:-1], device_marks[2:])
        )
        row = dict(case=f"{B}x{L}", config=name, per_token_ms=per_token, steps=len(steps), threads=threads, **parts)
        rows.append(row)
        split = " ".join(f"{k} {v:6.3f}" for k, v in parts.items())
        print(f"{B}x{L} {name:16s} per token {per_token:6.2f} ms, {threads} threads | {split}", flush=True)
with open(f"{out}/step_split.json", "w") as fh:
    json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), fh, indent=2)
