#!/usr/bin/env bash
# One device call for the Gluon FP8 kernel's settings at D = 128, then the recorded check at the
# defaults: the settings side by side (persistent programs or one per tile, non-causal; one K and V
# descale a head read once, as pre-quantized inputs have, or one a step, main's general path), then
# the whole of gpu_fp8_check.sh. About 9 minutes on an H100: run it with the call's full 600 s.
# Logs to $OUT.
source "$(dirname "$0")/gpu_common.sh"
PYTHONPATH=src:scripts timeout 120 python3 scripts/sweep_fp8_gluon.py --head-dims 128 --persistent 1,0 \
    --kv-block-descales 0,1 2>&1 | grep "^sweep\|Error" | tee "$out/fp8_sweep_settings.log"
bash "$(dirname "$0")/gpu_fp8_check.sh"
