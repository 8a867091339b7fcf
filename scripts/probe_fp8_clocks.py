"""TFLOP/s, SM clock and power of the FP8 Gluon kernel and cuDNN's bf16 kernel, each run alone back
to back for 2 s (D = 128, 4k and 16k, causal or not): FLOP per SM per clock, which can be set
against published figures measured at locked clocks (FlashAttention-3's FP8 forward: 1,008
TFLOP/s at 1,830 MHz on 132 SMs, 4,173 FLOP/clk/SM, at 16k non-causal).

`median_times` times kernels in turns, so that a clock that drifts slows them alike; here each
runs alone, so that its own clock and power show (nvidia-smi sampled every 50 ms, the first
fifth of the samples dropped). Run from the repository root on the GPU:
`PYTHONPATH=src:scripts python3 scripts/probe_fp8_clocks.py`; one `clock:` line per case."""

import statistics
import subprocess
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from flashdispatch.backends.fp8_hopper import hopper, to_kernel_layout
from flashdispatch.dispatcher.problem import build_problem
from gpu_grid import prefill_cases

FP8 = torch.float8_e4m3fn
SECONDS = 2.0


def sampled(fn):
    """(seconds a call, median SM clock in MHz, median power in W) of fn run back to back."""
    fn()
    torch.cuda.synchronize()
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-lms", "50"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < SECONDS:
        for _ in range(4):
            fn()
        calls += 4
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    smi.terminate()
    samples = [tuple(float(x) for x in line.split(",")) for line in smi.communicate()[0].splitlines() if "," in line]
    samples = samples[len(samples) // 5:]
    return elapsed / calls, statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for d, n, causal, q, k, v, flops in prefill_cases(head_dims=(128,), lengths=(4096, 16384)):
        q8, k8, v8 = (t.to(FP8) for t in (q, k, v))
        ones = torch.ones(q.shape[0], q.shape[1], device="cuda")
        problem = build_problem(q8, k8, v8, causal=causal, descales=(ones, ones, ones))
        vt = to_kernel_layout(v8).transpose(2, 3)
        vt = vt.as_strided((*vt.shape[:3], -(-n // 16) * 16), vt.stride())

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return scaled_dot_product_attention(q, k, v, is_causal=causal)

        def gluon():
            return hopper.forward(q8, k8, vt, (ones, ones, ones), 1, torch.bfloat16, problem)

        for name, fn in (("cudnn bf16", cudnn), ("fp8 gluon", gluon)):
            seconds, mhz, watts = sampled(fn)
            rate = flops / seconds
            print(f"clock: D={d} N={n} causal={causal} {name}: {rate / 1e12:.0f} TFLOP/s at {mhz:.0f} MHz, "
                  f"{watts:.0f} W: {rate / (sms * mhz * 1e6):.0f} FLOP/clk/SM", flush=True)


if __name__ == "__main__":
    main()
