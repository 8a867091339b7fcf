#!/usr/bin/env bash
# One device call: the side-by-side benchmark of `triton` against sdpa-flash and sdpa-cudnn (prefill
# and decode grids, autotuning on, alone on the GPU, tuning from scratch), then the host time of a
# decoding call. Logs to $OUT.
source "$(dirname "$0")/gpu_common.sh"
start=$(date +%s)
export FLASHDISPATCH_CACHE_DIR=$(mktemp -d)
timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/attention.py --backends triton --grid prefill --grid decode \
  --json "$out/bench_triton.json" --plot "$out/bench_triton.png" 2>&1 | grep -v "^\[W" > "$out/bench_triton.log"
grep -E "^\[|^  (triton|sdpa-flash|sdpa-cudnn) |^ceiling" "$out/bench_triton.log"
timeout 60 python3 scripts/check_triton_gpu.py --part host 2>&1 | grep "^host"
echo "total: $(( $(date +%s) - start )) s"
