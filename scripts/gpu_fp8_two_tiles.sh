#!/usr/bin/env bash
# One device call for the branch wip/fp8-two-tiles: main's recorded FP8 check first (this branch is
# main plus the experiment), then the two-tile experiment beside the shipped kernel and cuDNN.
# Logs to $OUT; about 9 minutes on an H100 (D = 128, then D = 64 with 192- and 256-key steps).
source "$(dirname "$0")/gpu_common.sh"
bash "$(dirname "$0")/gpu_fp8_check.sh"
PYTHONPATH=src:scripts timeout 200 python3 scripts/exp_fp8_two_tiles.py 2>&1 | grep "^two-tiles\|Error" \
    | tee "$out/fp8_two_tiles.log"
PYTHONPATH=src:scripts timeout 100 python3 scripts/exp_fp8_two_tiles.py --head-dim 64 --configs 128:64:2,128:128:2 2>&1 \
    | grep "^two-tiles\|Error" | tee "$out/fp8_two_tiles_d64.log"
