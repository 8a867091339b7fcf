#!/bin/sh
# CPU self-test of the benchmark scripts: every code path (grids scaled down, skips, unsupported,
# errors, OOM, NaN, --through-api, --fwd-only, --ceilings, --json, --plot, --from-json; memory.py's
# table and growth with a fake peak counter; overhead.py). Run from the repository root.
set -e
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
for mode in grid api api2 errors fwdonly; do python3 benchmarks/selftest/harness_attention.py $mode > /dev/null; echo "attention $mode: ok"; done
python3 benchmarks/attention.py --from-json /tmp/flashdispatch-selftest-grid.json > /dev/null; echo "attention --from-json: ok"
python3 benchmarks/selftest/harness_memory.py > /dev/null; echo "memory (fake counter): ok"
python3 benchmarks/memory.py --device cpu > /dev/null; echo "memory --device cpu: ok"
python3 benchmarks/overhead.py --device cpu --iters 100 --repeats 3 > /dev/null; echo "overhead --device cpu: ok"
