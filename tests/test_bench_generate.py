"""The default benchmark, ``model.generate`` per cache, on the tiny shape on CPU: every configuration gives a row
whose numbers agree with each other and with the same run's DynamicCache row (the timings themselves are the GPU
machine's business; CPU times here only have to be positive)."""

import contextlib
import dataclasses
import importlib.util
import io
import json

import pytest
import torch
from helpers import quick_cpu

from hf_fp8cache.bench import generate
from hf_fp8cache.bench.generate import CONFIGURATIONS, run_generate_benchmark

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

B, L, N = 2, 24, 6
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16  # the tiny shape
SCALE_BYTES = LAYERS * 2 * 4  # one fp32 scale per layer for K and for V


def _kv_bytes(tokens: int, itemsize: int) -> int:
    return LAYERS * 2 * B * KV_HEADS * tokens * HEAD_DIM * itemsize


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("generate")
    printed = io.StringIO()
    with quick_cpu(), contextlib.redirect_stdout(printed):
        rows = run_generate_benchmark(cases=((B, L),), model_shape="tiny", new_tokens=N, repeats=3, device="cpu",
                                      dtype=torch.bfloat16, out_dir=out)  # fmt: skip
    return {row["config"]: row for row in rows}, rows, out, printed.getvalue()


def test_every_configuration_gives_a_row_with_positive_consistent_times(run):
    by, rows, _, _ = run
    assert list(by) == list(CONFIGURATIONS)
    for row in rows:
        if row["config"] == "hf-quantized-fp8" and generate._hf_fp8_missing():  # transformers < 5.21
            assert row["status"].startswith("skipped: transformers ") and row["ms_per_token"] is None
            continue
        assert row["status"] == "ok", row
        assert row["ms_per_token"] > 0 and row["ttft_ms"] > 0
        assert row["tokens_per_s"] == pytest.approx(B / (row["ms_per_token"] / 1e3))
        assert row["compiled"] is False  # generate compiles on CUDA only
        assert row["peak_bytes"] is None  # CUDA only
        assert (row["case"], row["B"], row["L"], row["new_tokens"], row["repeats"]) == (f"{B}x{L}", B, L, N, 3)
        assert row["dtype"] == "bfloat16" and row["gpu"] == "cpu" and row["git_sha"]


def test_kv_bytes_of_each_cache(run):
    by, _, _, _ = run
    tokens = L + N  # the prompt and every generated token but the last
    dynamic = _kv_bytes(tokens, 2)  # bf16
    assert by["dynamic"]["kv_bytes"] == by["dynamic"]["kv_allocated_bytes"] == dynamic
    # FP8: half of DynamicCache's bytes plus the scales; allocated in 256-token steps of capacity (the amortized spare)
    for name in ("fp8", "fp8+attn"):
        assert by[name]["kv_bytes"] == dynamic // 2 + SCALE_BYTES
        assert by[name]["kv_allocated_bytes"] == _kv_bytes(256, 1) + SCALE_BYTES
    for name in ("fp8-token-head+attn", "int8-token-head+attn"):  # a bf16 scale per token and KV head, K and V
        assert by[name]["kv_bytes"] == dynamic // 2 + LAYERS * 2 * B * KV_HEADS * tokens * 2
    ring = _kv_bytes(generate.RECENT_EXACT, 2)  # the 16 most recent tokens also in bf16
    assert by["fp8+attn+exact16"]["kv_bytes"] == dynamic // 2 + SCALE_BYTES + ring
    # static caches hold what they allocate: ours max_cache_len = L + N + 1 tokens, transformers' as generate sizes it
    assert by["fp8-static+attn"]["kv_bytes"] == by["fp8-static+attn"]["kv_allocated_bytes"]
    assert by["fp8-static+attn"]["kv_bytes"] == _kv_bytes(tokens + 1, 1) + SCALE_BYTES
    capacity = tokens + 1 + (tokens + 1) % 2  # with per-token-head scales: max_cache_len rounded up to even
    for name in ("fp8-static-token-head+attn", "int8-static-token-head+attn"):  # the codes and their bf16 scales
        assert by[name]["kv_bytes"] == _kv_bytes(capacity, 1) + LAYERS * 2 * B * KV_HEADS * capacity * 2
    assert by["static"]["kv_bytes"] in (dynamic, _kv_bytes(tokens + 1, 2))
    # attach(static=True): the cache the hook sized for 24 + 6 tokens, rounded up to its 256-token minimum
    for name in ("fp8-attach-static+attn", "fp8-attach-graphs+attn"):
        assert by[name]["kv_bytes"] == _kv_bytes(256, 1) + SCALE_BYTES
    assert by["fp8-attach-graphs+attn"]["compiled"] is False  # (on CPU nothing is captured either: no CUDA)
    if by["hf-quantized-fp8"]["status"] == "ok":  # transformers' fp8 layers: the codes and a 4-byte scale a tensor
        assert by["hf-quantized-fp8"]["kv_bytes"] == dynamic // 2 + SCALE_BYTES


def test_ratios_are_to_the_same_runs_dynamic_row(run):
    by, rows, _, _ = run
    dynamic = by["dynamic"]
    for row in rows:
        if row["status"] != "ok":
            assert row["ms_per_token_vs_dynamic"] is None and row["kv_bytes_vs_dynamic"] is None
            continue
        assert row["ms_per_token_vs_dynamic"] == pytest.approx(row["ms_per_token"] / dynamic["ms_per_token"])
        assert row["tokens_per_s_vs_dynamic"] == pytest.approx(row["tokens_per_s"] / dynamic["tokens_per_s"])
        assert row["ttft_vs_dynamic"] == pytest.approx(row["ttft_ms"] / dynamic["ttft_ms"])
        assert row["kv_bytes_vs_dynamic"] == pytest.approx(row["kv_bytes"] / dynamic["kv_bytes"])
        assert row["peak_vs_dynamic"] is None
    assert dynamic["ms_per_token_vs_dynamic"] == dynamic["kv_bytes_vs_dynamic"] == 1.0
    assert by["fp8"]["kv_bytes_vs_dynamic"] == pytest.approx(0.5 + SCALE_BYTES / _kv_bytes(L + N, 2))


def test_rows_are_printed_and_written(run):
    by, rows, out, printed = run
    assert f"{N} new tokens" in printed and "tiny bfloat16" in printed
    line = next(line.split() for line in printed.splitlines() if line.split()[:2] == [f"{B}x{L}", "fp8"])
    assert line[9] == f"{by['fp8']['kv_bytes_vs_dynamic']:.3f}"  # KV MiB /dyn, the 10th cell
    assert line[-2:] == ["no", "ok"]
    assert json.loads((out / "generate_benchmark.json").read_text()) == rows
    csv_lines = (out / "generate_benchmark.csv").read_text().splitlines()
    assert csv_lines[0].startswith("case,B,L,config,description,ms_per_token,tokens_per_s")
    assert len(csv_lines) == 1 + len(CONFIGURATIONS)
    assert (out / "generate_benchmark.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_per_token_time_is_the_difference_of_two_generates_over_n(tmp_path, monkeypatch):
    # a clock where every generate costs 10 ms plus 2 ms a token after the first (3 ms with FP8)
    real = generate._timed_generate

    def timed(model, inputs, new_tokens, cache, extra):
        _, cache = real(model, inputs, new_tokens, cache, extra)
        per_token = 0.003 if isinstance(cache, generate.FP8Cache) else 0.002
        return 0.010 + per_token * (new_tokens - 1), cache

    monkeypatch.setattr(generate, "_timed_generate", timed)
    with quick_cpu():
        rows = run_generate_benchmark(cases=((4, 8),), model_shape="tiny", new_tokens=5, repeats=2, device="cpu",
                                      configs=["dynamic", "fp8"], out_dir=tmp_path)  # fmt: skip
    dynamic, fp8 = rows
    assert (dynamic["ms_per_token"], dynamic["ttft_ms"], dynamic["generate_ms"]) == pytest.approx((2.0, 10.0, 20.0))
    assert dynamic["tokens_per_s"] == pytest.approx(4 / 0.002)  # B / per-token time
    assert (fp8["ms_per_token"], fp8["ms_per_token_vs_dynamic"]) == pytest.approx((3.0, 1.5))
    assert fp8["tokens_per_s_vs_dynamic"] == pytest.approx(2 / 3) and fp8["ttft_vs_dynamic"] == pytest.approx(1.0)


def test_rounds_take_each_ratio_within_its_round_then_the_median(tmp_path, monkeypatch):
    # the host slows down round after round (x1, x2, x3): the per-token times drift, the ratio within a round does not
    real = generate._timed_generate
    calls = []

    def timed(model, inputs, new_tokens, cache, extra):
        _, cache = real(model, inputs, new_tokens, cache, extra)
        calls.append(new_tokens)
        drift = 1 + (len(calls) - 1) // 8  # 4 calls (2 warm-up, 1 timed pair) per configuration, 2 configurations
        per_token = 0.003 if isinstance(cache, generate.FP8Cache) else 0.002
        return drift * (0.010 + per_token * (new_tokens - 1)), cache

    monkeypatch.setattr(generate, "_timed_generate", timed)
    with quick_cpu():
        rows = run_generate_benchmark(cases=((2, 8),), model_shape="tiny", new_tokens=5, rounds=3, device="cpu",
                                      configs=["dynamic", "fp8"], out_dir=tmp_path)  # fmt: skip
    assert len(calls) == 24
    dynamic, fp8 = rows
    assert dynamic["ms_per_token_rounds"] == pytest.approx([2.0, 4.0, 6.0])
    assert fp8["ms_per_token_rounds"] == pytest.approx([3.0, 6.0, 9.0])
    assert (dynamic["ms_per_token"], fp8["ms_per_token"]) == pytest.approx((4.0, 6.0))  # medians over the rounds
    assert fp8["ms_per_token_vs_dynamic"] == pytest.approx(1.5) and dynamic["rounds"] == 3


def test_warmup_tokens_warm_up_on_the_prompts_start_and_time_the_whole_prompt(tmp_path, monkeypatch):
    real = generate._timed_generate
    prompts = []

    def recording(model, inputs, new_tokens, cache, extra):
        prompts.append((new_tokens, tuple(inputs["input_ids"].shape), tuple(inputs["attention_mask"].shape)))
        return real(model, inputs, new_tokens, cache, extra)

    monkeypatch.setattr(generate, "_timed_generate", recording)
    with quick_cpu():
        rows = run_generate_benchmark(cases=((2, 12),), model_shape="tiny", new_tokens=3, device="cpu",
                                      configs=["fp8-static+attn"], out_dir=tmp_path, warmup_tokens=5)  # fmt: skip
    # two warm-up calls on 5 tokens, then the timed pair on all 12
    assert prompts == [(4, (2, 5), (2, 5)), (1, (2, 5), (2, 5)), (4, (2, 12), (2, 12)), (1, (2, 12), (2, 12))]
    assert rows[0]["status"] == "ok" and rows[0]["warmup_tokens"] == 5


def test_warmup_tokens_leave_a_cache_sized_per_call_to_warm_up_on_the_whole_prompt(tmp_path, monkeypatch):
    real = generate._timed_generate
    prompts = []

    def recording(model, inputs, new_tokens, cache, extra):
        prompts.append((new_tokens, tuple(inputs["input_ids"].shape)))
        return real(model, inputs, new_tokens, cache, extra)

    monkeypatch.setattr(generate, "_timed_generate", recording)
    with quick_cpu():
        rows = run_generate_benchmark(cases=((2, 12),), model_shape="tiny", new_tokens=3, device="cpu",
                                      configs=["dynamic", "fp8-attach-static+attn"], out_dir=tmp_path,
                                      warmup_tokens=5)  # fmt: skip
    # dynamic warms up on 5 tokens; the attached static cache, sized per call, on all 12 (its timed length)
    assert prompts == [(4, (2, 5)), (1, (2, 5)), (4, (2, 12)), (1, (2, 12)),
                       (4, (2, 12)), (1, (2, 12)), (4, (2, 12)), (1, (2, 12))]  # fmt: skip
    assert [row["status"] for row in rows] == ["ok", "ok"]


def test_out_of_memory_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def no_memory(config, max_cache_len):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    patched = {**CONFIGURATIONS, "fp8": dataclasses.replace(CONFIGURATIONS["fp8"], make_cache=no_memory),
               "static": dataclasses.replace(CONFIGURATIONS["static"], missing=lambda: "not here")}  # fmt: skip
    monkeypatch.setattr(generate, "CONFIGURATIONS", patched)
    with quick_cpu():
        rows = run_generate_benchmark(cases=((1, 8),), model_shape="tiny", new_tokens=2, device="cpu",
                                      configs=["dynamic", "fp8", "static", "fp8+attn"], out_dir=tmp_path)  # fmt: skip
    by = {row["config"]: row for row in rows}
    assert by["fp8"]["status"] == "OOM" and by["fp8"]["ms_per_token"] is None and by["fp8"]["kv_bytes"] is None
    assert by["fp8"]["error"] == "CUDA out of memory. Tried to allocate 64.00 GiB"
    assert by["static"]["status"] == "skipped: not here"
    assert by["dynamic"]["status"] == by["fp8+attn"]["status"] == "ok"  # measured after the OOM, with its attention
    fp8 = LAYERS * 2 * KV_HEADS * (8 + 2) * HEAD_DIM  # batch 1, 8 + 2 tokens, one byte each; the model is fp32
    assert by["fp8+attn"]["kv_bytes_vs_dynamic"] == pytest.approx((fp8 + SCALE_BYTES) / (4 * fp8))
    assert any(line.split()[1:] == ["fp8", *["-"] * 11, "-", "OOM"] for line in capsys.readouterr().out.splitlines())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"new_tokens": 0}, "new_tokens must be an int >= 1, got 0"),
        ({"repeats": 0}, "repeats must be an int >= 1, got 0"),
        ({"rounds": True}, "rounds must be an int >= 1, got True"),
        ({"cases": ((8, 0),)}, r"cases must be \(batch, prompt tokens\) pairs, each >= 1, got \(\(8, 0\),\)"),
        ({"configs": ["dynamic", "fp9"]}, r"configs must be among \['dynamic', .*got \['dynamic', 'fp9'\]"),
        ({"model_shape": "llama-70b"}, "model_shape must be one of .*got 'llama-70b'"),
        ({"sdpa": "fastest"}, "sdpa must be one of .*got 'fastest'"),
        ({"warmup_tokens": 0}, "warmup_tokens must be None or an int >= 1, got 0"),
    ],
)
def test_bad_settings_are_refused_by_name_before_building_a_model(kwargs, match, monkeypatch, tmp_path):
    monkeypatch.setattr(generate, "build_model", lambda *args: pytest.fail("built a model for bad settings"))
    with pytest.raises(ValueError, match=match):
        run_generate_benchmark(**{"device": "cpu", "out_dir": tmp_path, **kwargs})


# GPT-OSS- and Gemma-3-shaped tiny models (one sliding layer of window 8, one full layer; 2 KV heads of d=16), run
# with the configurations the GPU run of issue 15 measures
FAMILY_CONFIGS = ["dynamic", "fp8+attn", "fp8-static+attn"]
WINDOW, FAMILY_L, FAMILY_N = 8, 20, 4
TOKEN_BYTES = 2 * B * KV_HEADS * HEAD_DIM  # K and V of one token in one layer, one byte an element


@pytest.fixture(scope="module", params=["tiny-gpt-oss", "tiny-gemma-3"])
def family_run(request, tmp_path_factory):
    printed = io.StringIO()
    with quick_cpu(), contextlib.redirect_stdout(printed):
        rows = run_generate_benchmark(cases=((B, FAMILY_L),), model_shape=request.param, new_tokens=FAMILY_N,
                                      device="cpu", dtype=torch.bfloat16, configs=FAMILY_CONFIGS,
                                      out_dir=tmp_path_factory.mktemp(request.param))  # fmt: skip
    return request.param, {row["config"]: row for row in rows}


def test_family_shapes_run_every_measured_configuration(family_run):
    shape, by = family_run
    assert list(by) == FAMILY_CONFIGS
    for row in by.values():
        assert row["status"] == "ok", row
        assert row["ms_per_token"] > 0 and row["model_shape"] == shape
    baseline = "eager (no SDPA: attention sinks)" if shape == "tiny-gpt-oss" else "SDPA"
    assert by["dynamic"]["description"] == f"DynamicCache + {baseline}"


def test_family_shapes_kv_bytes_half_and_sliding_layers_bounded(family_run):
    _, by = family_run
    tokens = FAMILY_L + FAMILY_N
    # bf16: the full layer holds every token, the sliding one its window less one (transformers' sliding layer)
    assert by["dynamic"]["kv_bytes"] == 2 * TOKEN_BYTES * (tokens + WINDOW - 1)
    for name in ("fp8+attn", "fp8-static+attn"):
        assert by[name]["kv_bytes_vs_dynamic"] == pytest.approx(0.5, abs=0.05)  # + the scales
    # the sliding layer is bounded by its window, not the sequence: far below two full layers' bytes
    assert by["fp8+attn"]["kv_bytes"] <= 1.05 * TOKEN_BYTES * (tokens + WINDOW)
    static = TOKEN_BYTES * (tokens + 1 + WINDOW)  # max_cache_len = L + N + 1 tokens; the ring holds the window
    assert static <= by["fp8-static+attn"]["kv_bytes"] <= 1.05 * static
    assert by["fp8-static+attn"]["kv_bytes"] < TOKEN_BYTES * 2 * (tokens + 1)


@pytest.mark.parametrize("name", ["hf-quantized-fp8", f"fp8+attn+exact{generate.RECENT_EXACT}"])
def test_caches_refusing_sliding_layers_are_skipped_with_the_reason(name):
    layer_types = ["sliding_attention", "full_attention"]
    configuration = generate.for_family(CONFIGURATIONS[name], "sdpa", layer_types)
    assert "full-attention layers only; the model has sliding_attention" in configuration.missing()
    assert generate.for_family(CONFIGURATIONS[name], "sdpa", ["full_attention"]) is CONFIGURATIONS[name]


def test_family_baseline_attention_replaces_sdpa_only():
    flex = generate.for_family(CONFIGURATIONS["fp8"], "flex_attention", None)
    assert flex.attention == "flex_attention" and "flex_attention (no SDPA: attention sinks)" in flex.description
    assert generate.for_family(CONFIGURATIONS["fp8+attn"], "flex_attention", None) is CONFIGURATIONS["fp8+attn"]


def test_floor_is_weights_plus_the_rows_kv_bytes_over_the_measured_copy_bandwidth(tmp_path, monkeypatch, capsys):
    # a CPU run has no bandwidth and no floor; with a measured 1 GB/s every row's floor is its bytes in ns
    monkeypatch.setattr(generate, "_copy_bandwidth_tb_s", lambda device: 1e-3)
    with quick_cpu():
        rows = run_generate_benchmark(cases=((2, 8),), model_shape="tiny", new_tokens=3, device="cpu",
                                      configs=["dynamic", "fp8"], out_dir=tmp_path)  # fmt: skip
    weights = sum(p.numel() * p.element_size() for p in generate.build_model("tiny", torch.device("cpu"),
                                                                              torch.float32).parameters())  # fmt: skip
    for row in rows:
        assert row["floor_ms"] == pytest.approx((weights + row["kv_bytes"]) / 1e9 * 1e3)
        assert row["ms_per_token_vs_floor"] == pytest.approx(row["ms_per_token"] / row["floor_ms"])
        assert row["copy_tb_s"] == 1e-3
    dynamic, fp8 = rows
    assert fp8["floor_ms"] < dynamic["floor_ms"]  # half the K/V bytes
    assert "copy bandwidth 0.00 TB/s" in capsys.readouterr().out


def test_no_floor_without_a_gpu(run):
    by, _, _, printed = run
    assert all(row["floor_ms"] is None and row["ms_per_token_vs_floor"] is None for row in by.values())
    assert "copy bandwidth" not in printed
