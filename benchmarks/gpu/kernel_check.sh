#!/usr/bin/env bash
# The decode/chunk kernel's GPU tests and numbers in one call (nvidia-h200), from the repository root with $OUT set:
#   bash benchmarks/gpu/kernel_check.sh tests     # 1 (<= ~7 min at the caps)
#   bash benchmarks/gpu/kernel_check.sh numbers   # 2 and 3 (<= ~6 min)
#   bash benchmarks/gpu/kernel_check.sh fp8q      # 4 (<= ~7 min)
#   bash benchmarks/gpu/kernel_check.sh final     # 4's tests and prefill, then 3 (<= ~10 min)
#   bash benchmarks/gpu/kernel_check.sh generate  # 3 alone (<= ~5 min)
# 1. tests/test_kernels_attention.py's chunk, plan, ring, per-token-head and device-length tests and
#    tests/test_chunk_attention.py compiled on cuda:0 (12 workers: Triton's compiles are CPU-bound), failures listed
#    (-rf) -> $OUT/kernel_tests.txt; then test_gpu.py's second-turn tests (generate against the oracle)
#    -> $OUT/second_turn_tests.txt. (With 8 workers the first step took over 250 s on 2026-12-01.)
# 2. hf-fp8cache bench attention at 8x32768 and 1x32768 (per tensor, e4m3 and int8 per token and head) -> $OUT/attention
#    and benchmarks/gpu/token_head_knobs.py (per-token-head launch knobs) -> $OUT/knobs
# 3. generate with one scale, e4m3 and int8 per token and head at 8x32768, FP8StaticCache compiled by generate
#    (device-bound steps; the eager rows are host-bound and drift by more than the formats differ: int8 measured
#    1.80x, 1.35x and 1.60x of one scale on three days) -> $OUT/generate (~210 s)
# 4. FP8 queries (issue 17): their tests on the GPU (the kernel against its twin, the needle, generate on both caches:
#    the static one compiled by generate), then hf-fp8cache bench prefill (its kernel_fp8q column) -> $OUT/prefill, then the time to
#    first token of 8x32768 through generate: DynamicCache, FP8Cache(exact_prefill=False) with model-dtype and with
#    FP8 queries, 2 timed pairs -> $OUT/ttft
source "$(dirname "$0")/setup.sh"
part=${1:?usage: kernel_check.sh tests|numbers|fp8q|final|generate}
if [ "$part" = tests ]; then
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 300 python -m pytest -q -n 12 -m "not slow" -p no:cacheprovider -rf --tb=short \
    -k "ring or token_head or chunk or plan or tile or slot or lengths or compiled or block_m or fp8_quer or needle" \
    tests/test_kernels_attention.py tests/test_chunk_attention.py > "$OUT/kernel_tests.txt" 2>&1
echo "kernel tests rc=$? after $(( $(date +%s) - start )) s"
grep -E "^FAILED|^ERROR|passed|failed" "$OUT/kernel_tests.txt" | tail -12
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 200 python -m pytest -q -p no:cacheprovider -rf --tb=short \
    tests/test_gpu.py::test_second_turn_chunk_reads_the_fp8_history_and_equals_oracle > "$OUT/second_turn_tests.txt" 2>&1
echo "second-turn tests rc=$? after $(( $(date +%s) - start )) s"; grep -E "^FAILED|passed|failed" "$OUT/second_turn_tests.txt" | tail -4
exit 0
fi
if [ "$part" = fp8q ] || [ "$part" = final ]; then
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 100 python -m pytest -q -n 8 -p no:cacheprovider -rf --tb=short -k "fp8_quer" \
    tests/test_kernels_attention.py tests/test_gpu.py > "$OUT/fp8q_tests.txt" 2>&1
echo "FP8-query tests rc=$? after $(( $(date +%s) - start )) s"; grep -E "^FAILED|passed|failed|difference" "$OUT/fp8q_tests.txt" | tail -6
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 200 python -m hf_fp8cache.bench prefill --out-dir "$OUT/prefill" > "$OUT/prefill.txt" 2>&1
echo "prefill rc=$? after $(( $(date +%s) - start )) s"; grep -vE "Warning|warnings.warn" "$OUT/prefill.txt" | tail -9
fi
if [ "$part" = fp8q ]; then
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 270 python -m hf_fp8cache.bench generate --cases 8x32768 --warmup-tokens 512 --repeats 2 \
    --configs dynamic,fp8-fp8-prefill+attn,fp8-fp8q+attn --out-dir "$OUT/ttft" > "$OUT/ttft.txt" 2>&1
echo "ttft rc=$? after $(( $(date +%s) - start )) s"; grep -vE "Warning|warnings.warn" "$OUT/ttft.txt" | tail -6
rm -f "$OUT"/*/*.png
exit 0
fi
if [ "$part" = numbers ]; then
CUDA_VISIBLE_DEVICES=0 timeout 60 python -m hf_fp8cache.bench attention --cases 8x32768,1x32768 --out-dir "$OUT/attention" \
    > "$OUT/attention.txt" 2>&1
echo "attention rc=$?"; grep -vE "Warning|warnings.warn|scaled_dot|not run" "$OUT/attention.txt" | tail -4
CUDA_VISIBLE_DEVICES=0 timeout 70 python benchmarks/gpu/token_head_knobs.py "$OUT/knobs" > "$OUT/knobs.txt" 2>&1
echo "knobs rc=$?"; grep -vE "Warning|warnings.warn" "$OUT/knobs.txt" | tail -10
fi
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 300 python -m hf_fp8cache.bench generate --cases 8x32768 --warmup-tokens 512 \
    --configs fp8-static+attn,fp8-static-token-head+attn,int8-static-token-head+attn --out-dir "$OUT/generate" \
    > "$OUT/generate.txt" 2>&1
echo "generate rc=$? after $(( $(date +%s) - start )) s"; grep -vE "Warning|warnings.warn" "$OUT/generate.txt" | tail -6
rm -f "$OUT"/*/*.png
