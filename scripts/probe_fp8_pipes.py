"""What the softmax's conversions and exponentials cost on this GPU's pipes: does the float32 ->
e4m3 conversion (F2FP) add to the exponentials' (MUFU.EX2) time, and do half-precision
exponentials (`ex2.approx.f16x2`) give MUFU more values a clock?

One kernel per mode, the mode a template argument (a runtime one would predicate every kind into
every run). 8 values a thread an iteration, in independent chains, 2 blocks of 1,024 threads an SM,
all chains summed into the output so that none is dropped. Rates come from the SM's own cycle
counter (clock64), so they do not assume a clock. One `probe:` line per mode, in values (of each
kind of instruction the mode runs) per clock per SM: `python3 scripts/probe_fp8_pipes.py` on the
GPU (needs CuPy). If "ex2 + cvt" runs as fast as "ex2", the conversions do not queue behind the
exponentials; if "ex2 f16x2" runs no faster than "ex2", half precision does not relieve MUFU (on
sm_90 ptxas splits it into two MUFU.EX2.F16)."""

import cupy as cp
import numpy as np

SOURCE = r'''
// MODE 0: a multiply chain; 1: ex2.f32; 2: cvt e4m3x2.f32 beside the multiply chain; 3: ex2.f32 and
// that cvt interleaved; 4: ex2.f16x2 (its input packed by integer instructions); 5: cvt f16x2.f32;
// 6: the half-precision chain, cvt f16x2.f32 + ex2.f16x2 + cvt e4m3x2.f16x2.
template <int MODE>
__global__ void probe(float* out, long long* cycles, int iters) {
  float x[8];
  unsigned acc = 0;
  for (int i = 0; i < 8; i++) x[i] = -0.001f * (threadIdx.x + i) - 1.0f;
  __syncthreads();
  long long start = clock64();
  for (int it = 0; it < iters; it++) {
    #pragma unroll
    for (int i = 0; i < 8; i += 2) {  // a pair of values of two chains
      float a = x[i], b = x[i + 1];
      if (MODE == 1 || MODE == 3) {
        asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(a) : "f"(a));
        asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(b) : "f"(b));
        a -= 1.5f;
        b -= 1.5f;
      } else if (MODE == 0 || MODE == 2) {
        a = a * 0.999f + 1e-7f;
        b = b * 0.999f + 1e-7f;
      }
      if (MODE == 2 || MODE == 3) {
        unsigned short h;
        asm volatile("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(h) : "f"(a), "f"(b));
        acc += h;
      }
      if (MODE == 4) {
        unsigned e, p = (__float_as_uint(a) & 0xffff) | (__float_as_uint(b) << 16);
        asm volatile("ex2.approx.f16x2 %0, %1;" : "=r"(e) : "r"(p));
        a = __uint_as_float(e) - 1.5f;
        b = __uint_as_float(e ^ 0x5555) - 1.5f;
      } else if (MODE == 5) {
        unsigned p;
        asm volatile("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(p) : "f"(b), "f"(a));
        a = __uint_as_float(p) * 0.5f;
        b = __uint_as_float(p ^ 0x3c00) * 0.5f;
      } else if (MODE == 6) {
        unsigned p, e;
        unsigned short h;
        asm volatile("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(p) : "f"(b), "f"(a));
        asm volatile("ex2.approx.f16x2 %0, %1;" : "=r"(e) : "r"(p));
        asm volatile("cvt.rn.satfinite.e4m3x2.f16x2 %0, %1;" : "=h"(h) : "r"(e));
        acc += h;
        a = __int_as_float(e & 0x7fff) - 1.5f;
        b = __int_as_float(e >> 16) - 1.5f;
      }
      x[i] = a;
      x[i + 1] = b;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) cycles[blockIdx.x] = clock64() - start;
  float sum = 0.0f;
  for (int i = 0; i < 8; i++) sum += x[i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum + acc;
}
'''
MODES = ((1, "ex2"), (2, "cvt e4m3x2.f32 (beside a multiply chain)"), (3, "ex2 + cvt interleaved"),
         (0, "multiply chain only"), (4, "ex2 f16x2"), (5, "cvt f16x2.f32"),
         (6, "half-precision chain: cvt f16x2.f32 + ex2 f16x2 + cvt e4m3x2.f16x2"))
THREADS, BLOCKS_PER_SM, ITERS = 1024, 2, 4096


def main() -> None:
    names = [f"probe<{mode}>" for mode, _ in MODES]
    module = cp.RawModule(code=SOURCE, name_expressions=names, options=("-std=c++17",))
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    blocks = sms * BLOCKS_PER_SM * 4  # four waves
    out = cp.empty(blocks * THREADS, dtype=cp.float32)
    cycles = cp.empty(blocks, dtype=cp.int64)
    for (mode, label), name in zip(MODES, names):
        kernel = module.get_function(name)
        times = []
        for _ in range(5):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record()
            kernel((blocks,), (THREADS,), (out, cycles, np.int32(ITERS)))
            end.record()
            end.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, end))
        values = BLOCKS_PER_SM * THREADS * ITERS * 8 / float(cycles.mean())  # an SM's, a clock
        print(f"probe: {label}: {sorted(times)[2]:.2f} ms, {values:.1f} values/clk/SM", flush=True)


if __name__ == "__main__":
    main()
