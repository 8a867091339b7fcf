#!/usr/bin/env bash
# One device call for wip/fp8-defaults, whose defaults at D = 128 are chosen from SASS counts, not
# yet timed: row sums on the tensor cores, 192-key steps non-causal (persistent) and 128 causal.
# First the settings side by side (128 or 192 keys, sums by FADD or on the tensor cores), then the
# whole recorded run of gpu_fp8_check.sh at the branch's defaults. About 9.5 minutes on an H100: run
# it with the call's full 600 s.
# Logs to $OUT.
source "$(dirname "$0")/gpu_common.sh"
PYTHONPATH=src:scripts timeout 140 python3 scripts/sweep_fp8_gluon.py --head-dims 128 --sum-mma 0,1 --step-keys 128,192 \
    2>&1 | grep "^sweep\|Error" | tee "$out/fp8_sweep_settings.log"
# Persistent or not at the defaults: with the row sums added up in float32 the persistent loop spills
# (5 reloads a step at 192 keys, sm_90a), the one-program-per-tile one does not.
PYTHONPATH=src:scripts timeout 70 python3 scripts/sweep_fp8_gluon.py --head-dims 128 --sum-mma 1 --step-keys 192 \
    --persistent 1,0 2>&1 | grep "^sweep\|Error" | grep -v "causal=True" | tee "$out/fp8_sweep_persistent.log"
bash "$(dirname "$0")/gpu_fp8_check.sh"
