source scripts/gpu_common.sh
export FLASHDISPATCH_CACHE_DIR=$(mktemp -d)
timeout 150 python3 scripts/check_cuda_gpu.py --part exact 2>&1 | grep -v "^exact: ok\|Deprecation\|out, lse = " | tail -n 20
timeout 200 python3 scripts/check_cuda_gpu.py --part forward-sweep 2>&1 | grep -v Deprecation | head -n 3
