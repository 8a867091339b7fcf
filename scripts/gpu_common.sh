# Sourced by the scripts/gpu_triton_*.sh device runs: logs go to $out ($OUT, default
# /tmp/flashdispatch-out), the source tree is on PYTHONPATH, and env.log records the machine.
set -uo pipefail
out=${OUT:-/tmp/flashdispatch-out}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
{ echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$out/env.log"
