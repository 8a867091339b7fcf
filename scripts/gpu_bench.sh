#!/usr/bin/env bash
# GPU performance run, in one device call: the side-by-side benchmark (prefill and decode grids
# with the machine's copy and matmul ceilings), the memory benchmark and the host-overhead
# benchmark. Logs, JSON and the figure go to $OUT (default /tmp/flashdispatch-out).
set -uo pipefail
out=${OUT:-/tmp/flashdispatch-out}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1
{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader)"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
  echo "== overhead"
  python3 benchmarks/overhead.py --json "$out/overhead.json"
  echo "== decode loop (a new shape every step)"
  python3 benchmarks/decode_loop.py
  echo "== memory"
  python3 benchmarks/memory.py --json "$out/memory.json"
  echo "== attention: prefill and decode grids"
  python3 benchmarks/attention.py --grid prefill --grid decode --ceilings --json "$out/bench.json" --plot "$out/bench.png"
} 2>&1 | tee "$out/bench.log"
