"""Do the exponential (MUFU.EX2) and the float32 -> e4m3 conversion (F2FP) share a pipe on this GPU?

Each kernel runs 8 independent chains a thread, 64 warps an SM, and is timed alone and with the
operations interleaved: if the interleaved run takes as long as one alone, the two have units of
their own. Prints lanes a clock an SM at 1,755 MHz (the H100's clock under load), one `probe:`
line per kind. Needs CuPy; run on the GPU: `python3 scripts/probe_fp8_pipes.py`."""

import cupy as cp
import numpy as np

SOURCE = r'''
extern "C" __global__ void probe(float* out, int iters, int mode) {
  float x[8];
  unsigned acc = 0;
  for (int i = 0; i < 8; i++) x[i] = -0.001f * (threadIdx.x + i);
  for (int it = 0; it < iters; it++) {
    #pragma unroll
    for (int i = 0; i < 8; i++) {
      if (mode & 1) {  // the exponential, chained through x
        float y;
        asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x[i]));
        x[i] = y - 1.0f;
      }
      if (mode & 2) {  // the conversion of two floats to e4m3
        unsigned short h;
        asm volatile("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(h) : "f"(x[i]), "f"(x[(i + 1) & 7]));
        acc += h;
      }
    }
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = x[0] + x[7] + acc;
}
'''
CLOCK_HZ = 1.755e9
SMS_BLOCKS, THREADS, ITERS = 132 * 8, 1024, 4096


def main() -> None:
    kernel = cp.RawKernel(SOURCE, "probe")
    out = cp.empty(SMS_BLOCKS * THREADS, dtype=cp.float32)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    for mode, name in ((1, "ex2"), (2, "cvt e4m3x2"), (3, "ex2 + cvt interleaved")):
        times = []
        for _ in range(7):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            kernel((SMS_BLOCKS,), (THREADS,), (out, np.int32(ITERS), np.int32(mode)))
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end) * 1e-3)
        seconds = sorted(times)[len(times) // 2]
        per_kind = SMS_BLOCKS * THREADS * ITERS * 8  # of each kind in the run
        print(f"probe: {name}: {seconds * 1e3:.2f} ms, {per_kind / seconds / sms / CLOCK_HZ:.1f} lanes/clk/SM of each kind",
              flush=True)


if __name__ == "__main__":
    main()
