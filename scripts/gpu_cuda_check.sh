#!/usr/bin/env bash
# One device call for the `cuda` backend: exactness against float64, the full conformance tier,
# the GPU-marked tests, compute-sanitizer (memcheck and racecheck) over one forward and one split
# decoding launch, then the speed side by side with sdpa-flash, sdpa-cudnn and a copy, and the
# host time of a decoding call. Logs to $OUT.
source "$(dirname "$0")/gpu_common.sh"
start=$(date +%s)
export FLASHDISPATCH_CACHE_DIR=$(mktemp -d)
python3 -c "import cupy; print('cupy', cupy.__version__, 'nvrtc', cupy.cuda.nvrtc.getVersion())" | tee -a "$out/env.log"
timeout 150 python3 scripts/check_cuda_gpu.py --part exact 2>&1 | tee "$out/cuda_exact.log" | grep -v "^exact: ok" | tail -n 30
timeout 200 python3 -m flashdispatch verify --backend cuda --tier full --device cuda 2>&1 | grep -v "^\[W" > "$out/cuda_verify_full.log"
echo "full tier: $(tail -n 3 "$out/cuda_verify_full.log" | tr '\n' ' ')"
grep "^FAILED" -A3 "$out/cuda_verify_full.log" | head -20
timeout 120 python3 -m pytest -q -m gpu tests/test_cuda_backend.py > "$out/cuda_pytest_gpu.log" 2>&1
echo "GPU-marked tests: $(tail -n 1 "$out/cuda_pytest_gpu.log")"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [ -n "$sanitizer" ]; then
  for tool in memcheck racecheck; do
    timeout 150 "$sanitizer" --tool $tool --error-exitcode 3 python3 scripts/check_cuda_gpu.py --part sanitize \
      > "$out/sanitizer_$tool.log" 2>&1
    echo "compute-sanitizer $tool: exit $? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tr '\n' ' ')"
  done
else
  echo "compute-sanitizer: not found"
fi
timeout 200 python3 scripts/check_cuda_gpu.py --part speed 2>&1 | grep "^speed" | tee "$out/cuda_speed.log"
echo "total: $(( $(date +%s) - start )) s"
