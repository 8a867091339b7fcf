#!/usr/bin/env bash
# One device call: the full conformance tier for `triton` in parallel shards (autotuning off, so each
# case compiles one configuration), each case's time in the log; then the decode benchmark alone
# (DECODE_BENCH=0: not). WARM_BENCH=1: a short benchmark pass alongside, to fill Triton's cache.
source "$(dirname "$0")/gpu_common.sh"
start=$(date +%s)
shards=${SHARDS:-15}
mkdir -p "$out/shards"
for i in $(seq 0 $((shards - 1))); do
  FLASHDISPATCH_TRITON_AUTOTUNE=0 timeout ${VERIFY_TIMEOUT:-340} python3 -m flashdispatch verify --backend triton \
    --tier full --device cuda --shard $i/$shards --verbose 2>&1 | grep -v "^\[W\|UserWarning\|_execution_engine" > "$out/shards/$i.log" &
done
if [ "${WARM_BENCH:-0}" = 1 ]; then
  # Fill Triton's disk cache with every candidate the tuner will compile, so that a timed benchmark
  # after this script compiles nothing (its tuning still runs in its own process).
  # Its tuning, timed while the shards share the GPU, goes to a throwaway cache folder: the timed
  # benchmark must tune alone on the GPU, not reuse these choices.
  FLASHDISPATCH_CACHE_DIR=$(mktemp -d) timeout ${VERIFY_TIMEOUT:-340} python3 benchmarks/attention.py \
    --backends triton --grid prefill --grid decode --warmup 1 --repeats 1 > "$out/bench_warm.log" 2>&1 &
fi
wait
echo "full tier, $shards shards: $(( $(date +%s) - start )) s"
cat "$out"/shards/*.log > "$out/verify_full.log"; rm -rf "$out/shards"
echo "passed $(grep -c '^PASSED' "$out/verify_full.log") failed $(grep -c '^FAILED' "$out/verify_full.log") skipped $(grep -c '^SKIPPED' "$out/verify_full.log") shard summaries $(grep -c 'passed,.*failed' "$out/verify_full.log")"
grep "^FAILED" -A4 "$out/verify_full.log" | head -30
if [ "${DECODE_BENCH:-1}" = 1 ]; then
  timeout 60 python3 benchmarks/attention.py --backends triton --grid decode 2>&1 | grep -v "^\[W" > "$out/bench_decode.log"
  grep -E "^\[|^  (triton|sdpa-flash|sdpa-cudnn)|^ceiling|triton:" "$out/bench_decode.log"
fi
echo "total: $(( $(date +%s) - start )) s"
