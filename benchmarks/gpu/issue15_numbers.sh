#!/usr/bin/env bash
# Issue 15's numbers, part 1 of 2 (part 2: issue15_numbers_2.sh, Gemma 3). From the repo root, $OUT set:
#   bash benchmarks/gpu/issue15_numbers.sh
# Estimated wall time (H200): install ~10 s; attention benches ~2 x 40 s (timeouts 60); GPT-OSS-20B shape at
# 8x32768 ~200 s: build ~15 s (41.8 GB random bf16), dynamic (flex_attention) 4 prefills x ~8 s + flex compiles
# ~60 s + 132 decode steps ~15 s; fp8 (FP8Cache dequantized for flex) about the same without the compiles;
# fp8+attn / fp8-static+attn: their prefill runs SDPA with the sinks as one more key (no L x L scores), about as dynamic.
# Worst case by the timeouts: 10 + 60 + 60 + 280 = 410 s, then GPT-OSS at 1x8192 (fits eager prefill) <= 120 s.
# Total <= 530 s (8.8 min).
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
CONFIGS=dynamic,fp8,fp8+attn,fp8-static+attn
step win 60 attention --window 4096 --cases 8x32768
step full 60 attention --cases 8x4096
step gptoss 280 generate --model-shape gpt-oss-20b --cases 8x32768 --configs "$CONFIGS"
step gptoss_1x8192 120 generate --model-shape gpt-oss-20b --cases 1x8192 --configs "$CONFIGS"
