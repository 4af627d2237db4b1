#!/usr/bin/env bash
# Issue 14 on the nvidia-h200 device machine, from the repository root ($OUT set): the GPU tests, the decode kernel
# bench, one layer's host time, and generate at 1x4096: the eager configurations over three rounds (bench generate's
# module docstring), then the compiled ones in one (each compiles once, ~60 s). Budget ~600 s: install ~10 s, tests
# ~150 s (-n 8), kernel bench ~40 s, layer ~30 s, eager generate ~90 s, compiled generate ~260 s. Run it with the
# call's 600 s limit; if the compiled part is cut, run it again on its own.
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
timeout 120 python -m hf_fp8cache.bench generate --cases 1x4096 --configs dynamic,fp8,fp8+attn --rounds 3 \
    --out-dir "$OUT/generate" > "$OUT/generate.txt" 2>&1
echo "generate rc=$?"; grep -v Warn "$OUT/generate.txt" | tail -6
timeout 280 python -m hf_fp8cache.bench generate --cases 1x4096 --configs dynamic,static,fp8-static+attn,fp8-attach-static+attn \
    --repeats 3 \
    --out-dir "$OUT/compiled" > "$OUT/compiled.txt" 2>&1
echo "compiled generate rc=$?"; grep -v Warn "$OUT/compiled.txt" | tail -6
rm -f "$OUT"/*/*.png "$OUT"/*/*.csv  # $OUT returns 8 files: the JSON rows (write_rows makes the CSV from them)
