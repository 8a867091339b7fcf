#!/usr/bin/env bash
# GPU correctness run, in one device call: the README's two commands on a fresh copy (as a new
# user would run them), the full conformance tier on the GPU for every registered backend, and the
# explain reports the spine issue asks for. Logs go to $OUT (default /tmp/flashdispatch-out).
set -uo pipefail
out=${OUT:-/tmp/flashdispatch-out}
mkdir -p "$out"
repo=$(pwd)
export PYTHONUNBUFFERED=1

{
  echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader)"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__)"
  fresh=$(mktemp -d)/flashdispatch
  mkdir -p "$fresh" && cp -r "$repo"/. "$fresh" && rm -rf "$fresh/.venv" "$fresh/.git" && cd "$fresh" || exit 1
  echo "== make demo (fresh copy)"
  make demo; echo "make demo exit $?"
  echo "== make test (fresh copy)"
  make test; echo "make test exit $?"
  echo "== explain: decode, Nq=1 causal (the mask hides no key), GQA 32/8"
  .venv/bin/flashdispatch explain --shape 8,32,8,1,4096,128 --causal --dtype bfloat16
  echo "== explain: chunked decode, Nq=16 causal, GQA 32/8"
  .venv/bin/flashdispatch explain --shape 8,32,8,16,4096,128 --causal --dtype bfloat16
  echo "== explain: prefill, float32 (cuDNN would return NaN)"
  .venv/bin/flashdispatch explain --shape 2,16,16,1024,1024,64 --dtype float32
} 2>&1 | tee "$out/check.log"

cd "$repo"
PYTHONPATH=src python3 -m flashdispatch verify --tier full --device cuda 2>&1 | tee "$out/verify.log"
