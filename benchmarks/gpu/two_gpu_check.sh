#!/usr/bin/env bash
# One call on the nvidia-h200-x2 device machine, from the repository root ($OUT set): the single-GPU tests on
# cuda:0 (CUDA-graph decode, per-token-head kernels, the decode kernel), the decode-kernel bench at 8x32768 (per-tensor
# vs per-token-head scales), then the tensor-parallel part of `bench multigpu` (TP=2, 8x32768) on both GPUs.
# Budget ~570 s: install ~20 s, tests <= 220 s, kernel bench <= 45 s, TP <= 285 s (checkpoint ~40 s, torchrun 240 s;
# the ranks write their rows after each configuration, so a cut run keeps the finished ones).
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
timeout 285 python -m hf_fp8cache.bench multigpu --parts tp --out-dir "$OUT/multigpu" --new-tokens 16 \
    --tp-timeout 240 --checkpoint-dir /tmp/hf_fp8cache_llama8b > "$OUT/multigpu_bench.txt" 2>&1
echo "tp rc=$?"; grep -v -E "Warn|Loading|Writing" "$OUT/multigpu_bench.txt" | tail -8
rm -f "$OUT"/*/*.png "$OUT"/*/*.csv  # $OUT returns 8 files
