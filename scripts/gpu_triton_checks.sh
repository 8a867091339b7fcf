#!/usr/bin/env bash
# One device call: the full conformance tier for `triton` (8 shards, autotuning off so each case
# compiles one configuration) next to the candidate-configuration checks and the decode sweep's
# compiles; then, alone on the GPU, determinism, varlen throughput and the decode sweep's timing.
source "$(dirname "$0")/gpu_common.sh"
start=$(date +%s)
for i in 0 1 2 3 4 5 6 7; do
  FLASHDISPATCH_TRITON_AUTOTUNE=0 timeout ${VERIFY_TIMEOUT:-300} python3 -m flashdispatch verify --backend triton \
    --tier full --device cuda --shard $i/8 --verbose 2>&1 | grep -v "^\[W\|UserWarning\|_execution_engine" > "$out/verify_shard$i.log" &
done
for i in 0 1 2; do
  timeout 300 python3 scripts/check_triton_gpu.py --part candidates:$i/3 > "$out/candidates$i.log" 2>&1 &
done
timeout 300 python3 scripts/sweep_triton.py --kernels decode --phase compile --workers 4 > "$out/sweep_compile.log" 2>&1
wait
echo "parallel part: $(( $(date +%s) - start )) s"
for i in 0 1 2 3 4 5 6 7; do tail -n 4 "$out/verify_shard$i.log"; done
grep -h "^FAIL" -A3 "$out"/verify_shard*.log | head -40
tail -n 3 "$out"/candidates*.log
python3 scripts/check_triton_gpu.py --part determinism 2>&1 | tee "$out/determinism.log"
python3 scripts/check_triton_gpu.py --part varlen 2>&1 | tee "$out/varlen.log"
timeout 150 python3 scripts/sweep_triton.py --kernels decode --phase time --json "$out/sweep_decode.json" 2>&1 | grep -v "^\[W" | tee "$out/sweep_decode.log"
echo "total: $(( $(date +%s) - start )) s"
