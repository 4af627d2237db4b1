#!/usr/bin/env bash
# attach(static=True, cuda_graphs=True) on the nvidia-h200 device machine, from the repository root ($OUT set): its GPU
# test (and the attach test beside it), one layer's host time against DynamicCache's, and generate at 1x4096 with
# the eager, compiled and CUDA-graph configurations, then 8x16384 without the compiled ones. Budget ~420 s: install
# ~10 s, tests ~70 s, layer ~40 s, 1x4096 ~200 s (two compiles), 8x16384 ~100 s.
set -u
export PYTHONUNBUFFERED=1 HF_FP8CACHE_NO_INTERPRET=1
cd "$(dirname "$0")/../.."
python -m pip install -q --no-deps --no-build-isolation -e . > /tmp/pip.txt 2>&1 || tail -5 /tmp/pip.txt
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "attach" > "$OUT/graph_tests.txt" 2>&1
echo "tests rc=$?"; grep -E "passed|failed|Error|assert" "$OUT/graph_tests.txt" | tail -12
timeout 60 python benchmarks/gpu/layer_profile.py > "$OUT/layer_profile.txt" 2>&1; head -3 "$OUT/layer_profile.txt"
timeout 260 python -m hf_fp8cache.bench generate --cases 1x4096 --repeats 2 \
    --configs dynamic,fp8+attn,static,fp8-static+attn,fp8-attach-static+attn,fp8-attach-graphs+attn \
    --out-dir "$OUT/g1" > "$OUT/g1.txt" 2>&1
echo "1x4096 rc=$?"; grep -v Warn "$OUT/g1.txt" | tail -8
timeout 150 python -m hf_fp8cache.bench generate --cases 8x16384 --configs dynamic,fp8+attn,fp8-attach-graphs+attn \
    --out-dir "$OUT/g8" > "$OUT/g8.txt" 2>&1
echo "8x16384 rc=$?"; grep -v Warn "$OUT/g8.txt" | tail -5
rm -f "$OUT"/*/*.png "$OUT"/*/*.csv  # $OUT returns 8 files
