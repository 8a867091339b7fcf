#!/usr/bin/env bash
# One device call for wip/fp8-defaults (192-key steps and the row sums on the tensor cores at
# D = 128 by default): the settings side by side (128 or 192 keys, sums by FADD or on the tensor
# cores, persistent where the branch makes it), then the whole recorded run of gpu_fp8_check.sh at
# the branch's defaults. Under 10 minutes on an H100. Logs to $OUT.
source "$(dirname "$0")/gpu_common.sh"
PYTHONPATH=src:scripts timeout 150 python3 scripts/sweep_fp8_gluon.py --head-dims 128 --sum-mma 0,1 --step-keys 128,192 \
    2>&1 | grep "^sweep\|Error" | tee "$out/fp8_sweep_settings.log"
bash "$(dirname "$0")/gpu_fp8_check.sh"
