#!/usr/bin/env bash
# One device call: the full conformance tier for `triton` in 15 parallel shards (autotuning off, so
# each case compiles one configuration), then, alone on the GPU, the side-by-side benchmark with
# autotuning on (prefill and decode grids, against sdpa-flash and sdpa-cudnn). Logs to $OUT.
source "$(dirname "$0")/gpu_common.sh"
start=$(date +%s)
shards=${SHARDS:-15}
for i in $(seq 0 $((shards - 1))); do
  FLASHDISPATCH_TRITON_AUTOTUNE=0 timeout ${VERIFY_TIMEOUT:-340} python3 -m flashdispatch verify --backend triton \
    --tier full --device cuda --shard $i/$shards --verbose 2>&1 | grep -v "^\[W\|UserWarning\|_execution_engine" > "$out/v$i.log" &
done
# Meanwhile one short benchmark pass fills Triton's disk cache with every candidate the tuner will
# compile, so that the timed benchmark below does not compile (its tuning still runs in-process).
timeout ${VERIFY_TIMEOUT:-340} python3 benchmarks/attention.py --backends triton --grid prefill --grid decode \
  --warmup 1 --repeats 1 > "$out/bench_warm.log" 2>&1 &
wait
echo "full tier, $shards shards: $(( $(date +%s) - start )) s"
cat "$out"/v*.log > "$out/verify_full.log"; rm -f "$out"/v*.log
grep -c "^PASSED" "$out/verify_full.log"; grep -c "^FAIL" "$out/verify_full.log"; grep -c "^SKIP" "$out/verify_full.log"
grep "passed,.*failed" "$out/verify_full.log"
grep "^FAIL" -A4 "$out/verify_full.log" | head -30
timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/attention.py --backends triton --grid prefill --grid decode \
  --json "$out/bench_triton.json" --plot "$out/bench_triton.png" 2>&1 | grep -v "^\[W" > "$out/bench_triton.log"
grep -E "^\[|^  (triton|sdpa-flash|sdpa-cudnn)|^ceiling|triton:" "$out/bench_triton.log"
echo "total: $(( $(date +%s) - start )) s"
