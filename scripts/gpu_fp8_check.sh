#!/usr/bin/env bash
# One device call for the `fp8-hopper` backend: the FP8 rule against float64 (pre-quantized and
# bf16 inputs), the accuracy on FlashAttention-3's outlier inputs, the kernel's SASS (QGMMA), the
# GPU-marked tests and the conformance tier, then the speed side by side with sdpa-cudnn and
# sdpa-flash in bf16, and the quantization pass's (and V's rearrangement's) own times. Logs to $OUT.
# The parts run most needed first: a call cut short by its time limit loses the last ones.
source "$(dirname "$0")/gpu_common.sh"
start=$(date +%s)
timeout 200 python3 scripts/check_fp8_gpu.py --part exact 2>&1 | tee "$out/fp8_exact.log" | grep -v "^exact: ok" | tail -n 30
timeout 200 python3 -m pytest -q -m gpu tests/test_fp8_backend.py tests/test_fp8_quantize.py > "$out/fp8_pytest_gpu.log" 2>&1
echo "GPU-marked tests: $(tail -n 1 "$out/fp8_pytest_gpu.log")"
timeout 300 python3 scripts/check_fp8_gpu.py --part speed --lengths 4096,16384 2>&1 | grep "^speed\|Error" | tee "$out/fp8_speed.log"
timeout 120 python3 scripts/check_fp8_gpu.py --part accuracy 2>&1 | tee "$out/fp8_accuracy.log" | tail -n 8
timeout 120 python3 scripts/check_fp8_gpu.py --part sass 2>&1 | tee "$out/fp8_sass.log" | tail -n 6
timeout 320 python3 -m flashdispatch verify --backend fp8-hopper --tier full --device cuda 2>&1 | grep -v "^\[W" > "$out/fp8_verify_full.log"
echo "full tier: $(grep -v "portable kernel, slower" "$out/fp8_verify_full.log" | tail -n 3 | tr '\n' ' ')"
timeout 120 python3 scripts/bench_fp8_quantize.py --warps 8 2>&1 | grep "check\|rotated\|transposed\|e4m3 V" | tee "$out/fp8_quantize.log"
echo "total: $(( $(date +%s) - start )) s"
