#!/usr/bin/env bash
# Issue 14 on the nvidia-h200 device machine, from the repository root ($OUT set): the GPU tests, the decode kernel
# bench, one layer's host time, and generate at 1x4096 and 8x16384 (eager; 3 repeats).
# Budget ~420 s: install ~10 s, tests ~150 s (-n 8), kernel bench ~40 s, layer ~30 s, generate ~180 s.
set -u
export PYTHONUNBUFFERED=1 HF_FP8CACHE_NO_INTERPRET=1
cd "$(dirname "$0")/../.."
python -m pip install -q --no-deps --no-build-isolation -e . > /tmp/pip.txt 2>&1 || tail -5 /tmp/pip.txt
timeout 200 python -m pytest -q -n 8 -m "not slow" -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py \
    tests/test_kernels_attention.py tests/test_launch.py > "$OUT/gpu_tests.txt" 2>&1
echo "tests rc=$?"; tail -4 "$OUT/gpu_tests.txt"
timeout 90 python -m hf_fp8cache.bench attention --out-dir "$OUT/attention" > "$OUT/attention.txt" 2>&1
echo "attention rc=$?"; grep -v Warn "$OUT/attention.txt" | tail -8; rm -f "$OUT"/attention/*.png "$OUT"/attention/*.csv  # $OUT returns 8 files
timeout 60 python benchmarks/gpu/layer_profile.py > "$OUT/layer_profile.txt" 2>&1; head -3 "$OUT/layer_profile.txt"
timeout 240 python -m hf_fp8cache.bench generate --cases 1x4096,8x16384 --configs dynamic,fp8,fp8+attn --repeats 3 \
    --out-dir "$OUT/generate" > "$OUT/generate.txt" 2>&1
echo "generate rc=$?"; grep -v Warn "$OUT/generate.txt" | tail -12
