#!/usr/bin/env bash
# Issue 17 on one H200 (nvidia-h200), from the repository root with $OUT set: bash benchmarks/gpu/issue17_check.sh
# 1. the kernel's tests compiled on cuda:0: of tests/test_kernels_attention.py the chunk, plan and length tests and
#    the decode ones against the oracle (CPU tests on CUDA tensors), the gpu-marked ones (issue 17's shapes against
#    the twin: 32k histories; decode at real shapes), test_chunk_attention.py, and test_gpu.py's second-turn test
#    (dynamic and static cache, generate, against the oracle) -> $OUT/issue17_tests.txt
# 2. hf-fp8cache bench prefill at the issue's shapes (8 x {32768 x 17, 64, 256, 512, 2048; 16384 x 2048}, 32 q / 8 kv
#    heads, d=128, bf16): our kernel beside SDPA + mask, the best forced backend and dequantize + SDPA, same run
#    -> $OUT/prefill/prefill_benchmark.{json,csv}, $OUT/prefill_bench.txt
# 3. a sweep of the kernel's launch knobs at 32768 x 17 and 32768 x 2048 -> $OUT/sweep/chunk_sweep.json, $OUT/sweep.txt
# 4. the decode kernel at 8 x 32768 (bench attention), against a decode regression from the chunk changes (the
#    one-token plan is unchanged; 146.4 us per tensor on 2026-12-01) -> $OUT/attention/, $OUT/attention.txt
# Budget (caps, worst case ~7.9 min; expected ~5): install ~20 s, tests <= 160 s (the static cache's generate compiles
# its decode steps), bench <= 170 s (copy ceiling ~30 s, compiles ~20 s, ~10 s a case), sweep <= 80 s (stops starting
# variants after 55 s), decode bench <= 45 s. Memory < 30 GB at a time (the twin's fp32 logits at 2 x 32 x 512 x
# 32768: 4.3 GB).
source "$(dirname "$0")/setup.sh"
python -c 'import torch, transformers, triton; print(torch.cuda.get_device_name(0), "| torch", torch.__version__,
"| transformers", transformers.__version__, "| triton", triton.__version__)'
git rev-parse --short HEAD 2>/dev/null

start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 160 python -m pytest -q -n 8 -m "not slow" -p no:cacheprovider \
    -k "chunk or tile or block_m or plan or slot or gpu or lengths or compiled or matches_oracle" \
    tests/test_kernels_attention.py tests/test_chunk_attention.py \
    tests/test_gpu.py::test_kernels_are_compiled_not_interpreted \
    tests/test_gpu.py::test_second_turn_chunk_reads_the_fp8_history_and_equals_oracle > "$OUT/issue17_tests.txt" 2>&1
echo "tests rc=$? after $(( $(date +%s) - start )) s"; grep -E "^FAILED|^ERROR|passed|failed" "$OUT/issue17_tests.txt" | tail -15

start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 170 python -m hf_fp8cache.bench prefill --out-dir "$OUT/prefill" > "$OUT/prefill_bench.txt" 2>&1
echo "bench rc=$? after $(( $(date +%s) - start )) s"; grep -vE "Warning|warnings.warn" "$OUT/prefill_bench.txt" | tail -12

start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 80 python benchmarks/gpu/chunk_sweep.py "$OUT/sweep" --cases 32768x17,32768x2048 \
    --budget-s 55 > "$OUT/sweep.txt" 2>&1
echo "sweep rc=$? after $(( $(date +%s) - start )) s"; grep -vE "Warning|warnings.warn" "$OUT/sweep.txt" | tail -30

CUDA_VISIBLE_DEVICES=0 timeout 45 python -m hf_fp8cache.bench attention --cases 8x32768 --out-dir "$OUT/attention" \
    > "$OUT/attention.txt" 2>&1
echo "decode bench rc=$?"; grep -vE "Warning|warnings.warn" "$OUT/attention.txt" | tail -5
rm -f "$OUT"/prefill/*.png "$OUT"/attention/*.png
