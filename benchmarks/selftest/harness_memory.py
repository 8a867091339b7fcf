"""Exercise memory.py's counter, growth and table code on CPU with a fake peak counter."""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import torch
import flashdispatch
from flashdispatch import Backend, Support
import memory as M

state = {}
class Fake:
    def start(self):
        return 4096
    def stop(self):
        n, name = state["n"], state["name"]
        extra = (1_000_000 + 300 * 8 * n) if name == "tiled" else 8 * n * n * 16
        kept = 4 * 8 * n * 64 * 4 + 8 * n * 4
        return 4096 + extra + kept, 2 * (4096 + extra)
M.peak_counter = lambda device: Fake()
orig_storage = M.storage_bytes
def storage(ts):
    b = orig_storage(ts)
    state["kept"] = b
    return b
M.storage_bytes = storage

class Tracker:
    def __init__(self, b): self.b, self.name, self.support = b, b.name, b.support
    def backward_not_supported_reasons(self, p, c): return self.b.backward_not_supported_reasons(p, c)
    def forward(self, q, k, v, p):
        state["n"], state["name"] = q.shape[2], self.name
        return self.b.forward(q, k, v, p)
    def backward(self, *a): return self.b.backward(*a)

class OOMAt256(Backend):
    name = "oom256"; support = Support(dtypes=(torch.float32,), backward=True)
    def forward(self, q, k, v, p):
        state["n"], state["name"] = q.shape[2], self.name
        if q.shape[2] >= 256: state["n"] = q.shape[2]; raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB. GPU 0 has ...")
        return q.clone(), torch.zeros(q.shape[:3])
    def backward(self, dout, q, k, v, out, lse, p): return q.clone(), k.clone(), v.clone()
flashdispatch.register_backend(OOMAt256())
reg = flashdispatch.backends()
orig = flashdispatch.backends
M.flashdispatch.backends = lambda: {**reg, "tiled": Tracker(reg["tiled"]), "sdpa-math": Tracker(reg["sdpa-math"])}
sys.exit(M.main(["--device", "cpu", "--dtype", "float32", "--seqlens", "64,128,256,512", "--backends", "tiled,sdpa-math,oom256,sdpa-cudnn", "--json", "/tmp/flashdispatch-selftest-mem2.json"]))
