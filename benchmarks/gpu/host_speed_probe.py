"""Is the host slower while our cache runs, and why (issue 14)? 8B shape, 1x4096, on the GPU machine.

A decode-only profile (``decode_profile.py``) shows every torch op of the model -- ``aten::view`` as much as
``aten::mm`` -- taking 1.6-2x the host time in an ``FP8Cache`` generate that it takes in a ``DynamicCache`` one, with
the same op counts. This probe tells a slower core from slower code. During each decode step of one generate (a
logits processor runs it) it times a fixed CPU workload -- a pure Python loop, and a loop of small torch ops on CPU
tensors -- and over the call it reads every thread's CPU time of this process (``/proc/self/task``), the machine's
busy time (``/proc/stat``), and the process's resource use a step (``getrusage``: user and system CPU time, voluntary
and involuntary context switches, minor page faults: system time or switches that grow with our path would point at
syscalls in it, whose kernel entries can slow the user code that follows). Configurations alternate (dynamic,
fp8+attn, dynamic, fp8+attn, ...).

If the workload slows in the FP8 call, the core itself is slower (another busy thread, frequency); if it does not,
the cost is in what runs between the model's ops.

    python benchmarks/gpu/host_speed_probe.py [configs] [BxL] [rounds]     # writes host_speed_probe.json to $OUT
"""

import json
import os
import resource
import statistics
import sys
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from hf_fp8cache.bench.common import build_model, sync
from hf_fp8cache.bench.generate import CONFIGURATIONS

out = os.environ.get("OUT", ".")
configs = (sys.argv[1] if len(sys.argv) > 1 else "dynamic,fp8+attn").split(",")
B, L = map(int, (sys.argv[2] if len(sys.argv) > 2 else "1x4096").split("x"))
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
N = 32
dev = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu SHAPE=tiny: a CPU dry run
model = build_model(os.environ.get("SHAPE", "llama-3.1-8b"), dev, torch.bfloat16)
ids = torch.randint(
    100, min(20000, model.config.vocab_size), (B, L), device=dev, generator=torch.Generator(device=dev).manual_seed(0)
)
small = torch.zeros(4)


def workload() -> tuple[float, float]:
    """Microseconds of a pure Python loop and of 200 small CPU torch ops."""
    start = time.perf_counter()
    total = 0
    for i in range(20000):
        total += i
    middle = time.perf_counter()
    for _ in range(200):
        small.view(2, 2).t()
    end = time.perf_counter()
    return (middle - start) * 1e6, (end - middle) * 1e6


class Probe(LogitsProcessor):
    def __init__(self) -> None:
        self.python_us: list[float] = []
        self.torch_us: list[float] = []

    def __call__(self, input_ids, scores):
        python_us, torch_us = workload()
        self.python_us.append(python_us)
        self.torch_us.append(torch_us)
        return scores


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, by 'tid name'."""
    times = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        times[f"{tid} {name}"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return times


def machine_busy() -> tuple[float, float]:
    with open("/proc/stat") as fh:
        values = list(map(int, fh.readline().split()[1:]))
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def rusage() -> dict[str, float]:
    """This process's user / system CPU microseconds, context switches (voluntary, involuntary) and minor faults."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return dict(user_us=r.ru_utime * 1e6, system_us=r.ru_stime * 1e6, voluntary_switches=r.ru_nvcsw,
                involuntary_switches=r.ru_nivcsw, minor_faults=r.ru_minflt)  # fmt: skip


def generate(cfg, tokens: int, probe: Probe | None = None) -> float:
    cache = cfg.make_cache(model.config, L + N + 1)
    sync(dev)
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=tokens,
                   min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                   logits_processor=LogitsProcessorList([probe]) if probe else None)  # fmt: skip
    sync(dev)
    return time.perf_counter() - start


rows = []
print(f"idle workload: python {statistics.median(workload()[0] for _ in range(20)):.1f} us, "
      f"torch {statistics.median(workload()[1] for _ in range(20)):.1f} us", flush=True)  # fmt: skip
with torch.no_grad():
    for name in configs:  # compile and warm every configuration first
        model.set_attn_implementation(CONFIGURATIONS[name].attention)
        generate(CONFIGURATIONS[name], N + 1), generate(CONFIGURATIONS[name], 1)
    for round_ in range(rounds):
        for name in configs:
            cfg = CONFIGURATIONS[name]
            model.set_attn_implementation(cfg.attention)
            short = generate(cfg, 1)
            probe = Probe()
            threads_before, busy_before, usage_before = thread_cpu(), machine_busy(), rusage()
            long = generate(cfg, N + 1, probe)
            threads_after, busy_after, usage_after = thread_cpu(), machine_busy(), rusage()
            per_step = {k: round((usage_after[k] - usage_before[k]) / (N + 1), 2) for k in usage_after}
            per_token = (long - short) / N * 1e3
            busy = {k: round(threads_after[k] - threads_before.get(k, 0.0), 3) for k in threads_after}
            busy = {k: v for k, v in busy.items() if v > 0.01}
            cores_busy = (busy_after[0] - busy_before[0]) / max(1, busy_after[1] - busy_before[1]) * os.cpu_count()
            row = dict(round=round_, config=name, per_token_ms=per_token, call_s=long,
                       python_us=statistics.median(probe.python_us), torch_us=statistics.median(probe.torch_us),
                       machine_cores_busy=cores_busy, thread_cpu_s=busy, rusage_per_step=per_step)  # fmt: skip
            rows.append(row)
            print(f"{round_} {name:12s} {per_token:6.2f} ms/token, workload python {row['python_us']:7.1f} us torch "
                  f"{row['torch_us']:6.1f} us, machine cores busy {cores_busy:4.1f}, threads (s of {long:.2f}): "
                  f"{busy}, a step: {per_step}", flush=True)  # fmt: skip
with open(f"{out}/host_speed_probe.json", "w") as fh:
    json.dump(
        dict(gpu=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__, rows=rows),
        fh,
        indent=2,
    )
