#!/usr/bin/env bash
# Issue 14's generate table, every configuration at the issue's four cases, in two calls (nvidia-h200), from the
# repository root with $OUT set; each case has its own DynamicCache row, so every ratio is to the same run:
#   bash benchmarks/gpu/issue14_table.sh small    # 1x4096 (2 timed pairs) and 8x16384 (~470 s)
#   bash benchmarks/gpu/issue14_table.sh large    # 8x32768 and 1x32768 (~450 s)
#   bash benchmarks/gpu/issue14_table.sh profile  # decode_profile.py at 8x32768: kernel vs host time a step (~200 s)
#   bash benchmarks/gpu/issue14_table.sh eager    # the eager rows at batch 1, seven rounds each (~330 s)
#   bash benchmarks/gpu/issue14_table.sh probe    # launch_probe.py at 1x4096: does the launch or our Python slow it
# small and large run one round (--rounds 1) to fit a call: the first round of a process runs slow, so their eager
# ratios are not a measurement of the eager path (the bench's docstring); the eager part is.
# --warmup-tokens 512: the configurations with a cache made up front warm up on the prompts' first 512 tokens (the
# kernels and graphs compile the same); transformers' static cache, made by generate per call, warms on all of it.
source "$(dirname "$0")/setup.sh"
part=${1:?usage: issue14_table.sh small|large|eager|profile|probe}
configs=dynamic,static,hf-quantized-fp8,fp8,fp8+attn,fp8+attn+exact16,fp8-static+attn
bench() {  # bench NAME TIMEOUT ARGS...
  local name=$1 limit=$2 start
  shift 2
  start=$(date +%s)
  CUDA_VISIBLE_DEVICES=0 timeout "$limit" python -m hf_fp8cache.bench generate --configs "$configs" \
      --warmup-tokens 512 --rounds 1 "$@" --out-dir "$OUT/$name" > "$OUT/$name.txt" 2>&1
  echo "$name rc=$? after $(( $(date +%s) - start )) s"
  grep -vE "Warning|warnings.warn|warn\(" "$OUT/$name.txt" | tail -10
}
case $part in
  eager) configs=dynamic,fp8,fp8+attn
         bench eager_1x4096 140 --cases 1x4096 --rounds 7
         bench eager_1x32768 230 --cases 1x32768 --rounds 7 ;;
  small) bench small_1x4096 240 --cases 1x4096 --repeats 2
         bench small_8x16384 330 --cases 8x16384 ;;
  large) bench large_8x32768 400 --cases 8x32768
         bench large_1x32768 170 --cases 1x32768 ;;
  profile) CUDA_VISIBLE_DEVICES=0 timeout 240 python benchmarks/gpu/decode_profile.py \
             dynamic,fp8+attn,fp8-token-head+attn,int8-token-head+attn 8x32768 > "$OUT/decode_profile.txt" 2>&1
           echo "profile rc=$?"; grep -vE "Warning|warn" "$OUT/decode_profile.txt" | tail -8 ;;
  probe) CUDA_VISIBLE_DEVICES=0 timeout 300 python benchmarks/gpu/launch_probe.py 1x4096 7 > "$OUT/launch_probe.txt" 2>&1
         echo "probe rc=$?"; grep -vE "Warning|warn" "$OUT/launch_probe.txt" | tail -6 ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
rm -f "$OUT"/*/*.png
