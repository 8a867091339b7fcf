#!/usr/bin/env bash
# One device call: where a decoding call's time goes. Host time of a launch through Triton's JIT
# entry against a direct launch of the compiled kernel, cProfile of a call through attention(),
# then the decode sweep (every decode configuration x split count; times with and without the host
# hidden), then the short causal prefill point with fresh tuning. Logs to $OUT.
source "$(dirname "$0")/gpu_common.sh"
start=$(date +%s)
export FLASHDISPATCH_CACHE_DIR=$(mktemp -d)
timeout 120 python3 scripts/check_triton_gpu.py --part launch > "$out/launch.log" 2>&1
grep "^launch" "$out/launch.log"; grep -A40 "Ordered by" "$out/launch.log" | head -45
timeout 240 python3 scripts/sweep_triton.py --kernels decode --workers 8 --json "$out/sweep_decode.json" \
  2>&1 | grep -v "^\[W" > "$out/sweep_decode.log"
grep -v "failed" "$out/sweep_decode.log" | tail -n 120
timeout 120 python3 benchmarks/attention.py --backends triton --shape 16,32,32,1024,1024,64,causal \
  --shape 16,16,16,1024,1024,128 2>&1 | grep -v "^\[W" > "$out/bench_1k.log"
grep -E "^\[|^  (triton|sdpa-flash|sdpa-cudnn) " "$out/bench_1k.log"
echo "total: $(( $(date +%s) - start )) s"
