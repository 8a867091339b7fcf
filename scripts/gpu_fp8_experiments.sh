#!/usr/bin/env bash
# One device call for the branch wip/fp8-steps: main plus the FP8 kernel's experimental settings,
# each off by default. The timeouts add up to under 10 minutes on an H100.
#   1. The Gluon kernel at D = 128, pre-quantized, at 4k and 16k, causal and not, beside cuDNN
#      bf16. It runs with and without each of three settings:
#      - 192-key steps of two score tiles (hopper.STEP_KEYS);
#      - the row sums on the tensor cores (hopper.SUM_MMA);
#      - persistence (hopper.PERSISTENT).
#      Each setting's output is compared with the first's. Then the same kernel with one K and V
#      descale per key step (the general path, as quantized inputs take it) and with one per head
#      (pre-quantized inputs: read once, no division a step).
#   2. The FP8 rule against float64 with 192-key steps and the row sums on the tensor cores.
#   3. The FP8 rule at the defaults. The branch makes the kernel persistent at D = 64 and 128
#      non-causal. It also checks `rearrange_v` through its pre-quantized and kernel-layout ways.
#   4. The 64-bit offsets test: an output past 2^31 elements through both kernels.
#   5. The quantization bench's byte checks (`rearrange_v` against PyTorch's copies) and its times,
#      in the time left.
# Logs go to $OUT. The standalone two-tile experiment (scripts/exp_fp8_two_tiles.py: P carried
# packed) needs a call of its own: `bash scripts/gpu_fp8_two_tiles_exp.sh`.
source "$(dirname "$0")/gpu_common.sh"
start=$(date +%s)
PYTHONPATH=src:scripts timeout 230 python3 scripts/sweep_fp8_gluon.py --head-dims 128 --sum-mma 0,1 --persistent 0,1 \
    --step-keys 128,192 2>&1 | grep "^sweep\|Error" | tee "$out/fp8_sweep_settings.log"
PYTHONPATH=src:scripts timeout 70 python3 scripts/sweep_fp8_gluon.py --head-dims 128 --kv-block-descales 1,0 2>&1 \
    | grep "^sweep\|Error" | tee "$out/fp8_sweep_kv_descales.log"
timeout 110 python3 scripts/check_fp8_gpu.py --part exact --step-keys 192 --sum-mma 2>&1 \
    | tee "$out/fp8_exact_192_sum.log" | grep -v "^exact: ok" | tail -n 30
timeout 90 python3 scripts/check_fp8_gpu.py --part exact 2>&1 | tee "$out/fp8_exact.log" | grep -v "^exact: ok" | tail -n 30
timeout 60 python3 -m pytest -q -m gpu tests/test_fp8_backend.py -k "2_to_the_31" > "$out/fp8_pytest_int64.log" 2>&1
echo "64-bit offsets test: $(tail -n 1 "$out/fp8_pytest_int64.log")"
timeout $(( 580 - $(date +%s) + start )) python3 scripts/bench_fp8_quantize.py --warps 8 2>&1 \
    | grep "check\|rotated\|transposed\|e4m3 V" | tee "$out/fp8_quantize.log"
echo "total: $(( $(date +%s) - start )) s"
