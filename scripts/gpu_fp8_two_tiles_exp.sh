#!/usr/bin/env bash
# One device call, about 5 minutes on an H100: the standalone two-tile experiment
# (scripts/exp_fp8_two_tiles.py: 192- and 256-key steps, P carried packed, with and without the
# row sums on the tensor cores) beside main's kernel and cuDNN, at D = 128 and then D = 64. Logs
# to $OUT.
source "$(dirname "$0")/gpu_common.sh"
PYTHONPATH=src:scripts timeout 210 python3 scripts/exp_fp8_two_tiles.py \
    --configs 128:64:2,128:64:2:sum,128:128:2,128:128:2:sum 2>&1 | grep "^two-tiles\|Error" | tee "$out/fp8_two_tiles.log"
PYTHONPATH=src:scripts timeout 150 python3 scripts/exp_fp8_two_tiles.py --head-dim 64 \
    --configs 128:64:2,128:128:2:sum 2>&1 | grep "^two-tiles\|Error" | tee "$out/fp8_two_tiles_d64.log"
