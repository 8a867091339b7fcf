#!/usr/bin/env bash
# GPU run for the Triton backend, in one device call: the full conformance tier for `triton`, then
# the side-by-side benchmark against sdpa-flash and sdpa-cudnn. Logs to $OUT.
set -uo pipefail
out=${OUT:-/tmp/flashdispatch-out}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader)"
timeout 330 python3 -m flashdispatch verify --backend triton --tier full --device cuda 2>&1 | grep -v "^\[W" > "$out/verify_triton.log"
tail -n 25 "$out/verify_triton.log"
timeout 230 python3 benchmarks/attention.py --backends triton --grid prefill --grid decode \
  --json "$out/bench_triton.json" --plot "$out/bench_triton.png" 2>&1 | grep -v "^\[W" > "$out/bench_triton.log"
grep -E "^\[|^  (triton|sdpa-flash|sdpa-cudnn)" "$out/bench_triton.log"
