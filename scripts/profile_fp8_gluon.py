"""Three launches of the Gluon FP8 forward (B 4, H 16, N 4096, D 128, pre-quantized, non-causal),
for a profiler to pick one:

    ncu --kernel-name fp8_hopper_forward --launch-skip 2 --launch-count 1 --section WarpStateStats \\
        --section SchedulerStats python3 scripts/profile_fp8_gluon.py

Run from the repository root (PYTHONPATH=src). N is a multiple of 16, so `to_kernel_layout`'s
view spans V^T's whole padded length.
"""

import torch

from flashdispatch.backends.fp8_hopper import hopper, to_kernel_layout
from flashdispatch.dispatcher.problem import build_problem

b, h, n, d = 4, 16, 4096, 128
q8, k8, v8 = (torch.randn(b, h, n, d, device="cuda").to(torch.float8_e4m3fn) for _ in range(3))
ones = torch.ones(b, h, device="cuda")
problem = build_problem(q8, k8, v8, causal=False, descales=(ones, ones, ones))
vt = to_kernel_layout(v8).transpose(2, 3)  # (B, H, D, N)
for _ in range(3):
    hopper.forward(q8, k8, vt, (ones,) * 3, 1, torch.bfloat16, problem)
torch.cuda.synchronize()
