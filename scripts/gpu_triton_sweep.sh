#!/usr/bin/env bash
# One device call: the full conformance tier for `triton` (8 shards in parallel, autotuning off so
# every case compiles one configuration) while the sweep compiles its configurations, then the
# sweep's timing phase alone on the GPU. Logs to $OUT.
source "$(dirname "$0")/gpu_common.sh"
start=$(date +%s)
for i in 0 1 2 3 4 5 6 7; do
  FLASHDISPATCH_TRITON_AUTOTUNE=0 timeout ${VERIFY_TIMEOUT:-330} python3 -m flashdispatch verify --backend triton \
    --tier full --device cuda --shard $i/8 > "$out/verify_shard$i.log" 2>&1 &
done
timeout 330 python3 scripts/sweep_triton.py --phase compile --workers 8 > "$out/sweep_compile.log" 2>&1
wait
echo "verify + compile: $(( $(date +%s) - start )) s"
for i in 0 1 2 3 4 5 6 7; do tail -n 4 "$out/verify_shard$i.log" | grep -v "^$"; done
grep -h "FAIL\|Error" "$out"/verify_shard*.log | head -40
tail -n 5 "$out/sweep_compile.log"
timeout ${SWEEP_TIMEOUT:-250} python3 scripts/sweep_triton.py --phase time --json "$out/sweep.json" 2>&1 | tee "$out/sweep_time.log" | grep -v "^\[W"
echo "total: $(( $(date +%s) - start )) s"
