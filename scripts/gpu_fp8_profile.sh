#!/usr/bin/env bash
# One device call to see where the Gluon FP8 kernel's time goes: the FP8 rule and GPU tests at the
# current tree, the D=128/64 sweep (Gluon, portable, cuDNN bf16) with the SM clock sampled
# alongside, then Nsight Compute's per-instruction stall samples of one launch
# (scripts/profile_fp8_gluon.py) at the card's own clocks. Logs to $OUT.
source "$(dirname "$0")/gpu_common.sh"
start=$(date +%s)
timeout 200 python3 scripts/check_fp8_gpu.py --part exact 2>&1 | tee "$out/fp8_exact.log" | grep -v "^exact: ok" | tail -n 10
timeout 200 python3 -m pytest -q -m gpu tests/test_fp8_backend.py tests/test_fp8_quantize.py > "$out/fp8_pytest_gpu.log" 2>&1
echo "GPU-marked tests: $(tail -n 1 "$out/fp8_pytest_gpu.log")"
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv,noheader -lms 250 > "$out/clocks.log" &
clock_pid=$!
timeout 240 env PYTHONPATH=src:scripts python3 scripts/sweep_fp8_gluon.py ${SWEEP_ARGS:-} 2>&1 | grep "^sweep\|Error" | tee "$out/fp8_sweep.log"
kill $clock_pid
echo "SM clock MHz during the sweep (median, min, max): $(awk -F, '{print $1+0}' "$out/clocks.log" | sort -n | awk '{a[NR]=$1} END {print a[int(NR/2)+1], a[1], a[NR]}')"
if [ "${NCU:-1}" = 1 ]; then
timeout 240 ncu --kernel-name fp8_hopper_forward --launch-skip 2 --launch-count 1 --clock-control none \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters \
    --import-source no -o "$out/fp8_gluon" python3 scripts/profile_fp8_gluon.py > "$out/ncu_run.log" 2>&1
tail -n 3 "$out/ncu_run.log"
ncu -i "$out/fp8_gluon.ncu-rep" --page details > "$out/ncu_details.log" 2>&1
ncu -i "$out/fp8_gluon.ncu-rep" --page source --print-source sass --csv 2>&1 | python3 scripts/ncu_sass_hotspots.py > "$out/ncu_hotspots.log"
head -c 3000 "$out/ncu_hotspots.log"
grep -E "SM Frequency|Duration|Issue Slots Busy|Eligible Warps|No Eligible|Warp Cycles Per Issued" "$out/ncu_details.log"
fi
echo "total: $(( $(date +%s) - start )) s"
