// Building blocks of the kernels in this folder: 16-bit types, asynchronous copies into shared
// memory, ldmatrix, the m16n8k16 tensor-core product, and the swizzled shared-memory tile layout.
//
// Fragment layouts of mma.sync m16n8k16 (row.col), per thread, with g = lane / 4, t = lane % 4:
//   A (16 x 16): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16 x 8):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16 x 8):  c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#ifdef __CUDACC_RTC__  // NVRTC has no C library headers
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
#else
#include <stdint.h>
#endif

namespace fd {

constexpr float LN2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 2^x by the special-function unit (about 2 ulp; 2^-inf = 0), as FlashAttention's softmax uses it.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// The mma instruction's operand type name for each 16-bit element type.
template <typename T> struct MmaType;
template <> struct MmaType<__half> { static constexpr bool bf16 = false; };
template <> struct MmaType<__nv_bfloat16> { static constexpr bool bf16 = true; };

// Two floats rounded into one 32-bit register of two 16-bit values (low half = first).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
}

// c += a * b on the tensor cores, float32 accumulation.
template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    if constexpr (MmaType<T>::bf16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 16-bit values from shared memory; lanes 8i..8i+7 give matrix i's rows.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], uint32_t address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// 16 bytes global -> shared without passing through registers; `valid` false writes zeros and
// reads nothing (the address must still be a legal one, so callers clamp it).
__device__ __forceinline__ void copy16_async(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void copy16_async(uint32_t dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}

__device__ __forceinline__ void commit_async() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void wait_async() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Shared-memory tiles of ROWS x COLS 16-bit values, row-major in 16-byte chunks whose index is
// XORed with the row (mod 8): the 8 rows an ldmatrix reads at one column land in 8 different bank
// groups instead of one. COLS is 64 or more, so every row has at least 8 chunks. Tiles start on
// 128-byte boundaries, so in a byte address the swizzled chunk's low 3 bits are bits 4..6.
template <int COLS>
struct SwizzledTile {
    static_assert(COLS % 64 == 0, "tiles are whole 128-byte rows of chunks");
    static constexpr int CHUNKS = COLS / 8;  // 16-byte chunks per row
    static constexpr int ROW_BYTES = COLS * 2;

    __device__ static __forceinline__ int offset(int row, int chunk) {  // in elements
        return row * COLS + ((chunk ^ (row & 7)) * 8);
    }

    // The address of chunk `c + chunk` of a row, from `base`: the address of chunk c (c < 8) of
    // that row. With `chunk` a compile-time multiple of 8 plus an offset k < 8 whose bits are
    // clear in c, (c + k) ^ r = (c ^ r) ^ k: one XOR with a constant and an add that folds into
    // the load's immediate, instead of the swizzle's arithmetic per load.
    __device__ static __forceinline__ uint32_t chunk_address(uint32_t base, int chunk) {
        return (base ^ ((chunk & 7) << 4)) + ((chunk >> 3) << 7);
    }

    // A thread's base address (chunk c of row `row`, see chunk_address) in the tile at `tile`.
    __device__ static __forceinline__ uint32_t base_address(uint32_t tile, int row, int c) {
        return tile + row * ROW_BYTES + ((c ^ (row & 7)) << 4);
    }
};

// Copy rows [0, ROWS) x COLS of a row-major global tile (row stride `stride`, unit column stride)
// into a swizzled shared tile, asynchronously; with CHECKED, rows at or past `valid_rows` become
// zeros. Each thread copies one 16-byte column chunk of every PASS_ROWS-th row: its chunk, and
// (PASS_ROWS being a multiple of 8) its swizzle, stay the same on every pass, so a pass costs an
// address increment and the copy (and a compare when CHECKED).
template <typename T, int ROWS, int COLS, int THREADS, bool CHECKED = true>
__device__ __forceinline__ void load_tile_async(uint32_t smem_tile, const T* gmem, int64_t stride, int valid_rows = ROWS) {
    using Tile = SwizzledTile<COLS>;
    constexpr int PASS_ROWS = THREADS / Tile::CHUNKS;
    static_assert(THREADS % Tile::CHUNKS == 0 && PASS_ROWS % 8 == 0 && ROWS % PASS_ROWS == 0,
                  "every thread copies the same chunk of rows PASS_ROWS apart");
    const int chunk = threadIdx.x % Tile::CHUNKS, first = threadIdx.x / Tile::CHUNKS;
    const uint32_t dst = Tile::base_address(smem_tile, first, chunk & 7) + ((chunk >> 3) << 7);
    const T* src = gmem + first * stride + chunk * 8;
#pragma unroll
    for (int pass = 0; pass < ROWS / PASS_ROWS; ++pass) {
        const uint32_t to = dst + pass * PASS_ROWS * Tile::ROW_BYTES;
        if (CHECKED) {
            const bool valid = first + pass * PASS_ROWS < valid_rows;
            copy16_async(to, valid ? src + pass * PASS_ROWS * stride : gmem, valid);
        } else {
            copy16_async(to, src + pass * PASS_ROWS * stride);
        }
    }
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

}  // namespace fd
