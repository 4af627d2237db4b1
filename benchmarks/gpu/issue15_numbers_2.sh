#!/usr/bin/env bash
# Issue 15's numbers, part 2 of 2: the Gemma-3-12B shape at 8x32768. From the repo root, $OUT set:
#   bash benchmarks/gpu/issue15_numbers_2.sh
# Estimated wall time (H200): one 8x32768 prefill ~25-30 s (5.7e15 FLOP of matmuls ~9 s; SDPA over the sliding
# layers' [8, 1, 32768, 32768] mask runs the masked kernel over all L^2: ~6e15 FLOP, ~15-20 s). Each
# configuration prefills 4 times (2 warm-up, 2 timed): dynamic ~130 s, fp8+attn ~140 s, fp8-static+attn ~120 s
# + compile of the 48-layer step ~60-90 s; build ~10 s. ~480 s; the timeout 540 s keeps it under 9.5 min.
# Rows are written once the case ends: a timeout loses the case. If it times out, run the configurations in
# two calls, each with dynamic (ratios are to the same run's dynamic row).
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/../.."
python -m pip install -q --no-deps --no-build-isolation -e . > /tmp/pip.txt 2>&1 || tail -5 /tmp/pip.txt
export HF_FP8CACHE_NO_INTERPRET=1
step() {  # step NAME TIMEOUT ARGS...: run the bench, log to $OUT/NAME.txt, print rc and the table
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python -m hf_fp8cache.bench "$@" --out-dir "$OUT/$name" > "$OUT/$name.txt" 2>&1
  echo "$name rc=$?"
  grep -v Warn "$OUT/$name.txt" | tail -12
}
step gemma 540 generate --model-shape gemma-3-12b --cases 8x32768 --configs dynamic,fp8+attn,fp8-static+attn
