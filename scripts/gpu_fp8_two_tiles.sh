#!/usr/bin/env bash
# One device call for the FP8 experiment branches (wip/fp8-persistent: main plus the two-tile
# experiment, the row sums on the tensor cores and the persistent kernel), about 8 minutes on an
# H100 (the timeouts add up to 10.5; the last step gets what is left):
#   1. the two-tile experiment beside the shipped kernel and cuDNN at D = 128;
#   2. the shipped kernel with and without its row sums on the tensor cores (hopper.SUM_MMA) and
#      with and without persistence (hopper.PERSISTENT), each setting's output against the first's;
#   3. the FP8 rule against float64 with the persistent kernel (the branch's default at D = 64 and
#      128), and `rearrange_v` through its pre-quantized and kernel-layout ways;
#   4. the test of 64-bit offsets (an output past 2^31 elements, both kernels: wip/fp8-int64), then
#      the quantization bench's byte checks (`rearrange_v` against PyTorch's copies) and times;
#   5. the two-tile experiment at D = 64, as long as time is left (likely none: a later call).
# Logs to $OUT.
source "$(dirname "$0")/gpu_common.sh"
start=$(date +%s)
PYTHONPATH=src:scripts timeout 210 python3 scripts/exp_fp8_two_tiles.py \
    --configs 128:64:2,128:64:2:sum,128:128:2,128:128:2:sum 2>&1 | grep "^two-tiles\|Error" | tee "$out/fp8_two_tiles.log"
PYTHONPATH=src:scripts timeout 150 python3 scripts/sweep_fp8_gluon.py --head-dims 128 --sum-mma 0,1 --persistent 0,1 \
    2>&1 | grep "^sweep\|Error" | tee "$out/fp8_sweep_sum_persistent.log"
timeout 100 python3 scripts/check_fp8_gpu.py --part exact 2>&1 | tee "$out/fp8_exact.log" | grep -v "^exact: ok" | tail -n 30
timeout 60 python3 -m pytest -q -m gpu tests/test_fp8_backend.py -k "2_to_the_31" > "$out/fp8_pytest_int64.log" 2>&1
echo "64-bit offsets test (wip/fp8-int64): $(tail -n 1 "$out/fp8_pytest_int64.log")"
timeout 70 python3 scripts/bench_fp8_quantize.py --warps 8 2>&1 | grep "check\|rotated\|transposed\|e4m3 V" \
    | tee "$out/fp8_quantize.log"
PYTHONPATH=src:scripts timeout $(( 570 - $(date +%s) + start )) python3 scripts/exp_fp8_two_tiles.py --head-dim 64 \
    --configs 128:64:2,128:128:2:sum 2>&1 | grep "^two-tiles\|Error" | tee "$out/fp8_two_tiles_d64.log"
echo "total: $(( $(date +%s) - start )) s"
