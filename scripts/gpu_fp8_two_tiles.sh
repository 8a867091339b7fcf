#!/usr/bin/env bash
# One device call for the branch wip/fp8-two-tiles: main's recorded FP8 check first (this branch is
# main plus the experiment), then the two-tile experiment beside the shipped kernel and cuDNN.
# Logs to $OUT; about 8 minutes on an H100.
source "$(dirname "$0")/gpu_common.sh"
bash "$(dirname "$0")/gpu_fp8_check.sh"
PYTHONPATH=src:scripts timeout 200 python3 scripts/exp_fp8_two_tiles.py 2>&1 | grep "^two-tiles\|Error" \
    | tee "$out/fp8_two_tiles.log"
