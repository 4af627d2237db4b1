"""What a static cache adds to each compiled step's guard check (issue 14, item 3), measured on this machine's CPU.

``generate`` runs a compiled decode step through TorchDynamo, which checks the step's guards before every call
("TorchDynamo Cache Lookup" in torch.profiler). On the H200 (2026-12-03, 8B shape, 32 layers) that check took 0.92 ms
a step with ``FP8StaticCache`` and 1.40 ms with per-token-head scales, of a 12 ms step that ``generate`` synchronizes
once a token: host time that adds to the device time instead of hiding behind it.

This script compiles a random tiny Llama's forward (``backend="eager"``, ``fullgraph=True``: the guards are those
``generate``'s compile gets) over transformers' ``StaticCache`` and ``FP8StaticCache`` (one scale, and
``strategy="token_head"``) at two layer counts, and reports per configuration:

- the guard check a call, two ways: the compiled entry's guard manager called directly (the fastest of 20 batches
  of 100 checks: what the check costs, robust to a busy host), and "TorchDynamo Cache Lookup" in torch.profiler
  (median of ``ROUNDS`` profiled runs of 20 calls: what the H200 profile shows, profiler overhead included);
  each with its slope per layer;
- the guards on one layer of the cache, by kind (from ``torch._dynamo``'s guard log): every tensor the step reads
  from a layer brings a ``TENSOR_MATCH`` and five ``DIMENSION_DYNAMIC_MARKING_GUARD``s (attribute probes).

    python benchmarks/guard_cost.py [OUT_DIR]      (~2 min) -> OUT_DIR/guard_cost.json
"""

import collections
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch.profiler import profile
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import hf_fp8cache.integration  # noqa: F401  (registers the attention)
from hf_fp8cache import FP8StaticCache

LAYERS = (2, 16)
ROUNDS = 3
CONFIGS = {
    "transformers StaticCache + sdpa": lambda config: StaticCache(config=config, max_cache_len=64),
    "FP8StaticCache + hf_fp8cache": lambda config: FP8StaticCache(config, 64),
    "FP8StaticCache token_head + hf_fp8cache": lambda config: FP8StaticCache(config, 64, strategy="token_head"),
}


def tiny_model(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=1000)  # fmt: skip
    return LlamaForCausalLM(config).eval()


class _GuardLog(logging.Handler):
    """Collects the guard tree dynamo logs (``torch._logging`` artifact ``guards``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.extend(record.getMessage().splitlines())


def compiled_step(name: str, layers: int):
    """The model, its cache and the compiled forward of configuration ``name``, after a prefill (eager) and one
    compiled decode step, and the keyword arguments of the next step."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = tiny_model(layers)
    if not name.startswith("transformers"):
        model.set_attn_implementation("hf_fp8cache")
    cache = CONFIGS[name](model.config)
    step = torch.compile(model.forward, backend="eager", fullgraph=True)
    token = torch.tensor([[5]])
    with torch.no_grad():
        model(torch.randint(3, 900, (1, 8)), past_key_values=cache)
        step(input_ids=token, past_key_values=cache, cache_position=torch.tensor([8]))
    return model, step, dict(input_ids=token, past_key_values=cache, cache_position=torch.tensor([9]))


def direct_check_us(name: str, layers: int) -> float:
    """Microseconds of one call of the compiled entry's guard manager, the fastest of 20 batches of 100."""
    model, _, kwargs = compiled_step(name, layers)
    managers, frame = [], {"args": (model,), "kwargs": kwargs}  # the compiled frame: a decorator's (*args, **kwargs)
    function = type(model).forward
    while function is not None:
        entries = _debug_get_cache_entry_list(function.__code__)
        if entries:
            managers += [entry.guard_manager for entry in entries]
            frame.update(zip(function.__code__.co_freevars, (c.cell_contents for c in function.__closure__ or ())))
        function = getattr(function, "__wrapped__", None)
    if len(managers) != 1:
        raise RuntimeError(f"{name}: expected one compiled entry, found {len(managers)}")
    best = float("inf")
    with torch.no_grad():  # the grad mode is guarded
        if not managers[0].check(frame):
            raise RuntimeError(f"{name}: the guards fail on the step's own frame: {managers[0].check_verbose(frame)}")
        for _ in range(20):
            start = time.perf_counter()
            for _ in range(100):
                managers[0].check(frame)
            best = min(best, (time.perf_counter() - start) * 1e4)
    return best


def profiled_lookup_us(name: str, layers: int) -> float:
    """Microseconds of "TorchDynamo Cache Lookup" a call of the compiled step under torch.profiler (20 calls)."""
    _, step, kwargs = compiled_step(name, layers)
    with torch.no_grad():
        for position in range(9, 12):  # warm
            step(**{**kwargs, "cache_position": torch.tensor([position])})
        with profile() as prof:
            for position in range(12, 32):
                step(**{**kwargs, "cache_position": torch.tensor([position])})
    lookups = [e for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup"]
    return lookups[0].cpu_time_total / lookups[0].count


def guards_of_one_layer(lines: list[str]) -> dict[str, int]:
    """Guards whose source is the cache's layer 1, by kind (aliasing guards between layers excluded)."""
    kinds = collections.Counter()
    for line in lines:
        if "layers[1]" in line and "+- " in line and "GuardManager" not in line and "NO_TENSOR_ALIASING" not in line:
            kinds[line.split("+- ", 1)[1].split(":", 1)[0]] += 1
    return dict(kinds.most_common())


def main(out_dir: Path) -> None:
    rows = []
    guard_logger = logging.getLogger("torch._dynamo.guards")
    for name in CONFIGS:
        row = {"config": name}
        for method, timer in (("direct", direct_check_us), ("profiled", profiled_lookup_us)):
            times = {n: statistics.median(timer(name, n) for _ in range(ROUNDS)) for n in LAYERS}
            row.update({f"{method}_us_{n}_layers": round(t, 1) for n, t in times.items()})
            row[f"{method}_us_per_layer"] = round((times[LAYERS[1]] - times[LAYERS[0]]) / (LAYERS[1] - LAYERS[0]), 2)
        handler = _GuardLog()
        torch._logging.set_logs(guards=True)
        guard_logger.addHandler(handler)
        compiled_step(name, 2)
        guard_logger.removeHandler(handler)
        torch._logging.set_logs()
        rows.append({**row, "guards_of_one_layer": guards_of_one_layer(handler.lines)})
    print(f"dynamo guard check a compiled decode step, torch {torch.__version__}, CPU; median of {ROUNDS} runs")
    print(
        f"{'configuration':42s} {'direct: ' + str(LAYERS[0]):>11s} {LAYERS[1]:>4d} layers  a layer     "
        f"{'profiled: ' + str(LAYERS[0]):>13s} {LAYERS[1]:>4d} layers  a layer     tensors a layer"
    )
    base = {method: rows[0][f"{method}_us_per_layer"] for method in ("direct", "profiled")}
    for row in rows:
        cells = "".join(
            f"{row[f'{m}_us_{LAYERS[0]}_layers']:8.1f} us {row[f'{m}_us_{LAYERS[1]}_layers']:7.1f} us "
            f"{row[f'{m}_us_per_layer']:5.2f} us ({row[f'{m}_us_per_layer'] / base[m]:3.1f}x)  "
            for m in ("direct", "profiled")
        )
        print(f"{row['config']:42s} {cells}{row['guards_of_one_layer'].get('TENSOR_MATCH', 0):3d}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "guard_cost.json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
