#!/usr/bin/env bash
# One device call for the Gluon FP8 kernel: gpu_fp8_check.sh's parts (the conformance full tier
# with -v, so that a stall shows where), the SM clock and power sampled while the speed part runs,
# then at D = 128 the kernel's general path (one K and V descale a key step, as quantized inputs
# take) beside the per-head one. About 7 minutes: give it the call's full 600 s. QUICK=1: the FP8
# rule, the full tier and the speed part only (about 5 minutes). NCU=1: then Nsight Compute's stall
# samples of one D = 128 launch (about 1 more minute), appended to the sass log. Logs to $OUT.
source "$(dirname "$0")/gpu_common.sh"
start=$(date +%s)
timeout 200 python3 scripts/check_fp8_gpu.py --part exact 2>&1 | tee "$out/fp8_exact.log" | grep -v "^exact: ok" | tail -n 30
if [ "${QUICK:-0}" != 1 ]; then
timeout 200 python3 -m pytest -q -m gpu tests/test_fp8_backend.py tests/test_fp8_quantize.py > "$out/fp8_pytest_gpu.log" 2>&1
echo "GPU-marked tests: $(tail -n 1 "$out/fp8_pytest_gpu.log")"
fi
# After the parts above, whose kernels it finds compiled: run beside them (2026-12-06, H200) it
# compiled the same kernels at the same time, 65-81 s each, and ran past 240 s.
timeout 240 python3 -m flashdispatch verify --backend fp8-hopper --tier full --device cuda -v 2>&1 \
  | grep -v "^\[W\|portable kernel, slower" > "$out/fp8_verify_full.log"
echo "full tier ($(( $(date +%s) - start )) s in): $(grep -A1 "^backend" "$out/fp8_verify_full.log" | tail -n 1)"
nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -lms 250 > /tmp/clocks.log &
clocks=$!
timeout 280 python3 scripts/check_fp8_gpu.py --part speed --lengths 4096,16384 2>&1 | grep "^speed\|Error" | tee "$out/fp8_speed.log"
kill $clocks
echo "SM clock MHz while the speed part ran (median, min, max): $(cut -d, -f1 /tmp/clocks.log | sort -n | awk '{a[NR]=$1} END {print a[int(NR/2)+1], a[1], a[NR]}'); power W (median, max): $(cut -d, -f2 /tmp/clocks.log | sort -n | awk '{a[NR]=$1} END {print a[int(NR/2)+1], a[NR]}')" | tee -a "$out/fp8_speed.log"
[ "${QUICK:-0}" = 1 ] && { echo "total: $(( $(date +%s) - start )) s"; exit 0; }
timeout 100 python3 scripts/check_fp8_gpu.py --part accuracy 2>&1 | tee "$out/fp8_accuracy.log" | tail -n 8
timeout 100 python3 scripts/check_fp8_gpu.py --part sass 2>&1 | tee "$out/fp8_sass.log" | tail -n 6
timeout 80 python3 scripts/bench_fp8_quantize.py --warps 8 2>&1 | grep "check\|rotated\|transposed\|e4m3 V" | tee "$out/fp8_quantize.log"
# K and V's blocks at D = 128 without a causal mask (hopper.QUANTIZED_STEP_KEYS): 192 rows, two tiles
timeout 60 python3 scripts/bench_fp8_quantize.py --warps 8 --block-rows 192 --head-dims 128 2>&1 \
  | grep "check\|rotated\|transposed" | tee -a "$out/fp8_quantize.log"
echo "total before the sweep: $(( $(date +%s) - start )) s"
# the sweep's lines go to the speed log: a ninth file in $out would not come back
PYTHONPATH=src:scripts timeout 90 python3 scripts/sweep_fp8_gluon.py --head-dims 128 --kv-block-descales 0,1 2>&1 \
  | grep "^sweep\|Error" | tee -a "$out/fp8_speed.log"
if [ "${NCU:-0}" = 1 ]; then  # Nsight Compute's stall samples per SASS region of one D = 128 launch, into the sass log
  timeout 110 ncu --kernel-name fp8_hopper_forward --launch-skip 2 --launch-count 1 --clock-control none \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters \
      --import-source no -o /tmp/fp8_gluon python3 scripts/profile_fp8_gluon.py > /tmp/ncu_run.log 2>&1
  { ncu -i /tmp/fp8_gluon.ncu-rep --page source --print-source sass --csv 2>&1 | python3 scripts/ncu_sass_hotspots.py
    ncu -i /tmp/fp8_gluon.ncu-rep --page details 2>&1 | grep -E "SM Frequency|Duration|Issue Slots Busy|Eligible Warps|No Eligible|Warp Cycles Per Issued"
  } >> "$out/fp8_sass.log"
  echo "ncu: $(tail -n 1 /tmp/ncu_run.log)"
fi
echo "total: $(( $(date +%s) - start )) s"
