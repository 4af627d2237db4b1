#!/usr/bin/env bash
# Issue 15's numbers in two GPU calls (each under the 10-minute limit). From the repo root, $OUT set:
#   bash benchmarks/gpu/issue15_numbers.sh gpt-oss    # the GPT-OSS-20B shape at 8x32768 (step_clock.py, ~4 min)
#   bash benchmarks/gpu/issue15_numbers.sh gemma      # the Gemma-3-12B shape at 8x32768 (bench generate)
#   bash benchmarks/gpu/issue15_numbers.sh gemma-clock  # the same through step_clock.py (one prefill a config)
#   bash benchmarks/gpu/issue15_numbers.sh kernel     # the window kernel vs the full 8x4096 case (~100 s)
# gpt-oss: bench generate prefills four times a configuration, too many for a 10-minute call with this MoE model;
#   step_clock.py prefills once and times the decode steps inside one generate. 2026-12-02 (H200): an 8x32768
#   prefill took ~22 s, the three configurations 216 s in all; with PROFILE=1 each also writes a profiled
#   continuation (decode steps only) to $OUT/step_clock_<config>.txt.
# gemma, estimated: one 8x32768 prefill ~25-30 s (5.7e15 FLOP of matmuls ~9 s; SDPA over the sliding layers'
#   [8, 1, 32768, 32768] mask runs the masked kernel over all L^2: ~15-20 s). Each configuration prefills 4 times:
#   dynamic ~130 s, fp8+attn ~140 s, fp8-static+attn ~120 s + the 48-layer step's compile ~60-90 s; ~480 s, timeout
#   540 s. Rows are written once the case ends: if it times out, run the configurations in two calls, each with
#   dynamic (ratios are to the same run's dynamic row).
set -u
part=${1:?usage: issue15_numbers.sh gpt-oss|gemma|gemma-clock|kernel}
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
case $part in
  gpt-oss|gemma-clock)
    shape=gpt-oss-20b configs=dynamic,fp8+attn,fp8-static+attn
    # Gemma: DynamicCache + SDPA runs out of memory at 8x32768, so flex attention gives the bf16 baseline too
    [ "$part" = gemma-clock ] && shape=gemma-3-12b configs=dynamic,dynamic:flex_attention,fp8+attn,fp8-static+attn
    SHAPE=$shape OUT="$OUT" timeout ${LIMIT:-560} python benchmarks/gpu/step_clock.py ${CONFIGS:-$configs} \
        8x32768 > "$OUT/$part.txt" 2>&1
    echo "$part rc=$?"
    grep -E "^config|^  " "$OUT/$part.txt" ;;
  kernel)
    step win 60 attention --window 4096 --cases 8x32768
    step full 60 attention --cases 8x4096 ;;
  gemma)
    step gemma 540 generate --model-shape gemma-3-12b --cases 8x32768 --configs dynamic,fp8+attn,fp8-static+attn ;;
  *) echo "unknown part $part: gpt-oss, gemma or kernel"; exit 2 ;;
esac
