#!/usr/bin/env bash
# One device call: the full conformance tier for `triton` (scripts/gpu_triton_verify.sh, with a
# benchmark pass alongside that fills Triton's disk cache with every candidate the tuner compiles,
# and the GPU-marked tests of the Triton backend),
# then, alone on the GPU, the side-by-side benchmark with autotuning on (prefill and decode grids,
# against sdpa-flash and sdpa-cudnn), the host time of a decoding call, the variable-length
# throughput against equal lengths and the determinism of repeated runs. Logs to $OUT.
source "$(dirname "$0")/gpu_common.sh"
start=$(date +%s)
timeout 200 python3 -m pytest -q -m gpu tests/test_triton.py tests/test_triton_hopper.py > "$out/pytest_gpu.log" 2>&1 &
WARM_BENCH=1 DECODE_BENCH=0 bash "$(dirname "$0")/gpu_triton_verify.sh"
wait
echo "GPU-marked tests: $(tail -n 1 "$out/pytest_gpu.log")"
timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/attention.py --backends triton --grid prefill --grid decode \
  --json "$out/bench_triton.json" --plot "$out/bench_triton.png" 2>&1 | grep -v "^\[W" > "$out/bench_triton.log"
grep -E "^\[|^  (triton|sdpa-flash|sdpa-cudnn) |^ceiling" "$out/bench_triton.log"
timeout 40 python3 scripts/check_triton_gpu.py --part host 2>&1 | grep "^host"
timeout 60 python3 scripts/check_triton_gpu.py --part varlen 2>&1 | grep "^varlen" | tee "$out/varlen.log"
timeout 60 python3 scripts/check_triton_gpu.py --part determinism 2>&1 | grep -v "^\[W" | tee "$out/determinism.log" | tail -n 4
echo "total: $(( $(date +%s) - start )) s"
