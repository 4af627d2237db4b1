#!/usr/bin/env bash
# One call on a device machine, from the repository root ($OUT set): the single-GPU tests on cuda:0 (CUDA-graph
# decode, per-token-head kernels and caches, the decode kernel), the decode-kernel bench at 8x32768 (per-tensor vs
# per-token-head scales), generate at 1x4096 with per-token-head scales, and on a machine with two GPUs
# (nvidia-h200-x2) the tensor-parallel part of `bench multigpu` (TP=2, 8x32768).
# Budget ~340 s on one GPU: install ~20 s, tests <= 220 s, kernel bench <= 45 s, generate <= 120 s; with two GPUs
# TP <= 285 s more (checkpoint ~40 s, torchrun 240 s; the ranks write their rows after each configuration).
set -u
export PYTHONUNBUFFERED=1 HF_FP8CACHE_NO_INTERPRET=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
unset TRITON_INTERPRET
cd "$(dirname "$0")/../.."
python -m pip install -q --no-deps --no-build-isolation -e . > /tmp/pip.txt 2>&1 || tail -5 /tmp/pip.txt
tests=(tests/test_gpu.py tests/test_kernels.py tests/test_kernels_attention.py tests/test_launch.py)
for extra in tests/test_kernels_token_head.py tests/test_token_head.py; do [ -f "$extra" ] && tests+=("$extra"); done
CUDA_VISIBLE_DEVICES=0 timeout 220 python -m pytest -q -n 8 -m "not slow" -p no:cacheprovider "${tests[@]}" \
    > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?"; grep -E "^FAILED|^ERROR|passed|failed" "$OUT/gpu_tests.txt" | tail -12
CUDA_VISIBLE_DEVICES=0 timeout 45 python -m hf_fp8cache.bench attention --cases 8x32768 --out-dir "$OUT/attention" \
    > "$OUT/attention.txt" 2>&1
echo "attention rc=$?"; grep -v Warn "$OUT/attention.txt" | tail -5
CUDA_VISIBLE_DEVICES=0 timeout 120 python -m hf_fp8cache.bench generate --cases 1x4096 --repeats 2 \
    --configs dynamic,fp8+attn,fp8-token-head+attn,int8-token-head+attn --out-dir "$OUT/token_head" \
    > "$OUT/token_head.txt" 2>&1
echo "generate rc=$?"; grep -v Warn "$OUT/token_head.txt" | tail -6
[ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ] || { rm -f "$OUT"/*/*.png "$OUT"/*/*.csv; exit 0; }
timeout 285 python -m hf_fp8cache.bench multigpu --parts tp --out-dir "$OUT/multigpu" --new-tokens 16 \
    --tp-timeout 240 --checkpoint-dir /tmp/hf_fp8cache_llama8b > "$OUT/multigpu_bench.txt" 2>&1
echo "tp rc=$?"; grep -v -E "Warn|Loading|Writing" "$OUT/multigpu_bench.txt" | tail -8
rm -f "$OUT"/*/*.png "$OUT"/*/*.csv  # $OUT returns 8 files
