"""Exercise attention.py's code paths on CPU: grids (scaled down), skip rule, errors, OOM, NaN, through-api, plot."""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import torch
import flashdispatch
from flashdispatch import Backend, Support
import attention as A

class Boom(Backend):
    name = "boom"; support = Support(dtypes=(torch.float32, torch.bfloat16), backward=True)
    def forward(self, q, k, v, problem, *a): raise RuntimeError("forward exploded\nsecond line")
class OOMer(Backend):
    name = "oomer"; support = Support(dtypes=(torch.float32, torch.bfloat16), backward=True)
    def forward(self, q, k, v, problem, *a):
        return torch.zeros_like(q) + 1, torch.zeros(q.shape[:3])
    def backward(self, *a, **kw): raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB")
class NaNer(Backend):
    name = "naner"; support = Support(dtypes=(torch.float32, torch.bfloat16), backward=True)
    def forward(self, q, k, v, problem, *a): return torch.full_like(q, float("nan")), torch.zeros(q.shape[:3])
class FwdOnly(Backend):
    name = "fwdonly"; support = Support(dtypes=(torch.float32, torch.bfloat16), gqa=True)
    def forward(self, q, k, v, problem, *a):
        from flashdispatch.backends.reference import attention_math
        out, lse = attention_math(q, k, v, scale=problem.scale, window_right=problem.window_right, compute_dtype=torch.float32)
        return out.to(q.dtype), lse.float()
for b in (Boom(), OOMer(), NaNer(), FwdOnly()):
    flashdispatch.register_backend(b)

# Scaled-down grids with the same structure.
A.prefill_grid_orig = A.prefill_grid
def small_prefill():
    return [A.Shape("prefill", 256 // n, 64 // d, 64 // d, n, n, d, c) for d in (16, 32) for n in (32, 64, 128) for c in (False, True)]
def small_decode():
    return [A.Shape("decode", b, 4, 1, 1, nk, 32, False) for b, nk in ((2, 256), (4, 256), (2, 1024))]
A.prefill_grid, A.decode_grid = small_prefill, small_decode
A.LARGE_SCORE_ELEMENTS = 8 * 128 * 128  # so that N=128 counts as large here
mode = sys.argv[1]
if mode == "grid":
    sys.exit(A.main(["--device", "cpu", "--dtype", "float32", "--repeats", "2", "--json", "/tmp/flashdispatch-selftest-grid.json", "--plot", "/tmp/flashdispatch-selftest-grid.png"]))
if mode == "api":
    sys.exit(A.main(["--device", "cpu", "--dtype", "float32", "--through-api", "--backends", "tiled,fwdonly,boom,oomer,naner,sdpa-math",
                     "--shape", "2,4,2,48,80,16", "--causal", "--repeats", "2"]))
if mode == "errors":
    sys.exit(A.main(["--device", "cpu", "--dtype", "float32", "--backends", "tiled,fwdonly", "--backends", "boom,oomer,naner",
                     "--shape", "2,4,2,48,80,16", "--causal", "--repeats", "2", "--no-baselines"]))
if mode == "fwdonly":
    sys.exit(A.main(["--device", "cpu", "--grid", "decode", "--fwd-only", "--shape", "1,2,2,64,64,32", "--repeats", "2", "--all", "--ceilings"]))
if mode == "api2":
    A.LARGE_SCORE_ELEMENTS = 4 * 128 * 64
    sys.exit(A.main(["--device", "cpu", "--dtype", "float32", "--through-api", "--backends", "tiled,fwdonly,boom,oomer,naner,sdpa-math,reference",
                     "--shape", "2,4,4,48,80,16", "--shape", "1,4,4,128,128,16", "--causal", "--repeats", "2", "--json", "/tmp/flashdispatch-selftest-api2.json"]))
