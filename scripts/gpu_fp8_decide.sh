#!/usr/bin/env bash
# One device call for the Gluon FP8 kernel: the whole of gpu_fp8_check.sh at the defaults, then at D
# = 128 persistent programs or one per tile side by side (non-causal; causal takes one per tile
# either way). About 8 minutes on an H100: run it with the call's full 600 s (the sweep comes last:
# a call cut short loses it first).
# Logs to $OUT.
source "$(dirname "$0")/gpu_common.sh"
bash "$(dirname "$0")/gpu_fp8_check.sh"
PYTHONPATH=src:scripts timeout 80 python3 scripts/sweep_fp8_gluon.py --head-dims 128 --persistent 1,0 2>&1 | grep "^sweep\|Error" | tee -a "$out/fp8_speed.log"  # a ninth file would not come back
