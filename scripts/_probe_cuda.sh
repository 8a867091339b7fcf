source scripts/gpu_common.sh
export FLASHDISPATCH_CACHE_DIR=$(mktemp -d)
timeout 150 python3 scripts/check_cuda_gpu.py --part exact 2>&1 | grep -v "^exact: ok\|Deprecation\|out, lse = " | tail -n 20
timeout 200 python3 scripts/check_cuda_gpu.py --part forward-sweep 2>&1 | grep -v Deprecation | head -n 2
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
echo "ncu: $NCU"
if [ -n "$NCU" ]; then
  timeout 150 $NCU --section SpeedOfLight --section WarpStateStats --section Occupancy --section ComputeWorkloadAnalysis -k regex:flash_forward --launch-skip 1 -c 1 python3 scripts/check_cuda_gpu.py --part profile > "$out/ncu.log" 2>&1
  grep -v "^==PROF==\|^\s*$\|----" "$out/ncu.log" | tail -n 70
fi
