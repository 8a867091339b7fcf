"""Does the float32 -> e4m3 conversion (F2FP) add to the exponentials' (MUFU.EX2) time on this GPU?

One kernel per mode, the mode a template argument (a runtime one would predicate every kind into
every run): the exponential alone, the conversion alone (beside a multiply chain that stands in
for the exponential's), and both interleaved. 8 independent chains a thread, 2 blocks of 1,024
threads an SM, all chains summed into the output so that none is dropped. Rates come from the
SM's own cycle counter (clock64), so they do not assume a clock. One `probe:` line per mode:
`python3 scripts/probe_fp8_pipes.py` on the GPU (needs CuPy). If "ex2 + cvt" takes about as long
as "ex2", the conversions do not queue behind the exponentials."""

import cupy as cp
import numpy as np

SOURCE = r'''
template <int MODE>  // bit 0: ex2 (else a multiply chain), bit 1: cvt to e4m3x2
__global__ void probe(float* out, long long* cycles, int iters) {
  float x[8];
  unsigned acc = 0;
  for (int i = 0; i < 8; i++) x[i] = -0.001f * (threadIdx.x + i);
  __syncthreads();
  long long start = clock64();
  for (int it = 0; it < iters; it++) {
    #pragma unroll
    for (int i = 0; i < 8; i++) {
      if (MODE & 1) {
        float y;
        asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x[i]));
        x[i] = y - 1.0f;
      } else {
        x[i] = x[i] * 0.999f + 1e-7f;
      }
      if (MODE & 2) {
        unsigned short h;
        asm volatile("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(h) : "f"(x[i]), "f"(x[(i + 1) & 7]));
        acc ^= h;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) cycles[blockIdx.x] = clock64() - start;
  float sum = 0.0f;
  for (int i = 0; i < 8; i++) sum += x[i];
  out[blockIdx.x * blockDim.x + threadIdx.x] = sum + acc;
}
'''
MODES = ((1, "ex2"), (2, "cvt (beside a multiply chain)"), (3, "ex2 + cvt interleaved"), (0, "multiply chain only"))
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
        per_block = float(cycles.mean())
        lanes = BLOCKS_PER_SM * THREADS * ITERS * 8 / per_block  # of each kind, an SM, a clock
        print(f"probe: {label}: {sorted(times)[2]:.2f} ms, {lanes:.1f} lanes/clk/SM of each kind", flush=True)


if __name__ == "__main__":
    main()
