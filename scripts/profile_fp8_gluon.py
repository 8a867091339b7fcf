import torch, sys
sys.path.insert(0, "src")
from flashdispatch.backends.fp8_hopper import hopper, to_kernel_layout
from flashdispatch.dispatcher.problem import build_problem
b, h, n, d = 4, 16, 4096, 128
q8, k8, v8 = (torch.randn(b, h, n, d, device="cuda").to(torch.float8_e4m3fn) for _ in range(3))
ones = torch.ones(b, h, device="cuda")
problem = build_problem(q8, k8, v8, causal=False, descales=(ones, ones, ones))
vt = to_kernel_layout(v8).transpose(2, 3)
for _ in range(3):
    hopper.forward(q8, k8, vt, (ones,) * 3, 1, torch.bfloat16, problem)
torch.cuda.synchronize()
