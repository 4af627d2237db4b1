#!/usr/bin/env bash
# Issue 16 on the nvidia-h200-x2 device machine (two H200), from the repository root: bash benchmarks/gpu/multigpu.sh
# Budget: install ~20 s, tests <= 240 s, benchmark <= 300 s.
# Writes $OUT/multigpu_tests.txt, $OUT/multigpu_bench.txt and $OUT/multigpu/{equality.json,multigpu_benchmark.*}.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/multigpu"
PY=python3  # the image's Python with torch 2.11, triton 3.6, transformers 5.17
export PYTHONUNBUFFERED=1 HF_FP8CACHE_NO_INTERPRET=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # NVLink multicast stays off
unset TRITON_INTERPRET
export HF_FP8CACHE_MULTIGPU_REPORT="$OUT/multigpu/equality.json"  # the tests' side-by-side token differences

$PY -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
$PY -c 'import torch, transformers, triton; print(torch.cuda.device_count(), "x", torch.cuda.get_device_name(0),
"| torch", torch.__version__, "| transformers", transformers.__version__, "| triton", triton.__version__)'

echo "== pytest -m multigpu tests/test_multigpu.py"
timeout 240 $PY -m pytest -m multigpu tests/test_multigpu.py -s -rA -p no:cacheprovider >"$OUT/multigpu_tests.txt" 2>&1
echo "pytest exit $?"
grep -E "differing|^  [a-z0-9_+/-]+ +[0-9]+$|PASSED|FAILED|ERROR|SKIPPED|passed|failed" "$OUT/multigpu_tests.txt" | tail -n 70

echo "== hf-fp8cache bench multigpu"
timeout 300 $PY -m hf_fp8cache.bench multigpu --out-dir "$OUT/multigpu" --new-tokens 16 --tp-timeout 170 \
    --checkpoint-dir /tmp/hf_fp8cache_llama8b >"$OUT/multigpu_bench.txt" 2>&1
echo "bench exit $?"
tail -n 20 "$OUT/multigpu_bench.txt"
