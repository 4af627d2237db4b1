#!/usr/bin/env bash
# Issue 17 groundwork on the nvidia-h200 device machine, from the repository root: bash benchmarks/gpu/prefill.sh
# Writes $OUT/prefill/prefill_benchmark.{json,csv,png}
# (rows written after every case, so a cut-short run keeps its finished cases) and $OUT/prefill_bench.txt.
# Budget: install ~20 s; bench ~2-3 min expected (imports + copy ceiling ~30 s, Triton compiles ~20 s, then per case
# 6 CUDA-graph-timed columns at ~1.2 s each plus set-up: ~10 s a case x 6 cases), capped at 400 s: under 8 minutes.
# Memory: one layer's tensors at a time (8x34816 bf16 K/V 1.1 GB, FP8 0.6 GB, workspace 1.1 GB, GQA-expanded K/V
# 4.6 GB when a backend needs them, transformers' repeat_kv copies inside the timed calls): < 15 GB.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/prefill"
PY=${PY:-python}  # the image's Python with torch 2.11, triton 3.6, transformers 5.17 (its pip belongs to another)
export PYTHONUNBUFFERED=1 HF_FP8CACHE_NO_INTERPRET=1
unset TRITON_INTERPRET

$PY -m pip install -q --no-deps --no-build-isolation -e . >/tmp/pip.txt 2>&1 || { tail -5 /tmp/pip.txt; echo "install failed"; exit 1; }
$PY -c 'import torch, transformers, triton; print(torch.cuda.get_device_name(0), "| torch", torch.__version__,
"| transformers", transformers.__version__, "| triton", triton.__version__)'

echo "== hf-fp8cache bench prefill"
start=$(date +%s)
timeout 400 $PY -m hf_fp8cache.bench prefill --out-dir "$OUT/prefill" >"$OUT/prefill_bench.txt" 2>&1
echo "bench exit $? after $(( $(date +%s) - start )) s"
grep -vE "Warning|warnings.warn" "$OUT/prefill_bench.txt" | tail -n 40
